"""IQ4_NL / IQ4_XS quantizers: llama.cpp's quantize_row_iq4_nl_impl, bit for bit.

Each kernel is ``(x f32[rows, cols], qw f32[cols or 0], out u8[rows, row_bytes])``, parallel over
rows. Like ggml_quantize_chunk (quantize_iq4_nl / quantize_iq4_xs) they search 2 * 7 + 1 scales
per 32 weights around -max / -127, each weight snapped to the nearest of the 16 non-linear
levels (best_index_int8), weights x^2 or importance * sqrt(sigma2 + x^2). IQ4_XS then puts the
eight block scales on a 6-bit grid under one f16 super-scale and re-snaps every weight.
fastmath stays off: the float32 rounding order decides the bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.simd_more import IQ4_LEVELS
from .quantize_search import F0, F1, GROUP_MAX_EPS, nearest_int, store_f16

# kvalues_iq4nl (int8 in the C; every comparison there promotes them to float)
VALUES = np.array(IQ4_LEVELS, np.float32)
NTRY = 7
NL_BYTES = 18
XS_BYTES = 136


@njit(cache=True, inline="always")
def best_index(values: np.ndarray, x: float) -> int:
    """Index of the level nearest x (ties to the upper level), by bisection as best_index_int8."""
    if x <= values[0]:
        return 0
    if x >= values[15]:
        return 15
    ml = 0
    mu = 15
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if x < values[mav]:
            mu = mav
        else:
            ml = mav
    return mu - 1 if x - values[mu - 1] < values[mu] - x else mu


@njit(cache=True, inline="always")
def _block_scale(
    x: np.ndarray, r: int, e: int, qw: np.ndarray, use_qw: bool, sigma2: float, weight: np.ndarray, values: np.ndarray
) -> np.float32:
    """Best scale for the 32 weights x[r, e : e + 32] (0 for an all-zero block)."""
    for j in range(32):
        v = x[r, e + j]
        weight[j] = qw[e + j] * np.sqrt(np.float32(sigma2) + v * v) if use_qw else v * v
    amax = F0
    mx = F0
    for j in range(32):
        ax = abs(x[r, e + j])
        if ax > amax:
            amax = ax
            mx = x[r, e + j]
    if amax < GROUP_MAX_EPS:
        return F0
    d = -mx / values[0]
    inv = F1 / d
    sumqx = F0
    sumq2 = F0
    for j in range(32):
        q = values[best_index(values, inv * x[r, e + j])]
        w = weight[j]
        sumqx += w * q * x[r, e + j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > 0 else F0
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        inv = np.float32(itry + np.int32(values[0])) / mx
        sumqx = F0
        sumq2 = F0
        for j in range(32):
            q = values[best_index(values, inv * x[r, e + j])]
            w = weight[j]
            sumqx += w * q * x[r, e + j]
            sumq2 += w * q * q
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True, inline="always")
def _sigma2(x: np.ndarray, r: int, e: int, n: int) -> np.float32:
    s = F0
    for j in range(n):
        s += x[r, e + j] * x[r, e + j]
    return s * (np.float32(2.0) / np.float32(n))


@njit(cache=True, parallel=True)
def quantize_iq4_nl(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_iq4_nl: one scale per 32 weights, stored as f16; levels re-snapped to the unrounded scale."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    values = VALUES
    for r in prange(rows):
        weight = np.zeros(32, np.float32)
        for b in range(cols // 32):
            e = b * 32
            o = b * NL_BYTES
            d = _block_scale(x, r, e, qw, use_qw, _sigma2(x, r, e, 32), weight, values)
            store_f16(out, r, o, d)
            inv = F1 / d if d != 0 else F0
            for j in range(16):
                lo = best_index(values, inv * x[r, e + j])
                hi = best_index(values, inv * x[r, e + 16 + j])
                out[r, o + 2 + j] = np.uint8(lo | (hi << 4))


@njit(cache=True, parallel=True)
def quantize_iq4_xs(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_iq4_xs: eight block scales -> 6-bit multiples of d = -max_scale / 32 (f16); levels re-snapped."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    values = VALUES
    for r in prange(rows):
        weight = np.zeros(32, np.float32)
        scales = np.zeros(8, np.float32)
        for i in range(cols // 256):
            e = i * 256
            o = i * XS_BYTES
            sigma2 = _sigma2(x, r, e, 256)
            max_scale = F0
            amax_scale = F0
            for ib in range(8):
                s = _block_scale(x, r, e + 32 * ib, qw, use_qw, sigma2, weight, values)
                scales[ib] = s
                if abs(s) > amax_scale:
                    amax_scale = abs(s)
                    max_scale = s
            d = -max_scale / np.float32(32.0)
            store_f16(out, r, o, d)
            inv = F1 / d if d != 0 else F0
            scales_h = 0
            for ib in range(8):
                q = max(-32, min(31, nearest_int(inv * scales[ib])))
                dl = d * np.float32(q)
                idl = F1 / dl if dl != 0 else F0
                eb = e + 32 * ib
                ob = o + 8 + 16 * ib
                for j in range(16):
                    lo = best_index(values, idl * x[r, eb + j])
                    hi = best_index(values, idl * x[r, eb + 16 + j])
                    out[r, ob + j] = np.uint8(lo | (hi << 4))
                q += 32
                if ib % 2 == 0:
                    out[r, o + 4 + ib // 2] = np.uint8(q & 0xF)
                else:
                    out[r, o + 4 + ib // 2] |= np.uint8((q & 0xF) << 4)
                scales_h |= (q >> 4) << (2 * ib)
            out[r, o + 2] = np.uint8(scales_h & 0xFF)
            out[r, o + 3] = np.uint8((scales_h >> 8) & 0xFF)
