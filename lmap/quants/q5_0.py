"""Q5_0: blocks of 32 weights = f16 scale d, 4 bytes of high bits qh, 16 bytes of nibbles.

Weight j's low four bits are byte j's low nibble (j < 16) or byte j - 16's high nibble;
its fifth bit is bit j of the little-endian uint32 qh; w = d * (q - 16).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd_more import row_dot_q5_0_f32, row_dot_q5_0_q8_0
from .q8_0 import _scale
from .rows import check_rows

BLOCK = 32
BYTES = 22


@njit(cache=True, fastmath=True, inline="always")
def _qh(w, r, o):  # type: ignore[no-untyped-def]
    return (
        np.uint32(w[r, o])
        | (np.uint32(w[r, o + 1]) << np.uint32(8))
        | (np.uint32(w[r, o + 2]) << np.uint32(16))
        | (np.uint32(w[r, o + 3]) << np.uint32(24))
    )


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _scale(w, r, o)
            qh = _qh(w, r, o + 2)
            for j in range(16):
                q = np.int32(w[r, o + 6 + j])
                lo = (q & 15) | np.int32(((qh >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                hi = (q >> 4) | np.int32(((qh >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
                out[r - r0, b * BLOCK + j] = d * np.float32(lo - 16)
                out[r - r0, b * BLOCK + 16 + j] = d * np.float32(hi - 16)


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r of w, x), dequantizing block by block in vector IR (see lmap.kernels.simd_more)."""
    check_rows(w, x)
    nb = w.shape[1] // BYTES
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = x.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q5_0_f32(wp + r * stride, xp, nb)


@njit(cache=True, parallel=True)
def matvec_q8(w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r, activations quantized by ops.quantize_q8), in integer SIMD as llama.cpp."""
    nb = xq.shape[0] // BLOCK
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = xq.ctypes.data
    dp = xd.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q5_0_q8_0(wp + r * stride, xp, dp, nb)
