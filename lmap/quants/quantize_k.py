"""K-quant quantizers (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): llama.cpp's search algorithms, bit for bit.

Each kernel is ``(x f32[rows, cols], qw f32[cols or 0], out u8[rows, row_bytes])``, parallel over
rows, ``cols % 256 == 0``. Without importance weights (``qw`` empty) it is ggml-quants.c's
quantize_row_<fmt>_ref; with them, quantize_row_<fmt>_impl (what ggml_quantize_chunk picks).

Both paths end the same way: pick per-sub-block (scale, min) by a search, quantize those to 4 or
6 bits against an f16 super-scale, then requantize the weights against the *rounded* scales,
so the stored levels match what the dequantizer will multiply. Integer wraps of the C (uint8 /
int8 stores of a nearest_int) are kept with explicit masks, so even degenerate blocks match.
fastmath stays off: the float32 rounding order decides the bytes.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .quantize_search import (
    F0,
    F1,
    GROUP_MAX_EPS,
    load_f16,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
    nearest_int,
    store_f16,
)

QK_K = 256
Q2_K_BYTES = 84
Q3_K_BYTES = 110
Q4_K_BYTES = 144
Q5_K_BYTES = 176
Q6_K_BYTES = 210


@njit(cache=True, inline="always")
def _sum_sq(x: np.ndarray, r: int, e: int, n: int) -> np.float32:
    s = F0
    for j in range(n):
        s += x[r, e + j] * x[r, e + j]
    return s


@njit(cache=True, inline="always")
def _pack_2bit(L: np.ndarray, out: np.ndarray, r: int, o: int) -> None:
    # weight 128n + 32j + k -> bits 2j..2j+1 of byte 32n + k
    for h in range(2):
        for k in range(32):
            b = h * 128 + k
            out[r, o + 32 * h + k] = np.uint8(L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6))


# ----------------------------------------------------------------------------- Q2_K


@njit(cache=True, parallel=True)
def quantize_q2_k(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q2_K_ref (make_qkx2_quants, |x| weights) or quantize_row_q2_K_impl (make_qkx3 + make_qp)."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(QK_K, np.int32)
        Laux = np.zeros(16, np.int32)
        weights = np.zeros(16, np.float32)
        scales = np.zeros(16, np.float32)
        mins = np.zeros(16, np.float32)
        sw = np.zeros(16, np.float32)
        Ls = np.zeros(16, np.int32)
        Lm = np.zeros(16, np.int32)
        for i in range(cols // QK_K):
            e = i * QK_K
            o = i * Q2_K_BYTES
            if use_qw:
                sigma2 = _sum_sq(x, r, e, QK_K) / np.float32(QK_K)
                for j in range(16):
                    sw[j] = F0
                    for q in range(16):
                        v = x[r, e + 16 * j + q]
                        weights[q] = qw[e + 16 * j + q] * np.sqrt(sigma2 + v * v)
                    for q in range(16):
                        sw[j] += weights[q]
                    scales[j], mins[j] = make_qkx3_quants(
                        16, 3, x[r, e + 16 * j : e + 16 * j + 16], weights, True,
                        L[16 * j : 16 * j + 16], Laux, -0.9, 0.05, 36, False,
                    )  # fmt: skip
                dm = make_qp_quants(16, 15, scales, Ls, sw)
                mm = make_qp_quants(16, 15, mins, Lm, sw)
                store_f16(out, r, o + 80, dm)
                store_f16(out, r, o + 82, mm)
                for j in range(16):
                    out[r, o + j] = np.uint8((Ls[j] | (Lm[j] << 4)) & 0xFF)
            else:
                max_scale = F0
                max_min = F0
                for j in range(16):
                    for q in range(16):
                        weights[q] = abs(x[r, e + 16 * j + q])
                    scales[j], mins[j] = make_qkx2_quants(
                        16, 3, x[r, e + 16 * j : e + 16 * j + 16], weights,
                        L[16 * j : 16 * j + 16], Laux, -0.5, 0.1, 15, True,
                    )  # fmt: skip
                    if scales[j] > max_scale:
                        max_scale = scales[j]
                    if mins[j] > max_min:
                        max_min = mins[j]
                if max_scale > 0:
                    iscale = np.float32(15.0) / max_scale
                    for j in range(16):
                        out[r, o + j] = np.uint8(nearest_int(iscale * scales[j]) & 0xFF)
                    store_f16(out, r, o + 80, max_scale / np.float32(15.0))
                else:
                    for j in range(16):
                        out[r, o + j] = 0
                    store_f16(out, r, o + 80, F0)
                if max_min > 0:
                    iscale = np.float32(15.0) / max_min
                    for j in range(16):
                        q = nearest_int(iscale * mins[j])
                        out[r, o + j] = np.uint8((np.int64(out[r, o + j]) | (q << 4)) & 0xFF)
                    store_f16(out, r, o + 82, max_min / np.float32(15.0))
                else:
                    store_f16(out, r, o + 82, F0)
            dh = load_f16(out, r, o + 80)
            mh = load_f16(out, r, o + 82)
            for j in range(16):
                sc = np.int32(out[r, o + j])
                d = dh * np.float32(sc & 0xF)
                if d == 0:
                    continue
                m = mh * np.float32(sc >> 4)
                for k in range(16):
                    q = nearest_int((x[r, e + 16 * j + k] + m) / d)
                    L[16 * j + k] = max(0, min(3, q))
            _pack_2bit(L, out, r, o + 16)


# ----------------------------------------------------------------------------- Q3_K


@njit(cache=True, inline="always")
def _pack_scales_q3(ls: np.ndarray, out: np.ndarray, r: int, o: int) -> None:
    """Sixteen 6-bit values (0..63) into 12 bytes: low nibbles in bytes 0..7, top 2 bits in 8..11."""
    for k in range(12):
        out[r, o + k] = 0
    for j in range(16):
        q = ls[j]
        if j < 8:
            out[r, o + j] = np.uint8(q & 0xF)
        else:
            out[r, o + j - 8] |= np.uint8((q & 0xF) << 4)
        q >>= 4
        out[r, o + j % 4 + 8] |= np.uint8((q << (2 * (j // 4))) & 0xFF)


@njit(cache=True, parallel=True)
def quantize_q3_k(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q3_K_ref (make_q3_quants) or quantize_row_q3_K_impl (weighted make_qx_quants)."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(QK_K, np.int32)
        weight = np.zeros(16, np.float32)
        scales = np.zeros(16, np.float32)
        sw = np.zeros(16, np.float32)
        Ls = np.zeros(16, np.int32)
        for i in range(cols // QK_K):
            e = i * QK_K
            o = i * Q3_K_BYTES
            so = o + 96  # scales
            if use_qw:
                sigma2 = np.float32(2.0) * _sum_sq(x, r, e, QK_K) / np.float32(QK_K)
                for j in range(16):
                    for q in range(16):
                        v = x[r, e + 16 * j + q]
                        weight[q] = qw[e + 16 * j + q] * np.sqrt(sigma2 + v * v)
                    sumw = F0
                    for q in range(16):
                        sumw += weight[q]
                    sw[j] = sumw
                    scales[j] = make_qx_quants(
                        16, 4, x[r, e + 16 * j : e + 16 * j + 16], L[16 * j : 16 * j + 16], weight, 0, True
                    )
                d_block = make_qx_quants(16, 32, scales, Ls, sw, 0, True)
                _pack_scales_q3(Ls, out, r, so)
                store_f16(out, r, o + 108, d_block)
            else:
                max_scale = F0
                amax = F0
                for j in range(16):
                    scales[j] = make_q3_quants(16, 4, x[r, e + 16 * j : e + 16 * j + 16], L[16 * j : 16 * j + 16], True)
                    s = abs(scales[j])
                    if s > amax:
                        amax = s
                        max_scale = scales[j]
                if max_scale != 0:
                    iscale = np.float32(-32.0) / max_scale
                    for j in range(16):
                        q = nearest_int(iscale * scales[j])
                        q = ((q + 128) & 0xFF) - 128  # the C keeps it in an int8_t
                        Ls[j] = max(-32, min(31, q)) + 32
                    _pack_scales_q3(Ls, out, r, so)
                    store_f16(out, r, o + 108, F1 / iscale)
                else:
                    for k in range(12):
                        out[r, so + k] = 0
                    store_f16(out, r, o + 108, F0)
            dh = load_f16(out, r, o + 108)
            for j in range(16):
                sc = np.int32(out[r, so + j]) & 0xF if j < 8 else np.int32(out[r, so + j - 8]) >> 4
                sc = (sc | (((np.int32(out[r, so + 8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32
                d = dh * np.float32(sc)
                if d == 0:
                    continue
                for k in range(16):
                    q = nearest_int(x[r, e + 16 * j + k] / d)
                    L[16 * j + k] = max(-4, min(3, q)) + 4
            # third bits: weight j sets bit j // 32 of hmask[j % 32]
            for k in range(32):
                out[r, o + k] = 0
            for j in range(QK_K):
                if L[j] > 3:
                    out[r, o + j % 32] |= np.uint8(1 << (j // 32))
                    L[j] -= 4
            _pack_2bit(L, out, r, o + 32)


# ----------------------------------------------------------------------------- Q4_K / Q5_K


@njit(cache=True, inline="always")
def _pack_scales_k4(Ls: np.ndarray, Lm: np.ndarray, out: np.ndarray, r: int, o: int) -> None:
    """Eight 6-bit (scale, min) pairs into 12 bytes, the inverse of get_scale_min_k4.

    The values are the C's uint8_t ls / lm, already masked to 0..255.
    """
    for j in range(8):
        ls = Ls[j]
        lm = Lm[j]
        if j < 4:
            out[r, o + j] = np.uint8(ls)
            out[r, o + j + 4] = np.uint8(lm)
        else:
            out[r, o + j + 4] = np.uint8(((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF)
            out[r, o + j - 4] |= np.uint8(((ls >> 4) << 6) & 0xFF)
            out[r, o + j] |= np.uint8(((lm >> 4) << 6) & 0xFF)


@njit(cache=True, inline="always")
def _scale_min_k4(out: np.ndarray, r: int, o: int, j: int) -> tuple[int, int]:
    if j < 4:
        return np.int32(out[r, o + j]) & 63, np.int32(out[r, o + j + 4]) & 63
    sc = (np.int32(out[r, o + j + 4]) & 0xF) | ((np.int32(out[r, o + j - 4]) >> 6) << 4)
    m = (np.int32(out[r, o + j + 4]) >> 4) | ((np.int32(out[r, o + j]) >> 6) << 4)
    return sc, m


@njit(cache=True, inline="always")
def _k4_block(
    x: np.ndarray,
    qw: np.ndarray,
    use_qw: bool,
    r: int,
    e: int,
    o: int,
    nmax: int,
    out: np.ndarray,
    L: np.ndarray,
    Laux: np.ndarray,
    weights: np.ndarray,
    scales: np.ndarray,
    mins: np.ndarray,
    sw: np.ndarray,
    Ls: np.ndarray,
    Lm: np.ndarray,
) -> None:
    """Scales, mins and levels L[0..255] of one Q4_K (nmax 15) or Q5_K (nmax 31) super-block.

    Writes d, dmin and the 12 scale bytes at out[r, o : o + 16]; the caller packs L.
    """
    q4 = nmax == 15
    if use_qw:
        sigma2 = np.float32(2.0) * _sum_sq(x, r, e, QK_K) / np.float32(QK_K)
        for j in range(8):
            for q in range(32):
                v = x[r, e + 32 * j + q]
                weights[q] = qw[e + 32 * j + q] * np.sqrt(sigma2 + v * v)
            sumw = F0
            for q in range(32):
                sumw += weights[q]
            sw[j] = sumw
            scales[j], mins[j] = make_qkx3_quants(
                32, nmax, x[r, e + 32 * j : e + 32 * j + 32], weights, True,
                L[32 * j : 32 * j + 32], Laux, -0.9, 0.05, 36, False,
            )  # fmt: skip
        d_block = make_qp_quants(8, 63, scales, Ls, sw)
        m_block = make_qp_quants(8, 63, mins, Lm, sw)
        if not q4:  # only quantize_row_q5_K_impl clamps
            for j in range(8):
                Ls[j] = min(63, Ls[j])
                Lm[j] = min(63, Lm[j])
        _pack_scales_k4(Ls, Lm, out, r, o + 4)
        store_f16(out, r, o, d_block)
        store_f16(out, r, o + 2, m_block)
    else:
        max_scale = F0
        max_min = F0
        for j in range(8):
            av_x = np.sqrt(_sum_sq(x, r, e + 32 * j, 32) / np.float32(32.0))
            for q in range(32):
                weights[q] = av_x + abs(x[r, e + 32 * j + q])
            scales[j], mins[j] = make_qkx2_quants(
                32, nmax, x[r, e + 32 * j : e + 32 * j + 32], weights,
                L[32 * j : 32 * j + 32], Laux,
                -1.0 if q4 else -0.5, 0.1, 20 if q4 else 15, False,
            )  # fmt: skip
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else F0
        inv_min = np.float32(63.0) / max_min if max_min > 0 else F0
        for j in range(8):
            Ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
            Lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        _pack_scales_k4(Ls, Lm, out, r, o + 4)
        store_f16(out, r, o, max_scale / np.float32(63.0))
        store_f16(out, r, o + 2, max_min / np.float32(63.0))
    dh = load_f16(out, r, o)
    mh = load_f16(out, r, o + 2)
    for j in range(8):
        sc, m = _scale_min_k4(out, r, o + 4, j)
        d = dh * np.float32(sc)
        if d == 0:
            continue
        dm = mh * np.float32(m)
        for k in range(32):
            q = nearest_int((x[r, e + 32 * j + k] + dm) / d)
            L[32 * j + k] = max(0, min(nmax, q))


@njit(cache=True, parallel=True)
def quantize_q4_k(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q4_K_ref (make_qkx2_quants) or quantize_row_q4_K_impl (make_qkx3 + make_qp)."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(QK_K, np.int32)
        Laux = np.zeros(32, np.int32)
        weights = np.zeros(32, np.float32)
        scales = np.zeros(8, np.float32)
        mins = np.zeros(8, np.float32)
        sw = np.zeros(8, np.float32)
        Ls = np.zeros(8, np.int32)
        Lm = np.zeros(8, np.int32)
        for i in range(cols // QK_K):
            e = i * QK_K
            o = i * Q4_K_BYTES
            _k4_block(x, qw, use_qw, r, e, o, 15, out, L, Laux, weights, scales, mins, sw, Ls, Lm)
            # sub-blocks 2g and 2g + 1 share bytes 32g..32g+31: low and high nibbles
            for g in range(4):
                for k in range(32):
                    out[r, o + 16 + 32 * g + k] = np.uint8(L[64 * g + k] | (L[64 * g + 32 + k] << 4))


@njit(cache=True, parallel=True)
def quantize_q5_k(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q5_K_ref (make_qkx2_quants) or quantize_row_q5_K_impl (make_qkx3 + make_qp)."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(QK_K, np.int32)
        Laux = np.zeros(32, np.int32)
        weights = np.zeros(32, np.float32)
        scales = np.zeros(8, np.float32)
        mins = np.zeros(8, np.float32)
        sw = np.zeros(8, np.float32)
        Ls = np.zeros(8, np.int32)
        Lm = np.zeros(8, np.int32)
        for i in range(cols // QK_K):
            e = i * QK_K
            o = i * Q5_K_BYTES
            _k4_block(x, qw, use_qw, r, e, o, 31, out, L, Laux, weights, scales, mins, sw, Ls, Lm)
            # fifth bit of weight 64g + 32h + k (h = 0, 1) is bit 2g + h of qh[k]
            for k in range(32):
                out[r, o + 16 + k] = 0
            for g in range(4):
                for k in range(32):
                    l1 = L[64 * g + k]
                    l2 = L[64 * g + 32 + k]
                    hb = 0
                    if l1 > 15:
                        l1 -= 16
                        hb |= 1 << (2 * g)
                    if l2 > 15:
                        l2 -= 16
                        hb |= 2 << (2 * g)
                    out[r, o + 16 + k] |= np.uint8(hb)
                    out[r, o + 48 + 32 * g + k] = np.uint8(l1 | (l2 << 4))


# ----------------------------------------------------------------------------- Q6_K


@njit(cache=True, parallel=True)
def quantize_q6_k(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    """quantize_row_q6_K_ref / _impl: make_qx_quants per 16 (weights x^2, or the importance itself)."""
    rows, cols = x.shape
    use_qw = qw.shape[0] > 0
    for r in prange(rows):
        L = np.zeros(QK_K, np.int32)
        scales = np.zeros(16, np.float32)
        for i in range(cols // QK_K):
            e = i * QK_K
            o = i * Q6_K_BYTES
            max_scale = F0
            max_abs_scale = F0
            for ib in range(16):
                # the _impl passes the importance straight through (its sigma2 weighting is commented out)
                scale = make_qx_quants(
                    16, 32, x[r, e + 16 * ib : e + 16 * ib + 16], L[16 * ib : 16 * ib + 16], qw, e + 16 * ib, use_qw
                )
                scales[ib] = scale
                a = abs(scale)
                if a > max_abs_scale:
                    max_abs_scale = a
                    max_scale = scale
            if max_abs_scale < GROUP_MAX_EPS:
                for k in range(Q6_K_BYTES):
                    out[r, o + k] = 0
                continue
            iscale = np.float32(-128.0) / max_scale
            store_f16(out, r, o + 208, F1 / iscale)
            for ib in range(16):
                out[r, o + 192 + ib] = np.uint8(min(127, nearest_int(iscale * scales[ib])) & 0xFF)
            dh = load_f16(out, r, o + 208)
            for j in range(16):
                d = dh * np.float32(np.int8(out[r, o + 192 + j]))
                if d == 0:
                    continue
                for k in range(16):
                    q = nearest_int(x[r, e + 16 * j + k] / d)
                    L[16 * j + k] = max(-32, min(31, q)) + 32
            for h in range(2):
                for k in range(32):
                    b = 128 * h + k
                    q1 = L[b] & 0xF
                    q2 = L[b + 32] & 0xF
                    q3 = L[b + 64] & 0xF
                    q4 = L[b + 96] & 0xF
                    out[r, o + 64 * h + k] = np.uint8(q1 | (q3 << 4))
                    out[r, o + 64 * h + 32 + k] = np.uint8(q2 | (q4 << 4))
                    out[r, o + 128 + 32 * h + k] = np.uint8(
                        (L[b] >> 4) | ((L[b + 32] >> 4) << 2) | ((L[b + 64] >> 4) << 4) | ((L[b + 96] >> 4) << 6)
                    )
