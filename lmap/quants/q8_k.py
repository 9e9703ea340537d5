"""Q8_K: llama.cpp's activation format for the K-quants and IQ4_XS (its vec_dot_type).

Blocks of 256: float32 d, int8 q[256], int16 sums of each 16 q's. Unlike Q8_0 the scale
is not rounded to f16 and comes from the signed value of largest magnitude:
d = max / -127, q = min(127, nearest(x * -127 / max)).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.vround import round_q8_k_block

BLOCK = 256


@njit(cache=True, fastmath=False, inline="always")
def _block_iscale(x, t, o):  # type: ignore[no-untyped-def]
    """-127 / (the first value of largest |x| in the block), or 0 for an all-zero block."""
    amax = np.float32(0.0)
    mx = np.float32(0.0)
    for j in range(BLOCK):
        a = abs(x[t, o + j])
        if a > amax:
            amax = a
            mx = x[t, o + j]
    if amax == 0.0:
        return np.float32(0.0)
    return np.float32(-127.0) / mx


@njit(cache=True, fastmath=False, parallel=True)
def round_q8_k(x: np.ndarray, out: np.ndarray) -> None:
    """out = x after llama.cpp's quantize_row_q8_K_ref, dequantized (d * q); [n, k], k % 256 == 0.

    A block is one vector (kernels/vround.py) when rows are contiguous, else the scalar twin.
    """
    n, k = x.shape
    if x.strides[1] != 4 or out.strides[1] != 4:
        round_q8_k_scalar(x, out)
        return
    for t in prange(n):
        xa = x.ctypes.data + t * x.strides[0]
        oa = out.ctypes.data + t * out.strides[0]
        for b in range(k // BLOCK):
            round_q8_k_block(xa + 4 * BLOCK * b, oa + 4 * BLOCK * b)


@njit(cache=True, fastmath=False)
def round_q8_k_scalar(x: np.ndarray, out: np.ndarray) -> None:
    """:func:`round_q8_k` one activation at a time.

    fastmath stays off: the rounding must be the C reference's, step for step (x * iscale
    rounded to float, then to the nearest integer, ties to even like its nearest_int).
    """
    n, k = x.shape
    for t in range(n):
        for b in range(k // BLOCK):
            o = b * BLOCK
            iscale = _block_iscale(x, t, o)
            if iscale == 0.0:
                for j in range(BLOCK):
                    out[t, o + j] = np.float32(0.0)
                continue
            d = np.float32(1.0) / iscale
            for j in range(BLOCK):
                q = min(np.float32(127.0), np.float32(np.rint(np.float32(iscale * x[t, o + j]))))
                out[t, o + j] = d * q


@njit(cache=True, fastmath=False)
def quantize_q8_k(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    """Quantize x[k] to Q8_K: int8 xq[k], float32 scales xd[k / 256], sums of each 32 xq's xs[k / 32] (as floats).

    Same arguments as ops.quantize_q8, so the same scratch serves both; the integer K-quant
    kernels (``matvec_q8k``) read xq and xd.
    """
    x2 = x.reshape(1, -1)
    for b in range(x.shape[0] // BLOCK):
        o = b * BLOCK
        iscale = _block_iscale(x2, 0, o)
        xd[b] = np.float32(1.0) / iscale if iscale != 0.0 else np.float32(0.0)
        for g in range(BLOCK // 32):
            s = 0
            for j in range(32):
                q = np.int32(min(np.float32(127.0), np.float32(np.rint(np.float32(iscale * x[o + 32 * g + j])))))
                xq[o + 32 * g + j] = np.int8(q)
                s += q
            xs[b * 8 + g] = np.float32(s)
