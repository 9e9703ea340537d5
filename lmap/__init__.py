"""lmap: run GGUF language models from a memory map, in Python, with llama.cpp's frugality.

>>> from lmap import Llama
>>> llm = Llama("smollm2-135m")            # a path to a .gguf file or a known model name
>>> llm("The capital of France is", max_tokens=8, temperature=0)["choices"][0]["text"]
"""

from __future__ import annotations

from .errors import (
    ContextOverflowError,
    GGUFError,
    InvalidParameterError,
    LmapError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from .numba_cache import use_source_keyed_cache

__version__ = "0.1.0"

use_source_keyed_cache()

__all__ = [
    "Llama",
    "LmapError",
    "GGUFError",
    "UnsupportedModelError",
    "ContextOverflowError",
    "InvalidParameterError",
    "ModelNotFoundError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Importing Llama pulls in Numba; keep `import lmap` (and `lmap info`) light until it is needed.
    if name == "Llama":
        from .llama import Llama

        return Llama
    raise AttributeError(f"module 'lmap' has no attribute {name!r}")
