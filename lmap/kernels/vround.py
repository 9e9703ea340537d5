"""llama.cpp's activation rounding (Q8_0/Q8_1 blocks of 32, Q8_K blocks of 256) as LLVM vector IR.

Prompt products round their input activations to llama.cpp's 8-bit grid before the BLAS
product. Written as Numba loops, the block's |x| maximum (a reduction LLVM vectorizes only
under fast-math) and ``np.rint`` kept the whole block scalar: ~1.5 ns per activation, 5-10 %
of prompt time. Here a block is one vector: ``llvm.vector.reduce.fmax`` (exact: a maximum
does not depend on order), ``llvm.rint`` (ties to even, as ``nearbyint`` in C), and every
other step the same single IEEE operation as the C reference, so the results are bit for bit
those of the scalar kernels they replace (tests/test_quants_more.py checks both against numpy
transcriptions of llama.cpp's reference quantizers).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import _c64, _f32, _splat

_i1 = ir.IntType(1)


def _fn(builder: ir.IRBuilder, name: str, ret: ir.Type, args: list[ir.Type]) -> ir.Function:
    mod = builder.module
    return mod.globals.get(name) or ir.Function(mod, ir.FunctionType(ret, args), name)


def _block(builder: ir.IRBuilder, addr: ir.Value, n: int) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(x <n x float> at addr, |x|, max |x|)."""
    vt = ir.VectorType(_f32, n)
    x = builder.load(builder.inttoptr(addr, vt.as_pointer()), align=4)
    ax = builder.call(_fn(builder, f"llvm.fabs.v{n}f32", vt, [vt]), [x])
    # nnan lets x86 reduce with vmaxps (|x| of a NaN activation is garbage either way)
    amax = builder.call(_fn(builder, f"llvm.vector.reduce.fmax.v{n}f32", _f32, [vt]), [ax], fastmath=("nnan",))
    return x, ax, amax


def _rint(builder: ir.IRBuilder, v: ir.Value, n: int) -> ir.Value:
    vt = ir.VectorType(_f32, n)
    return builder.call(_fn(builder, f"llvm.rint.v{n}f32", vt, [vt]), [v])


def _q8_0_grid(builder: ir.IRBuilder, addr: ir.Value, n: int) -> tuple[ir.Value, ir.Value]:
    """(q as <n x float> integers, the f16-rounded scale) of quantize_row_q8_0 on the n floats at addr.

    d = amax / 127 (kept as f16 in the block), q = round(x / d) through x * (1 / d).
    """
    x, _, amax = _block(builder, addr, n)
    d = builder.fdiv(amax, ir.Constant(_f32, 127.0))
    nonzero = builder.fcmp_ordered("!=", d, ir.Constant(_f32, 0.0))
    inv = builder.select(nonzero, builder.fdiv(ir.Constant(_f32, 1.0), d), ir.Constant(_f32, 0.0))
    dh = builder.fpext(builder.fptrunc(d, ir.HalfType()), _f32)
    return _rint(builder, builder.fmul(x, _splat(builder, inv, n)), n), dh


@intrinsic
def round_q8_block(typingctx, x_addr, out_addr):  # type: ignore[no-untyped-def]
    """out[0:32] = the 32 floats at x_addr rounded as quantize_row_q8_0 then dequantized (d * q)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        n = 32
        q, dh = _q8_0_grid(builder, args[0], n)
        out = builder.fmul(_splat(builder, dh, n), q)
        builder.store(out, builder.inttoptr(args[1], ir.VectorType(_f32, n).as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


def _q8_k_grid(builder: ir.IRBuilder, addr: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(q as <256 x float> integers, d = 1 / iscale, all-zero flag) of quantize_row_q8_K_ref at addr.

    iscale = -127 / (the first value of largest |x|), q = min(127, round(iscale * x)); for an
    all-zero block q and d are garbage (the callers select zeros on the flag).
    """
    n = 256
    x, ax, amax = _block(builder, addr, n)
    # the first lane whose |x| is the maximum: its signed value sets the scale's sign
    hits = builder.bitcast(builder.fcmp_ordered("==", ax, _splat(builder, amax, n)), ir.IntType(n))
    first = builder.call(
        _fn(builder, f"llvm.cttz.i{n}", ir.IntType(n), [ir.IntType(n), _i1]), [hits, ir.Constant(_i1, 0)]
    )
    lane = builder.trunc(first, ir.IntType(64))
    mx = builder.load(builder.inttoptr(builder.add(addr, builder.mul(lane, _c64(4))), _f32.as_pointer()), align=4)
    zero = builder.fcmp_ordered("==", amax, ir.Constant(_f32, 0.0))
    iscale = builder.fdiv(ir.Constant(_f32, -127.0), mx)
    d = builder.fdiv(ir.Constant(_f32, 1.0), iscale)
    q = _rint(builder, builder.fmul(_splat(builder, iscale, n), x), n)
    vt = ir.VectorType(_f32, n)
    minnum = _fn(builder, f"llvm.minnum.v{n}f32", vt, [vt, vt])
    q = builder.call(minnum, [q, _splat(builder, ir.Constant(_f32, 127.0), n)])
    return q, d, zero


