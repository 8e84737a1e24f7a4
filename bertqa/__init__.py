"""bertqa: fine-tune and serve BERT for extractive question answering, on a C/CUDA compute core.

    from bertqa import BertQA, QAPipeline

    qa = QAPipeline(BertQA.from_pretrained("runs/minilm-squad"))   # a fine-tuned model; device="cuda" on a GPU
    qa("Where is the Eiffel tower?", "The Eiffel tower is in Paris.")
    # {"answer": "Paris", "score": ..., "start": 23, "end": 28}

``import bertqa`` is cheap: it loads neither NumPy nor the C extension nor the CUDA libraries. The names below
are imported from their modules on first use (PEP 562):
    BertQA          bertqa.model       the model: from_pretrained, forward, train_step, save_pretrained
    QAPipeline      bertqa.inference   question + context -> answer text, score and character offsets
    cuda_available  here               whether device="cuda" can be used

Submodules:
    bertqa.ops   the C kernels one by one, on NumPy float32 arrays (layernorm, GELU, attention, AdamW, ...)
    bertqa.cuda  the CUDA backend: whether it can run here, device information, the GPU kernels one by one
    bertqa.serve the SageMaker-compatible endpoint (`bertqa serve`)
"""
import importlib as _importlib

from ._version import __version__

# name -> the module that defines it; imported by __getattr__ on first use
_LAZY = {
    "BertQA": "bertqa.model",
    "QAPipeline": "bertqa.inference",
}

__all__ = ["BertQA", "QAPipeline", "cuda_available", "__version__"]


def cuda_available() -> bool:
    """Whether ``device="cuda"`` can be used: bertqa was built with its CUDA backend and a GPU of compute capability
    8.0 or newer is visible. The CUDA extension is imported on the first call, not by ``import bertqa``;
    ``bertqa.cuda.unavailable_reason()`` says why not."""
    return _importlib.import_module("bertqa.cuda").available()


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'bertqa' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
