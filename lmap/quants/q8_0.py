"""Q8_0: blocks of 32 weights = f16 scale d, int8 q[32]; w = d * q."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.half import half_to_float
from ..kernels.simd import row_dot_q8_0_q8_0

BLOCK = 32
BYTES = 34


@njit(cache=True, fastmath=True, inline="always")
def _scale(w, r, o):  # type: ignore[no-untyped-def]
    return half_to_float(np.uint16(w[r, o]) | (np.uint16(w[r, o + 1]) << np.uint16(8)))


@njit(cache=True, fastmath=True)
def dequantize_rows(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    """out[i, :] = rows r0 + i of w, for i < r1 - r0."""
    nb = w.shape[1] // BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * BYTES
            d = _scale(w, r, o)
            for j in range(BLOCK):
                out[r - r0, b * BLOCK + j] = d * np.float32(np.int8(w[r, o + 2 + j]))


@njit(cache=True, fastmath=True, parallel=True)
def matvec(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r of w, x), dequantizing block by block."""
    nb = w.shape[1] // BYTES
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for b in range(nb):
            o = b * BYTES
            s = np.float32(0.0)
            for j in range(BLOCK):
                s += np.float32(np.int8(w[r, o + 2 + j])) * x[b * BLOCK + j]
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
        out[r] = row_dot_q8_0_q8_0(wp + r * stride, xp, dp, nb)