@intrinsic
def round_q8_k_block(typingctx, x_addr, out_addr):  # type: ignore[no-untyped-def]
    """out[0:256] = the 256 floats at x_addr rounded as quantize_row_q8_K_ref then dequantized (d * q);
    an all-zero block gives zeros."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        q, d, zero = _q8_k_grid(builder, args[0])
        vt = ir.VectorType(_f32, 256)
        out = builder.select(zero, ir.Constant(vt, None), builder.fmul(_splat(builder, d, 256), q))
        builder.store(out, builder.inttoptr(args[1], vt.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


def _store_sums(builder: ir.IRBuilder, qf: ir.Value, n: int, sub: int, d: ir.Value, dx: ir.Value, xs: ir.Value) -> None:
    """dx[i] = d and xs[i] = d * (sum of sub-block i's q) for the n // sub sub-blocks of qf (exact integers)."""
    qi = builder.fptosi(qf, ir.VectorType(ir.IntType(32), n))
    vt = ir.VectorType(ir.IntType(32), sub)
    reduce = _fn(builder, f"llvm.vector.reduce.add.v{sub}i32", ir.IntType(32), [vt])
    for i in range(n // sub):
        part = builder.shuffle_vector(qi, qi, ir.Constant(vt, list(range(i * sub, (i + 1) * sub))))
        s = builder.sitofp(builder.call(reduce, [part]), _f32)
        builder.store(d, builder.inttoptr(builder.add(dx, _c64(4 * i)), _f32.as_pointer()), align=4)
        builder.store(builder.fmul(d, s), builder.inttoptr(builder.add(xs, _c64(4 * i)), _f32.as_pointer()), align=4)


def _store_q(builder: ir.IRBuilder, qf: ir.Value, n: int, addr: ir.Value) -> None:
    vt = ir.VectorType(ir.IntType(8), n)
    builder.store(builder.fptosi(qf, vt), builder.inttoptr(addr, vt.as_pointer()), align=1)


@intrinsic
def quant_q8_block(typingctx, x_addr, q_addr, dx_addr, xs_addr):  # type: ignore[no-untyped-def]
    """The 32 floats at x_addr quantized as :func:`round_q8_block` rounds them, kept as integers.

    Writes int8 q[32], the f16-rounded scale d (as float32) to dx, and d * sum(q) to xs: the
    operands of the integer prompt GEMM (lmap.kernels.igemm); d * q is round_q8_block's output.
    """

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        q, dh = _q8_0_grid(builder, args[0], 32)
        _store_q(builder, q, 32, args[1])
        _store_sums(builder, q, 32, 32, dh, args[2], args[3])
        return context.get_dummy_value()

    return types.void(types.int64, types.int64, types.int64, types.int64), codegen


def _quant_q8_k(sub: int):  # type: ignore[no-untyped-def]
    def quant(typingctx, x_addr, q_addr, dx_addr, xs_addr):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            q, d, zero = _q8_k_grid(builder, args[0])
            q = builder.select(zero, ir.Constant(ir.VectorType(_f32, 256), None), q)
            d = builder.select(zero, ir.Constant(_f32, 0.0), d)
            _store_q(builder, q, 256, args[1])
            _store_sums(builder, q, 256, sub, d, args[2], args[3])
            return context.get_dummy_value()

        return types.void(types.int64, types.int64, types.int64, types.int64), codegen

    quant.__name__ = quant.__qualname__ = f"quant_q8_k_block_s{sub}"
    return intrinsic(quant)


# The 256 floats at x_addr quantized as round_q8_k_block rounds them: int8 q[256], and per
# sub-block of 32 (K-quants with 32-weight scales) or 16 (Q6_K) the scale d and d * sum(q).
quant_q8_k_block_s32 = _quant_q8_k(32)
quant_q8_k_block_s16 = _quant_q8_k(16)
