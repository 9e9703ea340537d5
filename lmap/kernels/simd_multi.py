"""A chunk of a decode product in one intrinsic per format: rows [r0, r1) times n activation rows.

When N sequences decode together, each weight row meets N activation rows. Calling the
one-row intrinsic N times rebuilds the row's weights (nibble unpacking, fifth bits,
super-block scales) N times; at N = 4 that work made a batched step compute-bound
(SmolLM2: 121 tok/s for 4 rows against 122 for 2). Here each block's weights are rebuilt
once and multiplied with up to 4 activation blocks, each sequence accumulating in its own
<8 x float> register exactly as the one-row intrinsic does (same products, same order, same
final sum), so every sequence still gets bit-for-bit the logits it gets alone. For n = 1 (one
token) the loop runs ROWS weight rows side by side instead: each row's fma chain is the
one-row loop's, and two independent chains hide each other's latency (gemma3 at 1 thread,
min of 200: ffn gate+up Q5_0 132 -> 121 us, ffn_down Q4_K 45 -> 41 us; the bandwidth-bound
Q8_0 output head unchanged).

Signature: (w, w_stride, r0, r1, x, xd, xs, x_stride, d_stride, n, nb, out, out_stride) -> None,
addresses and byte strides as int64; writes float32 out + j * out_stride + 4 * r. For formats of
32-weight blocks the activation scales are block-major and d_stride is the stride between blocks
(their scales for all rows are one load, ~30 % less work per extra row); for super-block formats
they are row-major and d_stride is the stride between rows.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .simd import _block_dot, _f32, _fmadd, _half, _hsum, _i8, _i32, _load, _splat, _vec
from .simd import _c64 as _c
from .simd_more import _half as _half_int
from .simd_more import (
    _iq4_levels,
    _loop,
    _nibbles,
    _q2_k,
    _q3_k,
    _q4_k,
    _q5_bytes,
    _q5_k,
    _q6_k,
    _q8k_super_block,
)
from .simd_more import _iq4_xs as _iq4_xs_parts

_v8f = _vec(_f32, 8)
SIG = types.void(*([types.int64] * 13))
GROUP = 4  # activation rows sharing one rebuild of a weight block (4 accumulators + the block in registers)
ROWS = 2  # weight rows per loop for one activation row: independent fma chains hide their latency


PREFETCH_AHEAD = 8192  # bytes of weights ahead of the row being multiplied


def _prefetch_row(builder, addr, nbytes):  # type: ignore[no-untyped-def]
    """Prefetch ``nbytes`` from ``addr`` a cache line at a time (a prefetch past the end cannot fault)."""
    mod = builder.module
    ptr = ir.IntType(8).as_pointer()
    fn = mod.globals.get("llvm.prefetch.p0i8") or ir.Function(
        mod, ir.FunctionType(ir.VoidType(), [ptr, ir.IntType(32), ir.IntType(32), ir.IntType(32)]), "llvm.prefetch.p0i8"
    )
    i32 = ir.IntType(32)
    with cgutils.for_range(builder, builder.sdiv(builder.add(nbytes, _c(63)), _c(64))) as line:
        a = builder.add(addr, builder.mul(line.index, _c(64)))
        builder.call(fn, [builder.inttoptr(a, ptr), ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _dots(builder, wrs, x, xd, xs, xst, dst, nb, count, block_bytes, block_x, weights, per_x):  # type: ignore[no-untyped-def]
    """[[dot(row at wr, activation row j) for j < count] for wr in wrs]: the block loop, weights once.

    Several weight rows (``wrs``) run as independent accumulator chains in one loop, so a
    one-token product is not bound by the latency of each row's fma chain; every row's
    arithmetic is the one-row loop's, operation for operation.
    """
    xj = [builder.add(x, builder.mul(_c(j), xst)) for j in range(count)]
    dj = [builder.add(xd, builder.mul(_c(j), dst)) for j in range(count)]
    sj = [builder.add(xs, builder.mul(_c(j), dst)) for j in range(count)]
    k = len(wrs) * count

    def body(b, vals):  # type: ignore[no-untyped-def]
        accs, offs = [], []
        for i, wr in enumerate(wrs):
            wb = builder.add(wr, builder.mul(b, _c(block_bytes)))
            wts = weights(builder, wb)
            for j in range(count):
                xb = builder.add(xj[j], builder.mul(b, _c(block_x)))
                a, o = per_x(builder, wts, wb, xb, dj[j], sj[j], b, vals[i * count + j], vals[k + i * count + j])
                accs.append(a)
                offs.append(o)
        return accs + offs

    vals = _loop(builder, nb, [ir.Constant(_v8f, None)] * k + [ir.Constant(_f32, 0.0)] * k, body)
    res = [builder.fadd(_hsum(builder, vals[i]), vals[k + i]) for i in range(k)]
    return [res[i * count : (i + 1) * count] for i in range(len(wrs))]


def _chunk_kernel(name: str, block_bytes: int, block_x: int, weights, per_x, with_min: bool | None = None):  # type: ignore[no-untyped-def]
    """The chunk intrinsic of one format: per row, groups of GROUP activation rows, then 2, then 1.

    ``with_min`` set (True/False): a 32-weight-block format, whose activation scales are
    block-major (``d_stride`` is then the stride between blocks, rows 4 bytes apart); None: a
    super-block format with row-major activation scales (``d_stride`` between rows).
    """

    def chunk(typingctx, w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost = args

            def group(wrs, orows, j0, count):  # type: ignore[no-untyped-def]
                if with_min is not None:
                    at = builder.mul(j0, _c(4))
                    res = _dots32(
                        builder,
                        wrs,
                        builder.add(x, builder.mul(j0, xst)),
                        builder.add(xd, at),
                        builder.add(xs, at),
                        xst,
                        dst,
                        nb,
                        count,
                        block_bytes,
                        weights,
                        with_min,
                    )
                else:
                    res = _dots(
                        builder,
                        wrs,
                        builder.add(x, builder.mul(j0, xst)),
                        builder.add(xd, builder.mul(j0, dst)),
                        builder.add(xs, builder.mul(j0, dst)),
                        xst,
                        dst,
                        nb,
                        count,
                        block_bytes,
                        block_x,
                        weights,
                        per_x,
                    )
                for orow, vals in zip(orows, res, strict=True):
                    for j, v in enumerate(vals):
                        addr = builder.add(orow, builder.mul(builder.add(j0, _c(j)), ost))
                        builder.store(v, builder.inttoptr(addr, _f32.as_pointer()), align=4)

            full = builder.sdiv(n, _c(GROUP))
            j_pair = builder.mul(full, _c(GROUP))
            rest = builder.sub(n, j_pair)
            has_pair = builder.icmp_signed(">=", rest, _c(2))
            j_one = builder.add(j_pair, builder.select(has_pair, _c(2), _c(0)))
            has_one = builder.icmp_signed("!=", builder.and_(rest, _c(1)), _c(0))
            one_token = builder.icmp_signed("==", n, _c(1))
            with builder.if_else(one_token, likely=True) as (decode, batch):
                with decode:  # one activation row: ROWS weight rows per loop, then the odd ones
                    span = builder.sub(r1, r0)
                    n_multi = builder.sdiv(span, _c(ROWS))
                    with cgutils.for_range(builder, n_multi) as loop:
                        r = builder.add(r0, builder.mul(loop.index, _c(ROWS)))
                        wr = builder.add(w, builder.mul(r, ws))
                        _prefetch_row(builder, builder.add(wr, _c(PREFETCH_AHEAD)), builder.mul(ws, _c(ROWS)))
                        wrs = [builder.add(wr, builder.mul(_c(i), ws)) for i in range(ROWS)]
                        orows = [builder.add(out, builder.mul(builder.add(r, _c(i)), _c(4))) for i in range(ROWS)]
                        group(wrs, orows, _c(0), 1)
                    with cgutils.for_range(builder, r1, start=builder.add(r0, builder.mul(n_multi, _c(ROWS)))) as loop:
                        r = loop.index
                        wr = builder.add(w, builder.mul(r, ws))
                        _prefetch_row(builder, builder.add(wr, _c(PREFETCH_AHEAD)), ws)
                        group([wr], [builder.add(out, builder.mul(r, _c(4)))], _c(0), 1)
                with batch, cgutils.for_range(builder, r1, start=r0) as loop:
                    r = loop.index
                    wr = builder.add(w, builder.mul(r, ws))
                    orow = builder.add(out, builder.mul(r, _c(4)))
                    _prefetch_row(builder, builder.add(wr, _c(PREFETCH_AHEAD)), ws)
                    with cgutils.for_range(builder, full) as g:
                        group([wr], [orow], builder.mul(g.index, _c(GROUP)), GROUP)
                    with builder.if_then(has_pair):
                        group([wr], [orow], j_pair, 2)
                    with builder.if_then(has_one, likely=True):
                        group([wr], [orow], j_one, 1)
            return context.get_dummy_value()

        return SIG, codegen

    chunk.__name__ = chunk.__qualname__ = f"chunk_{name}"
    return intrinsic(chunk)


def _dots32(builder, wrs, x, xd, xs, xst, bst, nb, count, block_bytes, weights, with_min):  # type: ignore[no-untyped-def]
    """[[dot(row at wr, activation row j) for j < count] for wr in wrs] of a format with 32-weight blocks.

    The activations' scales and sums are laid out block-major (``xd + 4 * j + b * bst``), so
    block b's scales of all ``count`` rows are one load and their products with the weight
    block's (d, m) one multiply each; the per-row arithmetic (d * xd splat into an fma, a
    running sum of m * xs, the final hsum + offset) is the one-row kernel's, operation for
    operation, so each row's result is bit-for-bit the same. Several weight rows (``wrs``) are
    independent chains in one loop, as in :func:`_dots`.
    """
    vc = _vec(_f32, count)
    xj = [builder.add(x, builder.mul(_c(j), xst)) for j in range(count)]
    lanes = [ir.Constant(_vec(_i32, 8), [j] * 8) for j in range(count)]
    undef = ir.Constant(vc, ir.Undefined)
    nr = len(wrs)

    def body(b, vals):  # type: ignore[no-untyped-def]
        boff = builder.mul(b, bst)
        xdn = _load(builder, builder.add(xd, boff), vc, 4)
        xsn = _load(builder, builder.add(xs, boff), vc, 4) if with_min else None
        xvs = [_load(builder, builder.add(xj[j], builder.mul(b, _c(32))), _vec(_i8, 32)) for j in range(count)]
        accs, offs = [], []
        for i, wr in enumerate(wrs):
            wb = builder.add(wr, builder.mul(b, _c(block_bytes)))
            q, signed, d = weights(builder, wb)
            off = vals[nr * count + i]
            if with_min:  # the weight block starts with f16 (d, m): one load, one conversion
                dm = builder.fpext(_load(builder, wb, _vec(ir.HalfType(), 2)), _vec(_f32, 2))
                ds = builder.shuffle_vector(dm, dm, ir.Constant(_vec(_i32, count), [0] * count))
                ms = builder.shuffle_vector(dm, dm, ir.Constant(_vec(_i32, count), [1] * count))
                off = builder.fadd(off, builder.fmul(ms, xsn))
            else:
                ds = _splat(builder, d, count)
            scales = builder.fmul(ds, xdn)
            for j in range(count):
                sj = builder.shuffle_vector(scales, undef, lanes[j])
                dot = _block_dot(builder, q, xvs[j], signed_q=signed)
                accs.append(_fmadd(builder, dot, sj, vals[i * count + j]))
            offs.append(off)
        return [*accs, *offs]

    vals = _loop(builder, nb, [ir.Constant(_v8f, None)] * (nr * count) + [ir.Constant(vc, None)] * nr, body)
    return [
        [
            builder.fadd(_hsum(builder, vals[i * count + j]), builder.extract_element(vals[nr * count + i], _c32(j)))
            for j in range(count)
        ]
        for i in range(nr)
    ]


def _c32(v: int) -> ir.Constant:
    return ir.Constant(_i32, v)


def _per_x256(builder, sb, wb, xb, xdj, xsj, b, acc, off):  # type: ignore[no-untyped-def]
    xdb = _load(builder, builder.add(xdj, builder.mul(b, _c(4))), _f32, 4)
    return _q8k_super_block(builder, sb, xb, xdb, [acc])[0], off


def _q8_0_w(builder, wb):  # type: ignore[no-untyped-def]
    return _load(builder, builder.add(wb, _c(2)), _vec(_i8, 32)), True, _half(builder, wb)


def _q4_0_w(builder, wb):  # type: ignore[no-untyped-def]
    q = builder.sub(_nibbles(builder, builder.add(wb, _c(2))), ir.Constant(_vec(_i8, 32), [8] * 32))
    return q, True, _half(builder, wb)


def _q4_1_w(builder, wb):  # type: ignore[no-untyped-def]
    return _nibbles(builder, builder.add(wb, _c(4))), False, None


def _q5_0_w(builder, wb):  # type: ignore[no-untyped-def]
    return _q5_bytes(builder, builder.add(wb, _c(2)), builder.add(wb, _c(6)), 0, 0xF0), True, _half_int(builder, wb)


def _q5_1_w(builder, wb):  # type: ignore[no-untyped-def]
    return _q5_bytes(builder, builder.add(wb, _c(4)), builder.add(wb, _c(8)), 16, 0), False, None


def _iq4_nl_w(builder, wb):  # type: ignore[no-untyped-def]
    return _iq4_levels(builder, _nibbles(builder, builder.add(wb, _c(2)))), True, _half_int(builder, wb)


chunk_q8_0 = _chunk_kernel("q8_0", 34, 32, _q8_0_w, None, with_min=False)
chunk_q4_0 = _chunk_kernel("q4_0", 18, 32, _q4_0_w, None, with_min=False)
chunk_q4_1 = _chunk_kernel("q4_1", 20, 32, _q4_1_w, None, with_min=True)
chunk_q5_0 = _chunk_kernel("q5_0", 22, 32, _q5_0_w, None, with_min=False)
chunk_q5_1 = _chunk_kernel("q5_1", 24, 32, _q5_1_w, None, with_min=True)
chunk_iq4_nl = _chunk_kernel("iq4_nl", 18, 32, _iq4_nl_w, None, with_min=False)
chunk_q2_k = _chunk_kernel("q2_k", 84, 256, _q2_k, _per_x256)
chunk_q3_k = _chunk_kernel("q3_k", 110, 256, _q3_k, _per_x256)
chunk_q4_k = _chunk_kernel("q4_k", 144, 256, _q4_k, _per_x256)
chunk_q5_k = _chunk_kernel("q5_k", 176, 256, _q5_k, _per_x256)
chunk_q6_k = _chunk_kernel("q6_k", 210, 256, _q6_k, _per_x256)
chunk_iq4_xs = _chunk_kernel("iq4_xs", 136, 256, _iq4_xs_parts, _per_x256)
