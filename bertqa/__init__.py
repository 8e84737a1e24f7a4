"""bertqa: fine-tune and serve BERT for extractive question answering, on a C/CUDA compute core.

Submodules:
    bertqa.ops   the C kernels one by one, on NumPy float32 arrays (layernorm, GELU, attention, AdamW, ...)
    bertqa.cuda  the CUDA backend: whether it can run here, device information, the GPU kernels one by one
"""

__version__ = "0.1.0"


def cuda_available() -> bool:
    """Whether ``device="cuda"`` can be used: bertqa was built with its CUDA backend and a GPU of compute capability
    8.0 or newer is visible. The CUDA extension is imported on the first call, not by ``import bertqa``;
    ``bertqa.cuda.unavailable_reason()`` says why not."""
    from .cuda import available

    return available()


def __getattr__(name):
    if name == "BertQA":
        from .model import BertQA
        return BertQA
    if name == "QAPipeline":
        from .inference import QAPipeline
        return QAPipeline
    raise AttributeError(f"module 'bertqa' has no attribute {name!r}")
