"""Q4_0: blocks of 32 weights = f16 scale d, 16 bytes of nibbles; w = d * (q - 8).

Nibble order as Q4_1: byte j holds weight j (low) and weight j + 16 (high).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd import row_dot_q4_0_q8_0
from .q8_0 import _scale

BLOCK = 32
BYTES = 18


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _scale(w, r, o)
            for j in range(16):
                q = w[r, o + 2 + j]
                out[r - r0, b * BLOCK + j] = d * np.float32(np.int32(q & 15) - 8)
                out[r - r0, b * BLOCK + 16 + j] = d * np.float32(np.int32(q >> 4) - 8)


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * BYTES
            s = np.float32(0.0)
            for j in range(16):
                q = w[r, o + 2 + j]
                s += (
                    np.float32(np.int32(q & 15) - 8) * x[b * BLOCK + j]
                    + np.float32(np.int32(q >> 4) - 8) * x[b * BLOCK + 16 + j]
                )
            acc += _scale(w, r, o) * s
        out[r] = acc


@njit(cache=True, parallel=True)
def matvec_q8(w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r, activations quantized by ops.quantize_q8), in integer SIMD as llama.cpp."""
    nb = xq.shape[0] // BLOCK
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = xq.ctypes.data
    dp = xd.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q4_0_q8_0(wp + r * stride, xp, dp, nb)
