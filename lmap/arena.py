"""One float32 buffer carved into views, for buffers whose lifetimes never overlap.

Within a layer the attention buffers (q, k, v, att and the prefill attention scratch) are dead
once the attention output is projected, and the FFN's (hb, hb2) are born after that: one region
serves both (liveness, as ggml's graph allocator reuses tensors whose last reader has run). For
gemma3 at n_batch 512 and n_ctx 2048 that is 14 MiB instead of 22.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

ALIGN = 16  # floats: each view starts on a 64-byte cache line


def floats(shapes: Sequence[tuple[int, ...]]) -> int:
    """float32 elements a buffer needs to hold views of these shapes, each aligned."""
    return sum(-(-math.prod(s) // ALIGN) * ALIGN for s in shapes)


def carve(buf: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """Consecutive aligned views of ``buf`` (float32, at least :func:`floats` long) with these shapes."""
    out: list[np.ndarray] = []
    o = 0
    for s in shapes:
        n = math.prod(s)
        out.append(buf[o : o + n].reshape(s))
        o += -(-n // ALIGN) * ALIGN
    if o > buf.shape[0]:
        raise ValueError(f"arena of {buf.shape[0]} floats is too small for {o}")
    return out
