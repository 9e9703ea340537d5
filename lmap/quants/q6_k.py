"""Q6_K: super-blocks of 256 weights = 128 bytes low nibbles ql, 64 bytes high bit pairs qh, 16 int8 scales, f16 d.

In each half n (128 weights), weight 128n + 32j + k (k < 32) takes its low nibble from
ql[64n + 32(j & 1) + k] (low nibble for j < 2, high for j >= 2) and its top two bits from
bits 2j..2j+1 of qh[32n + k]; q = that 6-bit value - 32, w = d * scale[weight // 16] * q.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd_more import row_dot_q6_k_f32, row_dot_q6_k_q8_k
from .q8_0 import _scale
from .rows import check_rows

BLOCK = 256
BYTES = 210


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _scale(w, r, o + 208)
            for n in range(2):
                for h in range(2):
                    i = o + 192 + 8 * n + h
                    d0 = d * np.float32(np.int8(w[r, i]))
                    d1 = d * np.float32(np.int8(w[r, i + 2]))
                    d2 = d * np.float32(np.int8(w[r, i + 4]))
                    d3 = d * np.float32(np.int8(w[r, i + 6]))
                    e = b * BLOCK + 128 * n + 16 * h
                    for k in range(16):
                        a = np.int32(w[r, o + 64 * n + 16 * h + k])
                        c = np.int32(w[r, o + 64 * n + 32 + 16 * h + k])
                        hh = np.int32(w[r, o + 128 + 32 * n + 16 * h + k])
                        out[r - r0, e + k] = d0 * np.float32(((a & 15) | ((hh & 3) << 4)) - 32)
                        out[r - r0, e + 32 + k] = d1 * np.float32(((c & 15) | ((hh & 12) << 2)) - 32)
                        out[r - r0, e + 64 + k] = d2 * np.float32(((a >> 4) | (hh & 48)) - 32)
                        out[r - r0, e + 96 + k] = d3 * np.float32(((c >> 4) | ((hh >> 2) & 48)) - 32)


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r of w, x), dequantizing block by block in vector IR (see lmap.kernels.simd_more)."""
    check_rows(w, x)
    nb = w.shape[1] // BYTES
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = x.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q6_k_f32(wp + r * stride, xp, nb)


@njit(cache=True, parallel=True)
def matvec_q8k(w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r, activations quantized by q8_k.quantize_q8_k), in integer SIMD as llama.cpp.

    ``xs`` (sums of 32 activations) is unused.
    """
    nb = xq.shape[0] // BLOCK
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = xq.ctypes.data
    dp = xd.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q6_k_q8_k(wp + r * stride, xp, dp, nb)
