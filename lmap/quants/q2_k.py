"""Q2_K: super-blocks of 256 weights = 16 scale bytes, 64 bytes of 2-bit weights, f16 d, f16 dmin.

Scale byte i covers weights 16i..16i+15: low nibble scales, high nibble is the min;
w = d * (sc & 15) * q - dmin * (sc >> 4). Weight 128n + 32j + k (k < 32) is bits
2j..2j+1 of qs[32n + k].
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd_more import row_dot_q2_k_f32, row_dot_q2_k_q8_k
from .q8_0 import _scale
from .rows import check_rows

BLOCK = 256
BYTES = 84


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _scale(w, r, o + 80)
            dmin = _scale(w, r, o + 82)
            for n in range(2):
                for h in range(2):
                    i = o + 8 * n + h
                    # d * scale and dmin * min of the four sub-blocks this run of bytes feeds
                    d0, m0 = d * np.float32(w[r, i] & 15), dmin * np.float32(w[r, i] >> 4)
                    d1, m1 = d * np.float32(w[r, i + 2] & 15), dmin * np.float32(w[r, i + 2] >> 4)
                    d2, m2 = d * np.float32(w[r, i + 4] & 15), dmin * np.float32(w[r, i + 4] >> 4)
                    d3, m3 = d * np.float32(w[r, i + 6] & 15), dmin * np.float32(w[r, i + 6] >> 4)
                    e = b * BLOCK + 128 * n + 16 * h
                    for k in range(16):
                        q = w[r, o + 16 + 32 * n + 16 * h + k]
                        out[r - r0, e + k] = d0 * np.float32(q & 3) - m0
                        out[r - r0, e + 32 + k] = d1 * np.float32((q >> 2) & 3) - m1
                        out[r - r0, e + 64 + k] = d2 * np.float32((q >> 4) & 3) - m2
                        out[r - r0, e + 96 + k] = d3 * np.float32(q >> 6) - m3


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r of w, x), dequantizing block by block in vector IR (see lmap.kernels.simd_more)."""
    check_rows(w, x)
    nb = w.shape[1] // BYTES
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = x.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q2_k_f32(wp + r * stride, xp, nb)


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
        out[r] = row_dot_q2_k_q8_k(wp + r * stride, xp, dp, nb)
