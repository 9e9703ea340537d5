"""Transformer building blocks as Numba kernels writing into preallocated outputs.

Shapes use n = tokens in the batch, H = query heads, Hkv = key/value heads,
hd = head dimension, C = context cells. KV caches are float32 or IEEE half
stored as uint16 (Numba has no float16 on the CPU); ``_f32`` reads either.
"""

from __future__ import annotations

import functools
import math

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .half import (
    float_to_half,
    half_to_float,
    weighted_rows_f16_64,
    weighted_rows_f16_128,
    weighted_rows_f16_256,
)
from .vexp import exp8_inplace, silu_mul8
from .vround import round_q8_block


def _f32(x):  # type: ignore[no-untyped-def]
    raise NotImplementedError  # only called from compiled code


@overload(_f32, inline="always")
def _f32_impl(x):  # type: ignore[no-untyped-def]
    if x == types.uint16:
        return lambda x: half_to_float(x)
    return lambda x: np.float32(x)


# Decode batches (one token, or one row per server slot) are too small to share out: a parallel
# launch costs more than the work, and would wake pool threads that compete with decode's spinning
# team (team.py). Each row-wise kernel is therefore an inline row body with a serial and a
# parallel loop around it, and a dispatcher that picks by the number of rows.
SERIAL_ROWS = 8
SPANS_SERIAL_ROWS = 8


@njit(cache=True, fastmath=True, inline="always")
def _rmsnorm_row(x, w, eps, out, t):  # type: ignore[no-untyped-def]
    d = x.shape[1]
    ss = np.float32(0.0)
    for i in range(d):
        ss += x[t, i] * x[t, i]
    # llama.cpp sums in float and scales by 1/sqrt(mean + eps)
    scale = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(d) + np.float32(eps)))
    for i in range(d):
        out[t, i] = x[t, i] * scale * w[i]


