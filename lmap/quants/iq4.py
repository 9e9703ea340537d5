"""IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-linear table of 16 int8 levels.

IQ4_NL: blocks of 32 = f16 d, 16 bytes of nibbles (order as Q4_0); w = d * KVALUES[q].
IQ4_XS: super-blocks of 256 = f16 d, uint16 scales_h, 4 bytes scales_l, 128 bytes of nibbles;
sub-block i (32 weights, nibbles as IQ4_NL in bytes 16i..16i+15) has the 6-bit scale
ls = nibble i of scales_l | (bits 2i..2i+1 of scales_h) << 4, and w = d * (ls - 32) * KVALUES[q].
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd_more import (
    IQ4_LEVELS,
    row_dot_iq4_nl_f32,
    row_dot_iq4_nl_q8_0,
    row_dot_iq4_xs_f32,
    row_dot_iq4_xs_q8_k,
)
from .q8_0 import _scale
from .rows import check_rows

# llama.cpp's kvalues_iq4nl as floats, for dequantization
KVALUES = np.array(IQ4_LEVELS, np.float32)

NL_BLOCK = 32
NL_BYTES = 18
XS_BLOCK = 256
XS_BYTES = 136


@njit(cache=True, fastmath=True)
def dequantize_rows_nl(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // NL_BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * NL_BYTES
            d = _scale(w, r, o)
            for j in range(16):
                q = w[r, o + 2 + j]
                out[r - r0, b * NL_BLOCK + j] = d * KVALUES[q & 15]
                out[r - r0, b * NL_BLOCK + 16 + j] = d * KVALUES[q >> 4]


@njit(cache=True, fastmath=True, parallel=True)
def matvec_nl(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    # the level lookup is one vpshufb per block in IR; Numba's loop would need a gather and stay scalar
    check_rows(w, x)
    nb = w.shape[1] // NL_BYTES
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = x.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_iq4_nl_f32(wp + r * stride, xp, nb)


@njit(cache=True, parallel=True)
def matvec_q8_nl(w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r, activations quantized by ops.quantize_q8), in integer SIMD as llama.cpp."""
    nb = xq.shape[0] // NL_BLOCK
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = xq.ctypes.data
    dp = xd.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_iq4_nl_q8_0(wp + r * stride, xp, dp, nb)


@njit(cache=True, fastmath=True, inline="always")
def _xs_scale(w, r, o, i):  # type: ignore[no-untyped-def]
    lo = (np.int32(w[r, o + 4 + (i >> 1)]) >> (4 * (i & 1))) & 15
    hi = (np.int32(w[r, o + 2 + (i >> 2)]) >> (2 * (i & 3))) & 3
    return np.float32((lo | (hi << 4)) - 32)


@njit(cache=True, fastmath=True)
def dequantize_rows_xs(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    nb = w.shape[1] // XS_BYTES
    for r in range(r0, r1):
        for b in range(nb):
            o = b * XS_BYTES
            d = _scale(w, r, o)
            for i in range(8):
                dl = d * _xs_scale(w, r, o, i)
                e = b * XS_BLOCK + 32 * i
                for j in range(16):
                    q = w[r, o + 8 + 16 * i + j]
                    out[r - r0, e + j] = dl * KVALUES[q & 15]
                    out[r - r0, e + 16 + j] = dl * KVALUES[q >> 4]


@njit(cache=True, fastmath=True, parallel=True)
def matvec_xs(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    # the level lookup is one vpshufb per block in IR; Numba's loop would need a gather and stay scalar
    check_rows(w, x)
    nb = w.shape[1] // XS_BYTES
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = x.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_iq4_xs_f32(wp + r * stride, xp, nb)


@njit(cache=True, parallel=True)
def matvec_q8k_xs(w: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray, out: np.ndarray) -> None:
    """out[r] = dot(row r, activations quantized by q8_k.quantize_q8_k), in integer SIMD as llama.cpp.

    ``xs`` (sums of 32 activations) is unused.
    """
    nb = xq.shape[0] // XS_BLOCK
    wp = w.ctypes.data
    stride = w.strides[0]
    xp = xq.ctypes.data
    dp = xd.ctypes.data
    for r in prange(w.shape[0]):
        out[r] = row_dot_iq4_xs_q8_k(wp + r * stride, xp, dp, nb)
