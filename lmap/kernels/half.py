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
