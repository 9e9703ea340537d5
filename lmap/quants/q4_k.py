"""Q4_K: super-blocks of 256 weights = f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles.

Eight sub-blocks of 32: sub-block 2g takes the low nibbles of qs[32g .. 32g + 31] and
2g + 1 their high nibbles; w = d * sc * q - dmin * m with (sc, m) from ``scale_min``.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd_more import row_dot_q4_k_f32, row_dot_q4_k_q8_k
from .q8_0 import _scale
from .rows import check_rows

BLOCK = 256
BYTES = 144


@njit(cache=True, fastmath=True, inline="always")
def scale_min(w, r, o, j):  # type: ignore[no-untyped-def]
    """(scale, min) of sub-block j (0..7) from the 12 bytes at o (llama.cpp's get_scale_min_k4).

    Sub-blocks 0-3 keep 6 bits in bytes j and j + 4; 4-7 keep their low 4 bits in byte j + 4
    and their top 2 bits in the spare top bits of bytes j - 4 and j.
    """
    if j < 4:
        sc = np.int32(w[r, o + j]) & 63
        m = np.int32(w[r, o + j + 4]) & 63
    else:
        sc = (np.int32(w[r, o + j + 4]) & 15) | ((np.int32(w[r, o + j - 4]) >> 6) << 4)
        m = (np.int32(w[r, o + j + 4]) >> 4) | ((np.int32(w[r, o + j]) >> 6) << 4)
    return np.float32(sc), np.float32(m)


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _scale(w, r, o)
            dmin = _scale(w, r, o + 2)
            for g in range(4):
                sc0, m0 = scale_min(w, r, o + 4, 2 * g)
                sc1, m1 = scale_min(w, r, o + 4, 2 * g + 1)
                d0, dm0 = d * sc0, dmin * m0
                d1, dm1 = d * sc1, dmin * m1
                e = b * BLOCK + 64 * g
                for k in range(32):
                    q = w[r, o + 16 + 32 * g + k]
                    out[r - r0, e + k] = d0 * np.float32(q & 15) - dm0
                    out[r - r0, e + 32 + k] = d1 * np.float32(q >> 4) - dm1


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r of w, x), dequantizing block by block in vector IR (see lmap.kernels.simd_more)."""
    check_rows(w, x)
    nb = w.shape[1] // BYTES
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = x.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q4_k_f32(wp + r * stride, xp, nb)


@njit(cache=True, parallel=True)
def matvec_q8k(w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r, activations quantized by q8_k.quantize_q8_k), in integer SIMD as llama.cpp.

    ``xs`` (sums of 32 activations) is unused: the mins are multiplied in the same pass.
    """
    nb = xq.shape[0] // BLOCK
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = xq.ctypes.data
    dp = xd.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_q4_k_q8_k(wp + r * stride, xp, dp, nb)
