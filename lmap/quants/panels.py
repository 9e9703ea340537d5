"""Prompt products in integers: weights unpacked to byte panels, times 8-bit activations.

For a batch of n prompt tokens, ``out[n, rows] = x[n, cols] @ W.T`` runs here when the
format has a packer below and the CPU has AVX512-VNNI (see lmap.kernels.igemm, which also
describes the panel layout). The activations are quantized once per product exactly as
llama.cpp quantizes them (Q8_0 blocks of 32, or Q8_K blocks of 256 for the K-quants), so
the sums are the ones the rounded-float BLAS path computed, without the float tile: each
thread unpacks 32 weight rows at a time into a panel that stays in its L1/L2 cache and
multiplies it with all n rows. Measured on the 2-core Zen 5 VM, 512 x 640 @ 640 x 2048:
the micro-kernel 680 GFLOP/s per core against OpenBLAS sgemm's 212.

The packers read 4 weight bytes as one 32-bit word and split nibbles with masks (SWAR):
four weights of one column are exactly the 4 bytes the panel wants per group, so packing
is two or three word operations per 8 weights, not a scalar loop over bytes.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from ..errors import InvalidParameterError
from ..kernels.atomics import atomic_add, store_f32
from ..kernels.chunks import CfuncTable
from ..kernels.half import half_to_float
from ..kernels.igemm import PANEL, VNNI512, load_u8, load_u16, load_u32, store_u32
from ..kernels.vround import quant_q8_block, quant_q8_k_block_s16, quant_q8_k_block_s32

# format -> (id in the compiled dispatch, inputs per scale sub-block)
FORMATS: dict[str, tuple[int, int]] = {
    "Q8_0": (0, 32),
    "Q4_0": (1, 32),
    "Q4_1": (2, 32),
    "Q5_0": (3, 32),
    "Q5_1": (4, 32),
    "Q4_K": (5, 32),
    "Q5_K": (6, 32),
    "Q6_K": (7, 16),
}
Q8_K_FROM = 5  # ids from here on meet Q8_K activations (256-blocks); below, Q8_0/Q8_1 (32-blocks)

LO4 = 0x0F0F0F0F


@njit(cache=True, inline="always")
def _spread(b):  # type: ignore[no-untyped-def]
    """Bit t of the 4-bit b moved to bit 4 of byte t: the fifth bits of 4 weights."""
    return ((b & 1) << 4) | ((b & 2) << 11) | ((b & 4) << 18) | ((b & 8) << 25)


_S32_C2, _S32_C1, _S16_C2, _S16_C1 = PANEL[(32, 2)], PANEL[(32, 1)], PANEL[(16, 2)], PANEL[(16, 1)]
COLS = 32  # columns per panel (two 16-lane registers); a 16-column panel takes a remainder


def act_class(fid: int) -> int:
    """Which activation quantization format ``fid`` meets: 0 Q8_0, 1 Q8_K in sub-blocks of 32, 2 of 16."""
    return 0 if fid < Q8_K_FROM else (2 if fid == 7 else 1)


def format_id(fmt: str, rows: int, cols: int) -> int:
    """The compiled dispatch id of a ``[rows, cols]`` matrix of ``fmt``, or -1 where it takes the float path."""
    return FORMATS[fmt][0] if supported(fmt, rows, cols) else -1


def panel_bytes(cols: int) -> int:
    """Bytes of one thread's panel scratch for inputs of width ``cols``: bytes, then a and b."""
    return COLS * cols + 2 * 4 * COLS * (cols // 16)


def supported(fmt: str, rows: int, cols: int) -> bool:
    """True when a ``[rows, cols]`` matrix of format ``fmt`` can take the integer prompt GEMM here."""
    if not VNNI512 or fmt not in FORMATS or rows % 16:
        return False
    return cols % (256 if fmt.endswith("_K") else 32) == 0


# -- packers: one weight row into column c of a panel --------------------------------------
# Everything is addressed by int64 (as the team's kernels): one compiled signature whatever the
# arrays' layout or writeability (a read-only mapped file and a --no-mmap copy are different
# Numba types, and each new type would compile these again mid-run).
@njit(cache=True, inline="always")
def _f16(addr):  # type: ignore[no-untyped-def]
    return half_to_float(np.uint16(load_u16(addr)))


@njit(cache=True, inline="always")
def _scale_min(addr, j):  # type: ignore[no-untyped-def]
    """(scale, min) of sub-block j of the 12 K-quant scale bytes at addr (llama.cpp's get_scale_min_k4)."""
    if j < 4:
        sc = load_u8(addr + j) & 63
        m = load_u8(addr + j + 4) & 63
    else:
        sc = (load_u8(addr + j + 4) & 15) | ((load_u8(addr + j - 4) >> 6) << 4)
        m = (load_u8(addr + j + 4) >> 4) | ((load_u8(addr + j) >> 6) << 4)
    return np.float32(sc), np.float32(m)


# pu: the panel's words ([cols / 4][C] uint32), pa / pb: a and b ([nsub][C] float32)
@njit(cache=True, inline="always")
def _put(pu, C, c, k, v):  # type: ignore[no-untyped-def]
    store_u32(pu + 4 * ((k >> 2) * C + c), v)


@njit(cache=True, inline="always")
def _put_ab(pa, pb, C, c, s, a, b):  # type: ignore[no-untyped-def]
    store_f32(pa + 4 * (s * C + c), np.float32(a))
    store_f32(pb + 4 * (s * C + c), np.float32(b))


@njit(cache=True, inline="always")
def _pack_q8_0(row, cols, pu, pa, pb, C, c, _):  # type: ignore[no-untyped-def]
    """Q8_0: 34 bytes = d, q[32]; u = q + 128."""
    for b in range(cols // 32):
        o = 34 * b
        d = _f16(row + o)
        for k in range(0, 32, 4):
            _put(pu, C, c, 32 * b + k, load_u32(row + o + 2 + k) ^ 0x80808080)
        _put_ab(pa, pb, C, c, b, d, np.float32(-128.0) * d)


@njit(cache=True, inline="always")
def _pack_q4(row, cols, pu, pa, pb, C, c, with_min):  # type: ignore[no-untyped-def]
    """Q4_0: 18 bytes = d, qs[16]; Q4_1: 20 = d, m, qs[16]."""
    bb = 20 if with_min else 18
    q0 = 4 if with_min else 2
    for b in range(cols // 32):
        o = bb * b
        d = _f16(row + o)
        for k in range(0, 16, 4):
            v = load_u32(row + o + q0 + k)
            _put(pu, C, c, 32 * b + k, v & LO4)
            _put(pu, C, c, 32 * b + 16 + k, (v >> 4) & LO4)
        _put_ab(pa, pb, C, c, b, d, _f16(row + o + 2) if with_min else np.float32(-8.0) * d)


@njit(cache=True, inline="always")
def _pack_q5(row, cols, pu, pa, pb, C, c, with_min):  # type: ignore[no-untyped-def]
    """Q5_0: 22 bytes = d, qh[4], qs[16]; Q5_1: 24 = d, m, qh, qs."""
    bb = 24 if with_min else 22
    h0 = 4 if with_min else 2
    for b in range(cols // 32):
        o = bb * b
        d = _f16(row + o)
        qh = load_u32(row + o + h0)
        for k in range(0, 16, 4):
            v = load_u32(row + o + h0 + 4 + k)
            _put(pu, C, c, 32 * b + k, (v & LO4) | _spread((qh >> k) & 15))
            _put(pu, C, c, 32 * b + 16 + k, ((v >> 4) & LO4) | _spread((qh >> (16 + k)) & 15))
        _put_ab(pa, pb, C, c, b, d, _f16(row + o + 2) if with_min else np.float32(-16.0) * d)


@njit(cache=True, inline="always")
def _pack_qk(row, cols, pu, pa, pb, C, c, fifth):  # type: ignore[no-untyped-def]
    """Q4_K: 144 bytes = d, dmin, scales[12], qs[128]; Q5_K: 176, with qh[32] before qs."""
    bb = 176 if fifth else 144
    qs0 = 48 if fifth else 16
    for b in range(cols // 256):
        o = bb * b
        d = _f16(row + o)
        dmin = _f16(row + o + 2)
        for g in range(4):
            e = 256 * b + 64 * g
            for k in range(0, 32, 4):
                v = load_u32(row + o + qs0 + 32 * g + k)
                lo = v & LO4
                hi = (v >> 4) & LO4
                if fifth:
                    h = load_u32(row + o + 16 + k) >> (2 * g)
                    lo |= (h & 0x01010101) << 4
                    hi |= (h & 0x02020202) << 3
                _put(pu, C, c, e + k, lo)
                _put(pu, C, c, e + 32 + k, hi)
            for t in range(2):
                sc, m = _scale_min(row + o + 4, 2 * g + t)
                _put_ab(pa, pb, C, c, 8 * b + 2 * g + t, d * sc, -(dmin * m))


@njit(cache=True, inline="always")
def _pack_q6_k(row, cols, pu, pa, pb, C, c, _):  # type: ignore[no-untyped-def]
    """Q6_K: 210 bytes = ql[128], qh[64], scales int8[16], d; u = q in 0..63, w = d * sc * (u - 32)."""
    for b in range(cols // 256):
        o = 210 * b
        d = _f16(row + o + 208)
        for s in range(16):
            ds = d * np.float32(np.int8(load_u8(row + o + 192 + s)))
            _put_ab(pa, pb, C, c, 16 * b + s, ds, np.float32(-32.0) * ds)
        for n in range(2):
            for h in range(2):
                e = 256 * b + 128 * n + 16 * h
                for k in range(0, 16, 4):
                    a = load_u32(row + o + 64 * n + 16 * h + k)
                    cc = load_u32(row + o + 64 * n + 32 + 16 * h + k)
                    hh = load_u32(row + o + 128 + 32 * n + 16 * h + k)
                    _put(pu, C, c, e + k, (a & LO4) | ((hh & 0x03030303) << 4))
                    _put(pu, C, c, e + 32 + k, (cc & LO4) | ((hh & 0x0C0C0C0C) << 2))
                    _put(pu, C, c, e + 64 + k, ((a >> 4) & LO4) | (hh & 0x30303030))
                    _put(pu, C, c, e + 96 + k, ((cc >> 4) & LO4) | ((hh >> 2) & 0x30303030))


@njit(cache=True, inline="always")
def _panel(pack, flag, sub, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    """Panel p of W: pack its rows into pu (``pack`` with its format flag), then multiply it with all n rows."""
    C = COLS if (p + 1) * COLS <= rows else 16
    c0 = COLS * p
    nsub = cols // sub
    pa = pu + C * cols
    pb = pa + 4 * C * nsub
    for c in range(C):
        pack(w + (c0 + c) * ws, cols, pu, pa, pb, C, c, flag)
    if n == 0:  # pack only (tests read the panel back)
        return
    o = out + 4 * c0
    if sub == 32 and C == COLS:
        _S32_C2(pu, pa, pb, x, xst, d, s, sst, o, ost, n, nsub)
    elif sub == 32:
        _S32_C1(pu, pa, pb, x, xst, d, s, sst, o, ost, n, nsub)
    elif C == COLS:
        _S16_C2(pu, pa, pb, x, xst, d, s, sst, o, ost, n, nsub)
    else:
        _S16_C1(pu, pa, pb, x, xst, d, s, sst, o, ost, n, nsub)


# One C callable per format (top level, so Numba's cache finds them): the parallel driver below
# is compiled once and calls them by address, so a model compiles only its own formats' panels
# (a parallel function per format cost ~1.5 s of first-run compile each, these ~0.5 s).
def _panel_q8_0(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_q8_0, False, 32, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def _panel_q4_0(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_q4, False, 32, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def _panel_q4_1(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_q4, True, 32, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def _panel_q5_0(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_q5, False, 32, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def _panel_q5_1(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_q5, True, 32, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def _panel_q4_k(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_qk, False, 32, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def _panel_q5_k(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_qk, True, 32, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def _panel_q6_k(w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    _panel(_pack_q6_k, False, 16, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


_PANEL_FUNCS = [_panel_q8_0, _panel_q4_0, _panel_q4_1, _panel_q5_0, _panel_q5_1, _panel_q4_k, _panel_q5_k, _panel_q6_k]
_PANEL_SIG = types.void(*([types.int64] * 14))
_PANELS = CfuncTable(_PANEL_SIG, dict(enumerate(_PANEL_FUNCS)))


@intrinsic
def _call_panel(typingctx, fn, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p):  # type: ignore[no-untyped-def]
    """Call the panel function at address ``fn`` (void(int64 x 14))."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.VoidType(), [ir.IntType(64)] * 14)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()

    return types.void(*([types.int64] * 15)), codegen


@njit(cache=True, parallel=True)
def _gemm(fn, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pan, pst, nt, ctr):  # type: ignore[no-untyped-def]
    n_panels = rows // COLS + (rows % COLS) // 16
    for t in prange(nt):
        pu = pan + t * pst
        while True:
            p = atomic_add(ctr, 1)
            if p >= n_panels:
                break
            _call_panel(fn, w, ws, rows, cols, x, xst, n, d, s, sst, out, ost, pu, p)


def pack_panel(fmt: int, w: np.ndarray, r0: int, C: int, cols: int, panel: np.ndarray) -> None:
    """Rows r0 .. r0 + C of w (uint8 [rows, row bytes]) into ``panel`` (uint8, >= panel_bytes(cols))."""
    if panel.nbytes < panel_bytes(cols) or r0 + C > w.shape[0] or w.strides[1] != 1:
        raise InvalidParameterError(f"pack_panel: rows {r0}..{r0 + C} of {w.shape} into {panel.nbytes} bytes")
    if C not in (16, COLS):
        raise InvalidParameterError(f"pack_panel: panels are {COLS} or 16 columns, not {C}")
    # panel 0 of the C rows from r0 (n = 0 activation rows: pack only)
    wa = w.ctypes.data + r0 * w.strides[0]
    _PANEL_FUNCS_JIT[fmt](wa, w.strides[0], C, cols, 0, 0, 0, 0, 0, 0, 0, 0, panel.ctypes.data, 0)


# -- activations -------------------------------------------------------------------------
@njit(cache=True, parallel=True)
def _quantize_rows(fmt, x, xst, n, k, q, qst, dx, xs, sst):  # type: ignore[no-untyped-def]
    for t in prange(n):
        xa = x + t * xst
        qa = q + t * qst
        da = dx + t * sst
        sa = xs + t * sst
        if fmt < Q8_K_FROM:
            for b in range(k // 32):
                quant_q8_block(xa + 128 * b, qa + 32 * b, da + 4 * b, sa + 4 * b)
        elif fmt == 7:
            for b in range(k // 256):
                quant_q8_k_block_s16(xa + 1024 * b, qa + 256 * b, da + 64 * b, sa + 64 * b)
        else:
            for b in range(k // 256):
                quant_q8_k_block_s32(xa + 1024 * b, qa + 256 * b, da + 32 * b, sa + 32 * b)


def _rows_of(name: str, a: np.ndarray, dtype: type, shape: tuple[int, int]) -> None:
    """Rows may be strided; each row must be contiguous, of the dtype and shape the kernel reads."""
    if a.dtype != dtype or a.shape != shape or (a.shape[1] > 1 and a.strides[1] != a.itemsize):
        raise InvalidParameterError(
            f"{name}: need {np.dtype(dtype).name} {list(shape)} with contiguous rows, got {a.dtype} {list(a.shape)}"
        )


def quantize_rows(x: np.ndarray, fmt: int, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray) -> None:
    """xq[n, k] int8, dx / xs [n, k / sub] float32: x[n, k] quantized for format id ``fmt``'s products.

    Q8_0 blocks of 32 (f16 scale) for the 32-weight formats, Q8_K blocks of 256 for the K-quants:
    dx * xq is bit for bit the rounded activation the float path multiplies (ops.round_q8, round_q8_k).
    """
    n, k = x.shape
    sub = 16 if fmt == 7 else 32
    _rows_of("x", x, np.float32, (n, k))
    _rows_of("xq", xq, np.int8, (n, k))
    _rows_of("dx", dx, np.float32, (n, k // sub))
    _rows_of("xs", xs, np.float32, (n, k // sub))
    if k % (32 if fmt < Q8_K_FROM else 256) or dx.strides != xs.strides:
        raise InvalidParameterError(f"quantize_rows: {k} columns do not make whole blocks for format id {fmt}")
    _quantize_rows(
        fmt,
        x.ctypes.data,
        x.strides[0],
        n,
        k,
        xq.ctypes.data,
        xq.strides[0],
        dx.ctypes.data,
        xs.ctypes.data,
        dx.strides[0],
    )


# -- the product -------------------------------------------------------------------------
def gemm(
    fmt: int,
    w: np.ndarray,
    xq: np.ndarray,
    dx: np.ndarray,
    xs: np.ndarray,
    out: np.ndarray,
    panels: np.ndarray,
    counter: np.ndarray,
    threads: int,
) -> None:
    """out[n, rows] = (dx * xq) @ W.T for W (uint8 [rows, row bytes] of format id ``fmt``).

    W's panels are claimed by the threads one at a time (dynamic, so a thread the VM delays just
    takes fewer): ``panels`` uint8 [>= 1, panel_bytes(cols)] holds one panel per thread,
    ``counter`` int64[1] the claims, ``threads`` the caller's numba.get_num_threads() (asked
    here in Python: inside a compiled function it stops Numba from caching it).
    """
    n, cols = xq.shape
    rows = w.shape[0]
    sub = 16 if fmt == 7 else 32
    _rows_of("xq", xq, np.int8, (n, cols))
    _rows_of("dx", dx, np.float32, (n, cols // sub))
    _rows_of("xs", xs, np.float32, (n, cols // sub))
    _rows_of("out", out, np.float32, (n, rows))
    if rows % 16 or w.strides[1] != 1 or panels.shape[1] < panel_bytes(cols) or counter.dtype != np.int64:
        raise InvalidParameterError(f"gemm: weights {list(w.shape)} (rows in 16s), panels {list(panels.shape)}")
    n_panels = rows // COLS + (rows % COLS) // 16
    nt = max(1, min(int(threads), panels.shape[0], n_panels))
    counter[0] = 0
    _gemm(
        _PANELS.address(fmt),
        w.ctypes.data,
        w.strides[0],
        rows,
        cols,
        xq.ctypes.data,
        xq.strides[0],
        n,
        dx.ctypes.data,
        xs.ctypes.data,
        dx.strides[0],
        out.ctypes.data,
        out.strides[0],
        panels.ctypes.data,
        panels.strides[0],
        nt,
        counter.ctypes.data,
    )


# the panel functions as plain compiled functions too: pack_panel (tests) calls them from Python
_PANEL_FUNCS_JIT = [njit(cache=True)(f) for f in _PANEL_FUNCS]
