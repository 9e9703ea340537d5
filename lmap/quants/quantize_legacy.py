"""Quantizers for the float formats and the 32-weight block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1).

Each kernel is ``(x f32[rows, cols], qw f32[cols or 0], out u8[rows, row_bytes])``, parallel over
rows. Without an importance matrix they are llama.cpp's quantize_row_*_ref (which gguf-py's
``quantize`` reproduces byte for byte); with one, Q4_0/Q4_1/Q5_0/Q5_1 follow quantize_row_*_impl
(weighted scale search; Q8_0 ignores it, as llama.cpp does). fastmath stays off throughout:
the bytes depend on float32 rounding in the C order.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.half import float_to_half
from .quantize_search import F0, F1, make_qkx3_quants, make_qx_quants, store_f16

Q8_0_BYTES = 34
Q4_0_BYTES = 18
Q4_1_BYTES = 20
Q5_0_BYTES = 22
Q5_1_BYTES = 24
FLT_MAX = np.float32(3.4028234663852886e38)


@njit(cache=True, parallel=True)
def quantize_f16(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """IEEE half, round to nearest even (ggml_fp32_to_fp16_row / numpy's astype)."""
    rows, cols = x.shape
    for r in prange(rows):
        for j in range(cols):
            h = float_to_half(x[r, j])
            out[r, 2 * j] = np.uint8(h & 0xFF)
            out[r, 2 * j + 1] = np.uint8(h >> 8)


@njit(cache=True, parallel=True)
def quantize_bf16(xb: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """bfloat16 from the uint32 bits of the floats ``xb``: NaN forced quiet, else round to nearest even.

    ggml_compute_fp32_to_bf16 (and gguf-py's BF16.quantize_blocks).
    """
    rows, cols = xb.shape
    for r in prange(rows):
        for j in range(cols):
            u = np.uint32(xb[r, j])
            if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
                h = (u >> np.uint32(16)) | np.uint32(64)
            else:
                h = (np.uint64(u) + np.uint64(0x7FFF) + np.uint64((u >> np.uint32(16)) & np.uint32(1))) >> np.uint64(16)
            out[r, 2 * j] = np.uint8(h & 0xFF)
            out[r, 2 * j + 1] = np.uint8((h >> 8) & 0xFF)


@njit(cache=True, inline="always")
def _trunc_u8(v: float, hi: int) -> int:
    """MIN(hi, (int8_t)v) for v >= 0 in range; NaN and out-of-range values (only from an inf
    scale, where C's conversion is undefined) are clamped instead of wrapping."""
    if not (v >= 0):
        return 0
    if v >= np.float32(hi + 1):
        return hi
    return min(hi, np.int32(v))


@njit(cache=True, inline="always")
def _roundf(v: float) -> int:
    """C roundf (half away from zero) for |v| <= 127.5, as an int clamped to [-127, 127]."""
    a = abs(v)
    if not (a < np.float32(127.5)):
        a = np.float32(127.0)  # only an inf scale gets here; C's conversion is undefined then
    f = np.floor(a)
    q = np.int32(f)
    if a - f >= np.float32(0.5):
        q += 1
    return -q if v < 0 else q


@njit(cache=True, parallel=True)
def quantize_q8_0(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q8_0_ref: d = amax / 127, q = roundf(x / d)."""
    rows, cols = x.shape
    for r in prange(rows):
        for b in range(cols // 32):
            e = b * 32
            o = b * Q8_0_BYTES
            amax = F0
            for j in range(32):
                amax = max(amax, abs(x[r, e + j]))
            d = amax / np.float32(127.0)
            inv = F1 / d if d != 0 else F0
            store_f16(out, r, o, d)
            for j in range(32):
                out[r, o + 2 + j] = np.uint8(_roundf(x[r, e + j] * inv) & 0xFF)


@njit(cache=True, inline="always")
def _signed_max(x: np.ndarray, r: int, e: int, n: int) -> np.float32:
    """The first value of largest magnitude in x[r, e : e + n] (0 for an all-zero group)."""
    amax = F0
    mx = F0
    for j in range(n):
        v = x[r, e + j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return mx


@njit(cache=True, inline="always")
def _sigma2(x: np.ndarray, r: int) -> np.float32:
    s = F0
    for j in range(x.shape[1]):
        s += x[r, j] * x[r, j]
    return s / np.float32(x.shape[1])


@njit(cache=True, inline="always")
def _imatrix_weights(x: np.ndarray, r: int, e: int, qw: np.ndarray, sigma2: float, w: np.ndarray) -> None:
    # llama.cpp's quantize_row_*_impl weight: importance * sqrt(sigma2 + x^2)
    for j in range(32):
        w[j] = qw[e + j] * np.sqrt(np.float32(sigma2) + x[r, e + j] * x[r, e + j])


@njit(cache=True, parallel=True)
def quantize_q4_0(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q4_0_ref (d = max / -8) or, with importance weights, quantize_row_q4_0_impl."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(32, np.int32)
        w = np.zeros(32, np.float32)
        sigma2 = _sigma2(x, r) if use_qw else F0
        for b in range(cols // 32):
            e = b * 32
            o = b * Q4_0_BYTES
            if use_qw:
                _imatrix_weights(x, r, e, qw, sigma2, w)
                d = make_qx_quants(32, 8, x[r, e : e + 32], L, w, 0, True)
                store_f16(out, r, o, d)
            else:
                d = _signed_max(x, r, e, 32) / np.float32(-8.0)
                inv = F1 / d if d != 0 else F0
                store_f16(out, r, o, d)
                for j in range(32):
                    L[j] = _trunc_u8(x[r, e + j] * inv + np.float32(8.5), 15)
            for j in range(16):
                out[r, o + 2 + j] = np.uint8(L[j] | (L[j + 16] << 4))


@njit(cache=True, parallel=True)
def quantize_q5_0(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_0_ref (d = max / -16) or, with importance weights, quantize_row_q5_0_impl."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(32, np.int32)
        w = np.zeros(32, np.float32)
        sigma2 = _sigma2(x, r) if use_qw else F0
        for b in range(cols // 32):
            e = b * 32
            o = b * Q5_0_BYTES
            if use_qw:
                _imatrix_weights(x, r, e, qw, sigma2, w)
                d = make_qx_quants(32, 16, x[r, e : e + 32], L, w, 0, True)
                store_f16(out, r, o, d)
            else:
                d = _signed_max(x, r, e, 32) / np.float32(-16.0)
                inv = F1 / d if d != 0 else F0
                store_f16(out, r, o, d)
                for j in range(32):
                    L[j] = _trunc_u8(x[r, e + j] * inv + np.float32(16.5), 31)
            _pack5(L, out, r, o + 2)


@njit(cache=True, inline="always")
def _pack5(L: np.ndarray, out: np.ndarray, r: int, o: int) -> None:
    # 4 bytes of fifth bits (bit j for weight j), then the low nibbles as Q4_0
    qh = 0
    for j in range(32):
        qh |= ((L[j] >> 4) & 1) << j
    for k in range(4):
        out[r, o + k] = np.uint8((qh >> (8 * k)) & 0xFF)
    for j in range(16):
        out[r, o + 4 + j] = np.uint8((L[j] & 15) | ((L[j + 16] & 15) << 4))


@njit(cache=True, inline="always")
def _min_max(x: np.ndarray, r: int, e: int) -> tuple[np.float32, np.float32]:
    mn = FLT_MAX
    mx = -mn
    for j in range(32):
        v = x[r, e + j]
        if v < mn:
            mn = v
        if v > mx:
            mx = v
    return mn, mx


@njit(cache=True, parallel=True)
def quantize_q4_1(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q4_1_ref (d = (max - min) / 15, m = min) or quantize_row_q4_1_impl with weights."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(32, np.int32)
        Laux = np.zeros(32, np.int32)
        w = np.zeros(32, np.float32)
        sigma2 = _sigma2(x, r) if use_qw else F0
        for b in range(cols // 32):
            e = b * 32
            o = b * Q4_1_BYTES
            if use_qw:
                _imatrix_weights(x, r, e, qw, sigma2, w)
                d, mn = make_qkx3_quants(32, 15, x[r, e : e + 32], w, True, L, Laux, -0.9, 0.05, 36, False)
                store_f16(out, r, o, d)
                store_f16(out, r, o + 2, -mn)
            else:
                mn, mx = _min_max(x, r, e)
                d = (mx - mn) / np.float32(15.0)
                inv = F1 / d if d != 0 else F0
                store_f16(out, r, o, d)
                store_f16(out, r, o + 2, mn)
                for j in range(32):
                    L[j] = _trunc_u8((x[r, e + j] - mn) * inv + np.float32(0.5), 15)
            for j in range(16):
                out[r, o + 4 + j] = np.uint8(L[j] | (L[j + 16] << 4))


@njit(cache=True, parallel=True)
def quantize_q5_1(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_1_ref (d = (max - min) / 31, m = min) or quantize_row_q5_1_impl with weights."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(32, np.int32)
        Laux = np.zeros(32, np.int32)
        w = np.zeros(32, np.float32)
        sigma2 = _sigma2(x, r) if use_qw else F0
        for b in range(cols // 32):
            e = b * 32
            o = b * Q5_1_BYTES
            if use_qw:
                _imatrix_weights(x, r, e, qw, sigma2, w)
                d, mn = make_qkx3_quants(32, 31, x[r, e : e + 32], w, True, L, Laux, -0.9, 0.05, 36, False)
                store_f16(out, r, o, d)
                store_f16(out, r, o + 2, -mn)
            else:
                mn, mx = _min_max(x, r, e)
                d = (mx - mn) / np.float32(31.0)
                inv = F1 / d if d != 0 else F0
                store_f16(out, r, o, d)
                store_f16(out, r, o + 2, mn)
                for j in range(32):
                    # the C has no MIN(31, .) here: (x - min) / d never rounds past 31.5
                    L[j] = _trunc_u8((x[r, e + j] - mn) * inv + np.float32(0.5), 31)
            _pack5(L, out, r, o + 4)
