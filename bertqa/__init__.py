"""bertqa: fine-tune and serve BERT for extractive question answering, on a C/CUDA compute core.

Submodules:
    bertqa.ops   the C kernels one by one, on NumPy float32 arrays (layernorm, GELU, attention, AdamW, ...)
"""

__version__ = "0.1.0"