@njit(cache=True, fastmath=True)
def rmsnorm_serial(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    for t in range(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


@njit(cache=True, fastmath=True, parallel=True)
def rmsnorm_parallel(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    for t in prange(x.shape[0]):
        _rmsnorm_row(x, w, eps, out, t)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float, out: np.ndarray) -> None:
    """out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * w  (x, out: [n, d]; may alias)."""
    (rmsnorm_serial if x.shape[0] <= SERIAL_ROWS else rmsnorm_parallel)(x, w, eps, out)


@njit(cache=True, fastmath=True, inline="always")
def _rmsnorm_head(x, w, eps, th):  # type: ignore[no-untyped-def]
    nh, hd = x.shape[1], x.shape[2]
    t = th // nh
    h = th % nh
    ss = np.float32(0.0)
    for i in range(hd):
        ss += x[t, h, i] * x[t, h, i]
    scale = np.float32(1.0) / np.float32(math.sqrt(ss / np.float32(hd) + np.float32(eps)))
    for i in range(hd):
        x[t, h, i] = x[t, h, i] * scale * w[i]


@njit(cache=True, fastmath=True)
def rmsnorm_heads_serial(x: np.ndarray, w: np.ndarray, eps: float) -> None:
    for th in range(x.shape[0] * x.shape[1]):
        _rmsnorm_head(x, w, eps, th)


@njit(cache=True, fastmath=True, parallel=True)
def rmsnorm_heads_parallel(x: np.ndarray, w: np.ndarray, eps: float) -> None:
    for th in prange(x.shape[0] * x.shape[1]):
        _rmsnorm_head(x, w, eps, th)


def rmsnorm_heads(x: np.ndarray, w: np.ndarray, eps: float) -> None:
    """In-place per-head RMSNorm (x: [n, H, hd], w: [hd]), the Q/K norm of gemma3 and qwen3."""
    (rmsnorm_heads_serial if x.shape[0] <= SERIAL_ROWS else rmsnorm_heads_parallel)(x, w, eps)


@njit(cache=True, fastmath=False)
def rope_cache(
    pos: np.ndarray, n_rot: int, freq_base: float, freq_scale: float, cos: np.ndarray, sin: np.ndarray
) -> None:
    """cos/sin[t, i] of the rotation angles for positions ``pos`` ([n] int32 -> [n, n_rot/2]).

    Angles follow ggml's rope cache: theta_0 = p * freq_scale, theta_{i+1} = theta_i * base^(-2/n_rot),
    accumulated in float32 as llama.cpp does. Computed once per forward pass, shared by all layers.
    """
    theta_scale = np.float32(freq_base ** (-2.0 / n_rot))
    for t in range(pos.shape[0]):
        theta = np.float32(pos[t]) * np.float32(freq_scale)
        for i in range(n_rot // 2):
            cos[t, i] = np.float32(math.cos(theta))
            sin[t, i] = np.float32(math.sin(theta))
            theta = np.float32(theta * theta_scale)


@njit(cache=True, fastmath=True, inline="always")
def _rope_head(x, cos, sin, neox, th):  # type: ignore[no-untyped-def]
    nh = x.shape[1]
    half = cos.shape[1]
    t = th // nh
    h = th % nh
    for i in range(half):
        if neox:
            a = i
            b = i + half
        else:
            a = 2 * i
            b = 2 * i + 1
        x0 = x[t, h, a]
        x1 = x[t, h, b]
        x[t, h, a] = x0 * cos[t, i] - x1 * sin[t, i]
        x[t, h, b] = x0 * sin[t, i] + x1 * cos[t, i]


@njit(cache=True, fastmath=True)
def rope_serial(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    for th in range(x.shape[0] * x.shape[1]):
        _rope_head(x, cos, sin, neox, th)


@njit(cache=True, fastmath=True, parallel=True)
def rope_parallel(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    for th in prange(x.shape[0] * x.shape[1]):
        _rope_head(x, cos, sin, neox, th)


def rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, neox: bool) -> None:
    """Rotate the first n_rot = 2 * cos.shape[1] dims of every head in place (x: [n, H, hd]).

    "norm" rope (llama) rotates adjacent pairs (2i, 2i+1); "neox" rope (gemma, qwen)
    rotates (i, i + n_rot/2).
    """
    (rope_serial if x.shape[0] <= SERIAL_ROWS else rope_parallel)(x, cos, sin, neox)


@njit(cache=True, fastmath=True)
def store_kv_f16(src: np.ndarray, cache: np.ndarray, cells: np.ndarray) -> None:
    """cache[cells[t]] = half(src[t])  (src: [n, Hkv, hd] float32, cache: [C, Hkv, hd] uint16)."""
    n, nh, hd = src.shape
    for t in range(n):
        c = cells[t]
        for h in range(nh):
            for i in range(hd):
                cache[c, h, i] = float_to_half(src[t, h, i])


@njit(cache=True, fastmath=True)
def store_kv_f32(src: np.ndarray, cache: np.ndarray, cells: np.ndarray) -> None:
    n = src.shape[0]
    for t in range(n):
        cache[cells[t]] = src[t]


@njit(cache=True, fastmath=False)
def store_kv_q8_0(src: np.ndarray, cache: np.ndarray, cells: np.ndarray) -> None:
    """cache[cells[t]] = Q8_0 blocks of src[t] (cache: [C, Hkv, hd / 32 * 34] uint8), as quantize_row_q8_0.

    Per block of 32: d = amax / 127 stored as f16 (little-endian), q = rint(x / d) as int8.
    """
    n, nh, hd = src.shape
    for t in range(n):
        c = cells[t]
        for h in range(nh):
            for b in range(hd // 32):
                amax = np.float32(0.0)
                for j in range(32):
                    amax = max(amax, abs(src[t, h, b * 32 + j]))
                d = amax / np.float32(127.0)
                inv = np.float32(1.0) / d if d != 0.0 else np.float32(0.0)
                dh = float_to_half(d)
                o = b * 34
                cache[c, h, o] = np.uint8(dh & np.uint16(0xFF))
                cache[c, h, o + 1] = np.uint8(dh >> np.uint16(8))
                for j in range(32):
                    cache[c, h, o + 2 + j] = np.uint8(np.int32(np.rint(src[t, h, b * 32 + j] * inv)) & 0xFF)


# cache type name (lmap/kv_cache.py) -> the kernel that writes rows into it
STORE_KV = {"f16": store_kv_f16, "f32": store_kv_f32, "q8_0": store_kv_q8_0}


def _dot_row(q, t, h, k, c, kh):  # type: ignore[no-untyped-def]
    raise NotImplementedError  # only called from compiled code


@overload(_dot_row, inline="always")
def _dot_row_impl(q, t, h, k, c, kh):  # type: ignore[no-untyped-def]
    """dot(q[t, h], key row k[c, kh]) for a float32, half or Q8_0-block cache."""
    if k.dtype == types.uint8:

        def dot_q8(q, t, h, k, c, kh):  # type: ignore[no-untyped-def]
            d = np.float32(0.0)
            for b in range(q.shape[2] // 32):
                o = b * 34
                scale = half_to_float(np.uint16(k[c, kh, o]) | (np.uint16(k[c, kh, o + 1]) << np.uint16(8)))
                s = np.float32(0.0)
                for j in range(32):
                    s += q[t, h, b * 32 + j] * np.float32(np.int8(k[c, kh, o + 2 + j]))
                d += scale * s
            return d

        return dot_q8

    def dot(q, t, h, k, c, kh):  # type: ignore[no-untyped-def]
        d = np.float32(0.0)
        for i in range(q.shape[2]):
            d += q[t, h, i] * _f32(k[c, kh, i])
        return d

    return dot


def _acc_row(out, t, h, w, v, c, kh):  # type: ignore[no-untyped-def]
    raise NotImplementedError  # only called from compiled code


@overload(_acc_row, inline="always")
def _acc_row_impl(out, t, h, w, v, c, kh):  # type: ignore[no-untyped-def]
    """out[t, h] += w * value row v[c, kh] for a float32, half or Q8_0-block cache."""
    if v.dtype == types.uint8:

        def acc_q8(out, t, h, w, v, c, kh):  # type: ignore[no-untyped-def]
            for b in range(out.shape[2] // 32):
                o = b * 34
                ws = w * half_to_float(np.uint16(v[c, kh, o]) | (np.uint16(v[c, kh, o + 1]) << np.uint16(8)))
                for j in range(32):
                    out[t, h, b * 32 + j] += ws * np.float32(np.int8(v[c, kh, o + 2 + j]))

        return acc_q8

    def acc(out, t, h, w, v, c, kh):  # type: ignore[no-untyped-def]
        for i in range(out.shape[2]):
            out[t, h, i] += w * _f32(v[c, kh, i])

    return acc


@njit(cache=True, fastmath=True, inline="always")
def _attend(q, k, v, cell_pos, t, h, kh, p, c0, c1, sc, window, softcap, s, out):  # type: ignore[no-untyped-def]
    """out[t, h] = attention of query head (t, h) at position p over cells [c0, c1); scores in s[: c1 - c0].

    Shared by both kernels below so a sequence gets the same float operations in the same
    order whether it attends alone or in a batch of sequences.
    """
    hd = q.shape[2]
    lo = p - window if window > 0 else -1
    n_cells = c1 - c0
    mx = np.float32(-np.inf)
    visible = False
    for j in range(n_cells):
        c = c0 + j
        cp = cell_pos[c]
        if cp < 0 or cp > p or cp <= lo:
            s[j] = np.float32(-np.inf)
            continue
        visible = True
        d = _dot_row(q, t, h, k, c, kh)
        d *= sc
        if softcap > 0.0:
            d = np.float32(softcap) * np.float32(math.tanh(d / np.float32(softcap)))
        s[j] = d
        if d > mx:
            mx = d
    if not visible:  # (a flag: under fastmath a comparison with -inf may be folded away)
        for i in range(hd):
            out[t, h, i] = np.float32(0.0)
        return
    # exp 8 scores at a time (a libm call per score was a third of decode attention); masked
    # scores are -inf and come out 0
    for j in range(n_cells):
        s[j] -= mx
    n8 = n_cells // 8 * 8
    base = s.ctypes.data
    for j in range(0, n8, 8):
        exp8_inplace(base + 4 * j)
    for j in range(n8, n_cells):
        s[j] = np.float32(math.exp(s[j]))
    total = np.float32(0.0)
    for j in range(n_cells):
        total += s[j]
    _weighted_sum(out, t, h, s, np.float32(1.0) / total, v, c0, n_cells, kh)


@njit(cache=True, fastmath=True, inline="always")
def _weighted_sum_rows(out, t, h, s, inv, v, c0, n_cells, kh):  # type: ignore[no-untyped-def]
    """out[t, h] = sum over j < n_cells of s[j] * inv * value row v[c0 + j, kh], row by row (weight-0 rows skipped)."""
    for i in range(out.shape[2]):
        out[t, h, i] = np.float32(0.0)
    for j in range(n_cells):
        w = s[j] * inv
        if w != 0.0:
            _acc_row(out, t, h, w, v, c0 + j, kh)


def _weighted_sum(out, t, h, s, inv, v, c0, n_cells, kh):  # type: ignore[no-untyped-def]
    raise NotImplementedError  # only called from compiled code


@overload(_weighted_sum, inline="always")
def _weighted_sum_impl(out, t, h, s, inv, v, c0, n_cells, kh):  # type: ignore[no-untyped-def]
    """:func:`_weighted_sum_rows`, its sums held in registers for half caches of head size 64, 128 or 256."""
    if v.dtype != types.uint16:

        def rows(out, t, h, s, inv, v, c0, n_cells, kh):  # type: ignore[no-untyped-def]
            _weighted_sum_rows(out, t, h, s, inv, v, c0, n_cells, kh)

        return rows

    def half_rows(out, t, h, s, inv, v, c0, n_cells, kh):  # type: ignore[no-untyped-def]
        hd = out.shape[2]
        if out.strides[2] != 4 or v.strides[2] != 2 or s.strides[0] != 4 or hd not in (64, 128, 256):
            _weighted_sum_rows(out, t, h, s, inv, v, c0, n_cells, kh)
            return
        oa = out.ctypes.data + t * out.strides[0] + h * out.strides[1]
        va = v.ctypes.data + c0 * v.strides[0] + kh * v.strides[1]
        if hd == 64:
            weighted_rows_f16_64(oa, s.ctypes.data, inv, va, v.strides[0], n_cells)
        elif hd == 128:
            weighted_rows_f16_128(oa, s.ctypes.data, inv, va, v.strides[0], n_cells)
        else:
            weighted_rows_f16_256(oa, s.ctypes.data, inv, va, v.strides[0], n_cells)

    return half_rows


@njit(cache=True, fastmath=True, inline="always")
def _attend_item(q, k, v, pos, cell_pos, i, c0, c1, sc, window, softcap, s, out):  # type: ignore[no-untyped-def]
    """Item i = (row i // H, head i % H) over cells [c0, c1): what every attention loop runs per item.

    The serial, prange and team kernels all go through here, so a row's arithmetic cannot drift
    between them.
    """
    nh = q.shape[1]
    t = i // nh
    h = i % nh
    kh = h // (nh // k.shape[1])
    _attend(q, k, v, cell_pos, t, h, kh, pos[t], c0, c1, sc, window, softcap, s, out)


@njit(cache=True, fastmath=True, parallel=True)
def attention_parallel(
    q: np.ndarray,  # [n, H, hd] float32
    k: np.ndarray,  # [C, Hkv, hd] cache (float32 or uint16 half)
    v: np.ndarray,  # [C, Hkv, hd]
    pos: np.ndarray,  # [n] int32: position of each query
    cell_pos: np.ndarray,  # [C] int32: position held by each cell, -1 if empty
    n_cells: int,  # cells [0, n_cells) may be valid
    scale: float,
    window: int,  # 0: full causal; w > 0: a query at p sees positions (p - w, p]
    softcap: float,  # 0: none; else scores = softcap * tanh(scores / softcap)
    scores: np.ndarray,  # [n_threads, C] scratch
    out: np.ndarray,  # [n, H, hd]
) -> None:
    """Causal (optionally sliding-window) grouped-query attention over the cache.

    Keys are visible to a query when 0 <= cell_pos <= pos (and within the window),
    so the cache can hold cells in any order (context shift, sliding windows).
    """
    n, nh, _ = q.shape
    sc = np.float32(scale)
    for th in prange(n * nh):
        _attend_item(q, k, v, pos, cell_pos, th, 0, n_cells, sc, window, softcap, scores[numba.get_thread_id()], out)


@njit(cache=True, fastmath=True)
def attention_serial(
    q: np.ndarray,  # [n, H, hd] float32
    k: np.ndarray,  # [C, Hkv, hd] cache (float32 or uint16 half)
    v: np.ndarray,  # [C, Hkv, hd]
    pos: np.ndarray,  # [n] int32: position of each query
    cell_pos: np.ndarray,  # [C] int32: position held by each cell, -1 if empty
    n_cells: int,  # cells [0, n_cells) may be valid
    scale: float,
    window: int,  # 0: full causal; w > 0: a query at p sees positions (p - w, p]
    softcap: float,  # 0: none; else scores = softcap * tanh(scores / softcap)
    scores: np.ndarray,  # [n_threads, C] scratch
    out: np.ndarray,  # [n, H, hd]
) -> None:
    """:func:`attention_parallel` in one thread (one query token: decode)."""
    n, nh, _ = q.shape
    sc = np.float32(scale)
    for th in range(n * nh):
        _attend_item(q, k, v, pos, cell_pos, th, 0, n_cells, sc, window, softcap, scores[0], out)


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    pos: np.ndarray,
    cell_pos: np.ndarray,
    n_cells: int,
    scale: float,
    window: int,
    softcap: float,
    scores: np.ndarray,
    out: np.ndarray,
) -> None:
    """Causal (optionally sliding-window) grouped-query attention over the cache (see attention_parallel)."""
    kernel = attention_serial if q.shape[0] == 1 else attention_parallel
    kernel(q, k, v, pos, cell_pos, n_cells, scale, window, softcap, scores, out)


@njit(cache=True, fastmath=True, parallel=True)
def attention_spans_parallel(
    q: np.ndarray,  # [n, H, hd] float32: one query row per sequence
    k: np.ndarray,  # [C, Hkv, hd] cache shared by the sequences
    v: np.ndarray,  # [C, Hkv, hd]
    pos: np.ndarray,  # [n] int32: position of each query
    cell_pos: np.ndarray,  # [C] int32: position held by each cell, -1 if empty
    spans: np.ndarray,  # [n, 2] int32: query t sees cells [spans[t, 0], spans[t, 1]) (its sequence's)
    scale: float,
    window: int,
    softcap: float,
    scores: np.ndarray,  # [n_threads, >= longest span] scratch
    out: np.ndarray,  # [n, H, hd]
) -> None:
    """:func:`attention` for queries of different sequences, each over its own cells of one cache.

    Gives every query exactly the result :func:`attention` gives it over a view of its span.
    """
    n, nh, _ = q.shape
    sc = np.float32(scale)
    for th in prange(n * nh):
        t = th // nh
        s = scores[numba.get_thread_id()]
        _attend_item(q, k, v, pos, cell_pos, th, spans[t, 0], spans[t, 1], sc, window, softcap, s, out)


@njit(cache=True, fastmath=True)
def attention_spans_serial(
    q: np.ndarray,  # [n, H, hd] float32: one query row per sequence
    k: np.ndarray,  # [C, Hkv, hd] cache shared by the sequences
    v: np.ndarray,  # [C, Hkv, hd]
    pos: np.ndarray,  # [n] int32: position of each query
    cell_pos: np.ndarray,  # [C] int32: position held by each cell, -1 if empty
    spans: np.ndarray,  # [n, 2] int32: query t sees cells [spans[t, 0], spans[t, 1]) (its sequence's)
    scale: float,
    window: int,
    softcap: float,
    scores: np.ndarray,  # [n_threads, >= longest span] scratch
    out: np.ndarray,  # [n, H, hd]
) -> None:
    """:func:`attention_spans_parallel` in one thread."""
    n, nh, _ = q.shape
    sc = np.float32(scale)
    for th in range(n * nh):
        t = th // nh
        _attend_item(q, k, v, pos, cell_pos, th, spans[t, 0], spans[t, 1], sc, window, softcap, scores[0], out)


def attention_spans(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    pos: np.ndarray,
    cell_pos: np.ndarray,
    spans: np.ndarray,
    scale: float,
    window: int,
    softcap: float,
    scores: np.ndarray,
    out: np.ndarray,
) -> None:
    """Attention of one query row per sequence over its own cells (see attention_spans_parallel)."""
    kernel = attention_spans_serial if q.shape[0] <= SPANS_SERIAL_ROWS else attention_spans_parallel
    kernel(q, k, v, pos, cell_pos, spans, scale, window, softcap, scores, out)


@njit(cache=True, fastmath=True, inline="always")
def _swiglu_row(gate, up, t):  # type: ignore[no-untyped-def]
    f = gate.shape[1]
    f8 = f // 8 * 8
    gp = gate.ctypes.data + t * gate.strides[0]
    up_ = up.ctypes.data + t * up.strides[0]
    for i in range(0, f8, 8):  # 8 lanes at a time: math.exp would be a scalar libm call
        silu_mul8(gp + 4 * i, up_ + 4 * i)
    for i in range(f8, f):
        g = gate[t, i]
        gate[t, i] = g / (np.float32(1.0) + np.float32(math.exp(-g))) * up[t, i]


@njit(cache=True, fastmath=True)
def swiglu_serial(gate: np.ndarray, up: np.ndarray) -> None:
    for t in range(gate.shape[0]):
        _swiglu_row(gate, up, t)


@njit(cache=True, fastmath=True, parallel=True)
def swiglu_parallel(gate: np.ndarray, up: np.ndarray) -> None:
    for t in prange(gate.shape[0]):
        _swiglu_row(gate, up, t)


def swiglu(gate: np.ndarray, up: np.ndarray) -> None:
    """gate = silu(gate) * up, in place ([n, ff])."""
    (swiglu_serial if gate.shape[0] <= SERIAL_ROWS else swiglu_parallel)(gate, up)


@functools.cache
def gelu_f16_table() -> np.ndarray:
    """gelu_tanh at every IEEE half, rounded to half: ggml's ggml_table_gelu_f16 (as float32 [65536]).

    llama.cpp computes GELU by looking up the half-rounded input in this table (GGML_GELU_FP16):
    the same table gives the same activations, and a gather is ~10x cheaper than tanh here. Made
    on first use (3 ms), by the models that use GELU.
    """
    x = np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32)
    with np.errstate(all="ignore"):
        c = np.float32(math.sqrt(2.0 / math.pi))
        # tanh in float64 then rounded: glibc's tanhf is (almost always) correctly rounded, NumPy's float32 tanh not
        th = np.tanh((c * x * (np.float32(1.0) + np.float32(0.044715) * x * x)).astype(np.float64)).astype(np.float32)
        g = np.float32(0.5) * x * (np.float32(1.0) + th)
    return g.astype(np.float16).astype(np.float32)


EXACT = np.zeros(0, np.float32)  # pass as ``table`` for the exact float32 function


@njit(cache=True, fastmath=True, inline="always")
def _geglu_row(gate, up, table, t):  # type: ignore[no-untyped-def]
    c = np.float32(math.sqrt(2.0 / math.pi))
    lookup = table.shape[0] > 0
    for i in range(gate.shape[1]):
        x = gate[t, i]
        if lookup:
            if x <= np.float32(-10.0):
                g = np.float32(0.0)
            elif x >= np.float32(10.0):
                g = x
            else:
                g = table[float_to_half(x)]
        else:
            g = (
                np.float32(0.5)
                * x
                * (np.float32(1.0) + np.float32(math.tanh(c * x * (np.float32(1.0) + np.float32(0.044715) * x * x))))
            )
        gate[t, i] = g * up[t, i]


@njit(cache=True, fastmath=True)
def geglu_serial(gate: np.ndarray, up: np.ndarray, table: np.ndarray) -> None:
    for t in range(gate.shape[0]):
        _geglu_row(gate, up, table, t)


@njit(cache=True, fastmath=True, parallel=True)
def geglu_parallel(gate: np.ndarray, up: np.ndarray, table: np.ndarray) -> None:
    for t in prange(gate.shape[0]):
        _geglu_row(gate, up, table, t)


def geglu(gate: np.ndarray, up: np.ndarray, table: np.ndarray) -> None:
    """gate = gelu_tanh(gate) * up, in place ([n, ff]), as ggml_vec_geglu_f32.

    With ``table`` (:func:`gelu_f16_table`) it is llama.cpp's arithmetic: the input rounded to half indexes a
    table of half-rounded GELU values, |x| >= 10 short-circuited. With an empty table (EXACT), the
    float32 tanh formula (what transformers computes).
    """
    (geglu_serial if gate.shape[0] <= SERIAL_ROWS else geglu_parallel)(gate, up, table)


@njit(cache=True, fastmath=True)
def add_inplace(x: np.ndarray, y: np.ndarray) -> None:
    """x += y ([n, d])."""
    n, d = x.shape
    for t in range(n):
        for i in range(d):
            x[t, i] += y[t, i]


@njit(cache=True, fastmath=False, parallel=True)
def round_q8(x: np.ndarray, out: np.ndarray) -> None:
    """out = x after llama.cpp's 8-bit activation quantization (Q8_0/Q8_1 blocks of 32), dequantized.

    llama.cpp multiplies a quantized weight by activations quantized this way
    (quantize_row_q8_0/q8_1: d = amax / 127 kept as f16, q = round(x / d)); doing the
    same keeps lmap's logits within llama.cpp's own noise ([n, k], k % 32 == 0).
    A block is one vector (vround.py) when rows are contiguous, else the scalar twin below.
    """
    n, k = x.shape
    if x.strides[1] != 4 or out.strides[1] != 4:
        round_q8_scalar(x, out)
        return
    for t in prange(n):
        xa = x.ctypes.data + t * x.strides[0]
        oa = out.ctypes.data + t * out.strides[0]
        for b in range(k // 32):
            round_q8_block(xa + 128 * b, oa + 128 * b)


@njit(cache=True, fastmath=False)
def round_q8_scalar(x: np.ndarray, out: np.ndarray) -> None:
    """:func:`round_q8` one activation at a time (strided arrays; the reference its vector form must equal)."""
    n, k = x.shape
    for t in range(n):
        for b in range(k // 32):
            amax = np.float32(0.0)
            for j in range(32):
                a = abs(x[t, b * 32 + j])
                if a > amax:
                    amax = a
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0.0 else np.float32(0.0)
            dh = half_to_float(float_to_half(d))
            for j in range(32):
                out[t, b * 32 + j] = dh * np.float32(np.rint(x[t, b * 32 + j] * inv))


@njit(cache=True, fastmath=False, parallel=True)
def round_f16(x: np.ndarray, out: np.ndarray) -> None:
    """out = x rounded to IEEE half (what llama.cpp does to activations meeting F16 weights)."""
    n, k = x.shape
    for t in prange(n):
        for i in range(k):
            out[t, i] = half_to_float(float_to_half(x[t, i]))


@njit(cache=True, fastmath=False)
def quantize_q8(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    """Quantize activations x[k] to Q8_1 blocks of 32: int8 xq[k], f16-rounded scales xd[k/32], xs = f16(d * sum q).

    llama.cpp's quantize_row_q8_1 (Q8_0 is the same without xs), done once per matrix-vector product.
    """
    for b in range(x.shape[0] // 32):
        amax = np.float32(0.0)
        for j in range(32):
            a = abs(x[b * 32 + j])
            if a > amax:
                amax = a
        d = amax / np.float32(127.0)
        inv = np.float32(1.0) / d if d != 0.0 else np.float32(0.0)
        s = 0
        for j in range(32):
            q = np.int32(np.rint(x[b * 32 + j] * inv))
            xq[b * 32 + j] = np.int8(q)
            s += q
        xd[b] = half_to_float(float_to_half(d))
        xs[b] = half_to_float(float_to_half(np.float32(s) * d))
