"""Q3_K: super-blocks of 256 weights = 32 bytes hmask, 64 bytes of 2-bit weights, 12 bytes of scales, f16 d.

Weight 128n + 32j + k (k < 32) takes bits 2j..2j+1 of qs[32n + k] as its low bits and
bit 4n + j of hmask[k] as its third; q = low - (4 if that bit is clear else 0), in -4..3.
Sixteen 6-bit scales (one per 16 weights, stored minus 32) are packed as in ``_scale6``;
w = d * (scale - 32) * q.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd_more import row_dot_q3_k_f32, row_dot_q3_k_q8_k
from .q8_0 import _scale
from .rows import check_rows

BLOCK = 256
BYTES = 110


@njit(cache=True, fastmath=True, inline="always")
def _scale6(w, r, o, i):  # type: ignore[no-untyped-def]
    """Signed scale i (0..15) of the 12 scale bytes at o: low nibble from byte i % 8, top 2 bits from byte 8 + i % 4."""
    lo = (np.int32(w[r, o + (i & 7)]) >> (4 * (i >> 3))) & 15
    hi = (np.int32(w[r, o + 8 + (i & 3)]) >> (2 * (i >> 2))) & 3
    return np.float32((lo | (hi << 4)) - 32)


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _scale(w, r, o + 108)
            for n in range(2):
                for h in range(2):
                    i = 8 * n + h
                    # one low-bits byte and one hmask byte make a weight in each of four sub-blocks
                    d0 = d * _scale6(w, r, o + 96, i)
                    d1 = d * _scale6(w, r, o + 96, i + 2)
                    d2 = d * _scale6(w, r, o + 96, i + 4)
                    d3 = d * _scale6(w, r, o + 96, i + 6)
                    e = b * BLOCK + 128 * n + 16 * h
                    for k in range(16):
                        q = np.int32(w[r, o + 32 + 32 * n + 16 * h + k])
                        m = np.int32(w[r, o + 16 * h + k]) >> (4 * n)
                        out[r - r0, e + k] = d0 * np.float32((q & 3) + ((m & 1) << 2) - 4)
                        out[r - r0, e + 32 + k] = d1 * np.float32(((q >> 2) & 3) + ((m & 2) << 1) - 4)
                        out[r - r0, e + 64 + k] = d2 * np.float32(((q >> 4) & 3) + (m & 4) - 4)
                        out[r - r0, e + 96 + k] = d3 * np.float32((q >> 6) + ((m & 8) >> 1) - 4)


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r of w, x), dequantizing block by block in vector IR (see lmap.kernels.simd_more)."""
    check_rows(w, x)
    nb = w.shape[1] // BYTES
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = x.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q3_k_f32(wp + r * stride, xp, nb)


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
        out[r] = row_dot_q3_k_q8_k(wp + r * stride, xp, dp, nb)
