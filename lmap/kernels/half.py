"""IEEE half <-> float conversion inside Numba kernels.

Numba has no float16 type on the CPU, but LLVM does: bitcasting the uint16 to
``half`` and extending it lets LLVM emit ``vcvtph2ps`` (F16C) and vectorize,
where a bit-twiddling decoder would not.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def half_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """float32 value of the IEEE half whose bits are the uint16 ``bits``."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def float_to_half(typingctx, x):  # type: ignore[no-untyped-def]
    """uint16 bits of ``x`` rounded to IEEE half (round to nearest even, like numpy)."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@intrinsic
def bf16_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """float32 value of the bfloat16 whose bits are the uint16 ``bits`` (its top half)."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


def _weighted_rows(n16: int):  # type: ignore[no-untyped-def]
    """The intrinsic of :func:`weighted_rows_f16` for rows of ``16 * n16`` halves."""
    vf = ir.VectorType(ir.FloatType(), 16)
    vh = ir.VectorType(ir.HalfType(), 16)

    def impl(typingctx, out_addr, s_addr, scale, v_addr, v_stride, n_rows):  # type: ignore[no-untyped-def]
        sig = types.void(types.int64, types.int64, types.float32, types.int64, types.int64, types.int64)

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            from .simd import _fmadd, _loop, _splat

            out, s, sc, v, stride, n = args
            i64, f32 = ir.IntType(64), ir.FloatType()

            def body(j, accs):  # type: ignore[no-untyped-def]
                w = builder.fmul(
                    builder.load(
                        builder.inttoptr(builder.add(s, builder.mul(j, ir.Constant(i64, 4))), f32.as_pointer())
                    ),
                    sc,
                )
                row = builder.add(v, builder.mul(j, stride))
                # a row of weight 0 (a hidden cell) is skipped: its values may be anything
                skip = builder.fcmp_ordered("==", w, ir.Constant(f32, 0.0))
                ws = _splat(builder, w, 16)
                new = []
                for b, acc in enumerate(accs):
                    p = builder.inttoptr(builder.add(row, ir.Constant(i64, 32 * b)), vh.as_pointer())
                    x = builder.fpext(builder.load(p, align=2), vf)
                    new.append(builder.select(skip, acc, _fmadd(builder, ws, x, acc)))
                return new

            accs = _loop(builder, n, [ir.Constant(vf, None)] * n16, body)
            for b, acc in enumerate(accs):
                builder.store(
                    acc, builder.inttoptr(builder.add(out, ir.Constant(i64, 64 * b)), vf.as_pointer()), align=4
                )
            return context.get_dummy_value()

        return sig, codegen

    impl.__name__ = impl.__qualname__ = f"weighted_rows_f16_{16 * n16}"
    return intrinsic(impl)


# out[0:hd] = sum over rows j < n of (s[j] * scale) * half row j (at v + j * stride), in row order, each
# output value one fused multiply-add chain in registers: decode attention's weighted sum of value
# rows, whose Numba loop kept its 64-256 running sums in memory (a store and a reload per cell)
weighted_rows_f16_64 = _weighted_rows(4)
weighted_rows_f16_128 = _weighted_rows(8)
weighted_rows_f16_256 = _weighted_rows(16)
