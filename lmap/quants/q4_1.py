"""Q4_1: blocks of 32 weights = f16 scale d, f16 min m, 16 bytes of nibbles.

Byte j holds weight j in its low nibble and weight j + 16 in its high nibble;
w = d * q + m.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.half import half_to_float
from ..kernels.simd import row_dot_q4_1_q8_1

BLOCK = 32
BYTES = 20


@njit(cache=True, fastmath=True, inline="always")
def _half(w, r, o):  # type: ignore[no-untyped-def]
    return half_to_float(np.uint16(w[r, o]) | (np.uint16(w[r, o + 1]) << np.uint16(8)))


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _half(w, r, o)
            m = _half(w, r, o + 2)
            for j in range(16):
                q = w[r, o + 4 + j]
                out[r - r0, b * BLOCK + j] = d * np.float32(q & 15) + m
                out[r - r0, b * BLOCK + 16 + j] = d * np.float32(q >> 4) + m


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * BYTES
            s = np.float32(0.0)
            sx = np.float32(0.0)
            for j in range(16):
                q = w[r, o + 4 + j]
                x0 = x[b * BLOCK + j]
                x1 = x[b * BLOCK + 16 + j]
                s += np.float32(q & 15) * x0 + np.float32(q >> 4) * x1
                sx += x0 + x1
            acc += _half(w, r, o) * s + _half(w, r, o + 2) * sx
        out[r] = acc


@njit(cache=True, parallel=True)
def matvec_q8(w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r, activations quantized by ops.quantize_q8), in integer SIMD as llama.cpp."""
    nb = xq.shape[0] // BLOCK
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = xq.ctypes.data
    dp = xd.ctypes.data
    sp = xs.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q4_1_q8_1(wp + r * stride, xp, dp, sp, nb)
