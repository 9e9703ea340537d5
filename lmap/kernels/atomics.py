"""Memory operations Numba lacks, each a single LLVM instruction on raw int64 addresses.

Atomics for the decode team's job words (team.py) and the prompt GEMM's panel claims
(quants/panels.py), the spin-wait hint, and a float32 store.
"""

from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


@intrinsic
def atomic_load(typingctx, addr):  # type: ignore[no-untyped-def]
    """Acquire-load of the int64 at ``addr``."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.load_atomic(builder.inttoptr(args[0], _i64.as_pointer()), "acquire", 8)

    return types.int64(types.int64), codegen


@intrinsic
def atomic_store(typingctx, addr, value):  # type: ignore[no-untyped-def]
    """Release-store of ``value`` into the int64 at ``addr``."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.store_atomic(args[1], builder.inttoptr(args[0], _i64.as_pointer()), "release", 8)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@intrinsic
def atomic_cas(typingctx, addr, expected, desired):  # type: ignore[no-untyped-def]
    """Compare-and-swap on the int64 at ``addr``; True when it held ``expected`` (now ``desired``)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], _i64.as_pointer())
        res = builder.cmpxchg(ptr, args[1], args[2], "acq_rel", "acquire")
        return builder.extract_value(res, 1)

    return types.boolean(types.int64, types.int64, types.int64), codegen


@intrinsic
def atomic_add(typingctx, addr, value):  # type: ignore[no-untyped-def]
    """Atomically add ``value`` to the int64 at ``addr``; returns the old value."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.atomic_rmw("add", builder.inttoptr(args[0], _i64.as_pointer()), args[1], "acq_rel")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def atomic_or(typingctx, addr, value):  # type: ignore[no-untyped-def]
    """Atomically OR ``value`` into the int64 at ``addr`` (acquire-release); returns the old value."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.atomic_rmw("or", builder.inttoptr(args[0], _i64.as_pointer()), args[1], "acq_rel")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def cpu_relax(typingctx):  # type: ignore[no-untyped-def]
    """The spin-wait hint (x86 ``pause``): frees the core's shared resources while spinning."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if _X86:
            mod = builder.module
            fn = mod.globals.get("llvm.x86.sse2.pause") or ir.Function(
                mod, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def store_f32(typingctx, addr, value):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.store(args[1], builder.inttoptr(args[0], _f32.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.float32), codegen
