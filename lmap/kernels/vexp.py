"""exp over 8 floats at a time, as LLVM vector IR.

Numba lowers ``math.exp`` to a scalar libm call per element (no SVML here), which made
softmax the slowest part of prefill attention. This is the Cephes single-precision
polynomial (the one ggml's SIMD paths and most vector libraries use): range reduction
x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r, and 2^n built in the
exponent bits. Relative error ~2 ulp over [-87, 88]; inputs below -87 give 0 (they
only ever occur as masked or negligible softmax terms), above 88 give +inf.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_i32 = ir.IntType(32)
_f32 = ir.FloatType()
_V = 8
_vf = ir.VectorType(_f32, _V)
_vi = ir.VectorType(_i32, _V)

_COEFFS = [1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1]


def _c(x: float) -> ir.Constant:
    return ir.Constant(_vf, [x] * _V)


def _exp8(builder: ir.IRBuilder, x: ir.Value) -> ir.Value:
    lo = builder.fcmp_ordered("<", x, _c(-87.0))
    x = builder.select(builder.fcmp_ordered(">", x, _c(88.3762626647949)), _c(88.3762626647949), x)
    x = builder.select(lo, _c(-87.0), x)
    # n = round(x / ln2): floor(x * log2e + 0.5)
    mod = builder.module
    floor = mod.globals.get("llvm.floor.v8f32") or ir.Function(mod, ir.FunctionType(_vf, [_vf]), "llvm.floor.v8f32")
    n = builder.call(floor, [builder.fadd(builder.fmul(x, _c(1.44269504088896341)), _c(0.5))])
    # r = x - n ln2 in two steps (Cody-Waite) so the reduction stays exact
    r = builder.fsub(x, builder.fmul(n, _c(0.693359375)))
    r = builder.fsub(r, builder.fmul(n, _c(-2.12194440e-4)))
    p = _c(_COEFFS[0])
    for k in _COEFFS[1:]:
        p = builder.fadd(builder.fmul(p, r), _c(k))
    p = builder.fadd(builder.fadd(builder.fmul(builder.fmul(p, r), r), r), _c(1.0))
    # 2^n: n + 127 in the exponent field
    e = builder.shl(builder.add(builder.fptosi(n, _vi), ir.Constant(_vi, [127] * _V)), ir.Constant(_vi, [23] * _V))
    y = builder.fmul(p, builder.bitcast(e, _vf))
    return builder.select(lo, _c(0.0), y)


@intrinsic
def exp8_inplace(typingctx, addr):  # type: ignore[no-untyped-def]
    """a[0:8] = exp(a[0:8]) for the float32 array data at address ``addr``."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], _vf.as_pointer())
        builder.store(_exp8(builder, builder.load(ptr, align=4)), ptr, align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def silu_mul8(typingctx, g_addr, u_addr):  # type: ignore[no-untyped-def]
    """g[0:8] = silu(g[0:8]) * u[0:8] = g / (1 + exp(-g)) * u (float32 data at the two addresses)."""
    sig = types.void(types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        gp = builder.inttoptr(args[0], _vf.as_pointer())
        up = builder.inttoptr(args[1], _vf.as_pointer())
        g = builder.load(gp, align=4)
        e = _exp8(builder, builder.fsub(_c(0.0), g))
        y = builder.fmul(builder.fdiv(g, builder.fadd(_c(1.0), e)), builder.load(up, align=4))
        builder.store(y, gp, align=4)
        return context.get_dummy_value()

    return sig, codegen


LOWEST = -3.4028234663852886e38  # the lowest finite float32: "no visible cell" without infinities


def _visible(builder, cps, off, pv, lov):  # type: ignore[no-untyped-def]
    """<8 x i1>: lo < position <= p and position >= 0, for the 8 int32 cell positions at cps + 4 * off."""
    i64 = ir.IntType(64)
    cpp = builder.inttoptr(builder.add(cps, builder.mul(off, ir.Constant(i64, 4))), _vi.as_pointer())
    cp = builder.load(cpp, align=4)
    zero = ir.Constant(_vi, [0] * _V)
    inside = builder.and_(builder.icmp_signed(">=", cp, zero), builder.icmp_signed("<=", cp, pv))
    return builder.and_(inside, builder.icmp_signed(">", cp, lov))


@intrinsic
def masked_max(typingctx, row_addr, cp_addr, n8, p, lo):  # type: ignore[no-untyped-def]
    """Max of the first n8 (a multiple of 8) float32 scores at row_addr whose int32 cell position
    at cp_addr is visible (lo < position <= p, position >= 0); LOWEST where none is.

    The same loop in Numba ran at 0.7 ns a score; here the mask and the max stay in registers.
    """
    sig = types.float32(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        from .simd import _loop, _splat

        row, cps, n8_, p_, lo_ = args
        i64 = ir.IntType(64)
        pv, lov = _splat(builder, builder.trunc(p_, _i32), _V), _splat(builder, builder.trunc(lo_, _i32), _V)

        def body(b, vals):  # type: ignore[no-untyped-def]
            (acc,) = vals
            off = builder.mul(b, ir.Constant(i64, 8))
            rp = builder.inttoptr(builder.add(row, builder.mul(off, ir.Constant(i64, 4))), _vf.as_pointer())
            x = builder.load(rp, align=4)
            x = builder.select(_visible(builder, cps, off, pv, lov), x, _c(LOWEST))
            return [builder.select(builder.fcmp_ordered(">", x, acc), x, acc)]

        (acc,) = _loop(builder, builder.sdiv(n8_, ir.Constant(i64, 8)), [_c(LOWEST)], body)
        n = _V
        while n > 1:
            n //= 2
            a = builder.shuffle_vector(acc, acc, ir.Constant(ir.VectorType(_i32, n), list(range(n))))
            b = builder.shuffle_vector(acc, acc, ir.Constant(ir.VectorType(_i32, n), list(range(n, 2 * n))))
            acc = builder.select(builder.fcmp_ordered(">", a, b), a, b)
        return builder.extract_element(acc, ir.Constant(_i32, 0))

    return sig, codegen


@intrinsic
def masked_exp_sum(typingctx, row_addr, cp_addr, n8, p, lo, mx):  # type: ignore[no-untyped-def]
    """For the first n8 (a multiple of 8) float32 scores at row_addr, with int32 cell positions at
    cp_addr: score = exp(score - mx) where lo < position <= p (and position >= 0), else 0; returns
    the sum of the results.

    One pass, 8 lanes at a time, the mask and the sum in registers: the same loop in Numba
    kept the exp call's stores from vectorizing around it (4 ns a score instead of ~0.5).
    """
    sig = types.float32(types.int64, types.int64, types.int64, types.int64, types.int64, types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        from .simd import _hsum, _loop, _splat

        row, cps, n8_, p_, lo_, mx_ = args
        i64 = ir.IntType(64)
        pv, lov = _splat(builder, builder.trunc(p_, _i32), _V), _splat(builder, builder.trunc(lo_, _i32), _V)
        mxs = _splat(builder, mx_, _V)

        def body(b, vals):  # type: ignore[no-untyped-def]
            (acc,) = vals
            off = builder.mul(b, ir.Constant(i64, 8))
            rp = builder.inttoptr(builder.add(row, builder.mul(off, ir.Constant(i64, 4))), _vf.as_pointer())
            x = builder.load(rp, align=4)
            ok = _visible(builder, cps, off, pv, lov)
            # a hidden score goes below exp's range, whose result there is exactly 0
            e = _exp8(builder, builder.select(ok, builder.fsub(x, mxs), _c(-100.0)))
            builder.store(e, rp, align=4)
            return [builder.fadd(acc, e)]

        (acc,) = _loop(builder, builder.sdiv(n8_, ir.Constant(i64, 8)), [ir.Constant(_vf, None)], body)
        return _hsum(builder, acc)

    return sig, codegen
