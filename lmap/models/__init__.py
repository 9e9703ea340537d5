"""Architectures by ``general.architecture``: a name table, each entry a short forward pass."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from ..gguf import GGUFFile
from .base import HParams, Model, Scratch, check_tensor_shapes
from .gemma3 import Gemma3
from .llama import Llama

ARCHITECTURES: dict[str, type[Model]] = {
    "llama": Llama,
    "gemma3": Gemma3,
}

__all__ = ["ARCHITECTURES", "HParams", "Model", "Scratch", "load_model"]


def load_model(g: GGUFFile) -> Model:
    """Build the model for ``g``'s architecture (weights stay in the mapping)."""
    arch = g.architecture
    cls = ARCHITECTURES.get(arch)
    if cls is None:
        raise UnsupportedModelError(
            f"{g.path}: architecture {arch!r} is not supported (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    hp = HParams.from_gguf(g)
    model = cls(g, hp)
    check_tensor_shapes(model)
    return model
