"""Integer dot products of quantized rows with 8-bit activations, written as LLVM vector IR.

Numba promotes integer arithmetic to int64, so an int8 dot product written in
Python never vectorizes (AVX2 has no 64-bit multiply). These intrinsics emit the
loop over a row's blocks directly in portable LLVM vector IR: bytes are widened
to i16, multiplied, summed pairwise to <8 x i32>, converted to float and scaled
per block into a <8 x float> accumulator, with one horizontal sum per row. LLVM
lowers this to vpmaddwd / vcvtdq2ps / vfmadd on AVX2 and to the equivalent on
other targets, so no CPU-feature check is needed for correctness.

The arithmetic is llama.cpp's (ggml_vec_dot_q4_1_q8_1, ggml_vec_dot_q8_0_q8_0):
activations are quantized once per product to blocks of 32 int8 with an f16
scale (and, for Q8_1, the f16 of scale x sum), and each block contributes
d_w * d_x * sum(q_w * q_x) (+ m_w * s_x).
"""

from __future__ import annotations

import os

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from ..errors import InvalidParameterError

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32 = ir.FloatType()


def _vec(t: ir.Type, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _splat(builder: ir.IRBuilder, value: ir.Value, n: int) -> ir.Value:
    v = builder.insert_element(ir.Constant(_vec(value.type, n), ir.Undefined), value, ir.Constant(_i32, 0))
    return builder.shuffle_vector(v, ir.Constant(_vec(value.type, n), ir.Undefined), ir.Constant(_vec(_i32, n), None))


def _load(builder: ir.IRBuilder, addr: ir.Value, ty: ir.Type, align: int = 1) -> ir.Value:
    ptr = builder.inttoptr(addr, ty.as_pointer())
    return builder.load(ptr, align=align)


def _half(builder: ir.IRBuilder, addr: ir.Value) -> ir.Value:
    return builder.fpext(builder.bitcast(_load(builder, addr, _i16), ir.HalfType()), _f32)


def _half_pair(builder: ir.IRBuilder, addr: ir.Value) -> tuple[ir.Value, ir.Value]:
    """float32 of the two adjacent IEEE halves at addr (a scale and a min).

    Both lanes are used, so LLVM keeps the 4-byte ``vmovd`` load (which clears the rest of
    the register) and one ``vcvtph2ps``: no false dependency, unlike a single half.
    """
    v = builder.fpext(_load(builder, addr, _vec(ir.HalfType(), 2)), _vec(_f32, 2))
    return builder.extract_element(v, ir.Constant(_i32, 0)), builder.extract_element(v, ir.Constant(_i32, 1))


def _scale_and_offset(builder: ir.IRBuilder, wb: ir.Value, xd: ir.Value, xs: ir.Value, b: ir.Value):  # type: ignore[no-untyped-def]
    """(splat of d_w * d_x, m_w * s_x) of block b for a weight block at wb that starts with f16 (d, m).

    One conversion and one multiply of the two pairs instead of two of each (Q4_1 / Q5_1 x Q8_1).
    """
    dm = builder.fpext(_load(builder, wb, _vec(ir.HalfType(), 2)), _vec(_f32, 2))
    off = builder.mul(b, ir.Constant(_i64, 4))
    xds = ir.Constant(_vec(_f32, 2), None)
    xds = builder.insert_element(xds, _load(builder, builder.add(xd, off), _f32, 4), ir.Constant(_i32, 0))
    xds = builder.insert_element(xds, _load(builder, builder.add(xs, off), _f32, 4), ir.Constant(_i32, 1))
    p = builder.fmul(dm, xds)
    return _splat(builder, builder.extract_element(p, ir.Constant(_i32, 0)), 8), builder.extract_element(
        p, ir.Constant(_i32, 1)
    )


def _host_has(feature: str) -> bool:
    try:
        return bool(llvm.get_host_cpu_features().get(feature, False))
    except RuntimeError:
        return False


def _simd_level() -> str:
    """``LMAP_SIMD`` caps the instruction sets the intrinsics use: auto (default), avx2 or portable.

    The capped paths give bit-identical results (the integer sums are exact either way); the cap
    exists to test the fallbacks on a machine that has more, and to rule a new path out quickly.
    """
    level = os.environ.get("LMAP_SIMD", "auto").strip().lower() or "auto"
    if level not in SIMD_LEVELS:
        raise InvalidParameterError(f"LMAP_SIMD={level!r}: expected one of {', '.join(SIMD_LEVELS)}")
    return level


SIMD_LEVELS = ("auto", "avx2", "portable")
SIMD = _simd_level()
FMA = _host_has("fma")


def _fmadd(builder: ir.IRBuilder, a: ir.Value, b: ir.Value, c: ir.Value) -> ir.Value:
    """a * b + c, fused where the CPU has FMA.

    An explicit intrinsic, not a ``contract`` flag: with the flag LLVM fuses or not depending on
    the code around, and the same row dot inlined into two kernels (one token, a batch of
    sequences) then rounds differently; a sequence must get the same logits in both.
    """
    if not FMA:
        return builder.fadd(builder.fmul(a, b), c)
    mod = builder.module
    name = f"llvm.fma.v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "llvm.fma.f32"
    fn = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(fn, [a, b, c])


# AVX2's vpmaddubsw + vpmaddwd do a block in two instructions, as in llama.cpp; the portable
# IR below is correct everywhere but LLVM lowers it to ~4x more instructions on x86.
AVX2 = SIMD != "portable" and _host_has("avx2")
# F16C's vcvtph2ps converts the blocks' half-precision scales (every AVX2 CPU has it)
F16C = AVX2 and _host_has("f16c")
# VNNI's vpdpbusd does both steps in one instruction (AVX-VNNI, or AVX512-VNNI on 256-bit
# registers). Same integer sums: |q| * x pairs never saturate vpmaddubsw's i16 (2 * 128 * 127).
VNNI = SIMD == "auto" and AVX2 and (_host_has("avxvnni") or (_host_has("avx512vnni") and _host_has("avx512vl")))


def _avx2_block_dot(builder: ir.IRBuilder, q: ir.Value, x: ir.Value, signed_q: bool) -> ir.Value:
    v8, v16, v32 = _vec(_i8, 32), _vec(_i16, 16), _vec(_i32, 8)
    mod = builder.module
    maddubs = mod.globals.get("llvm.x86.avx2.pmadd.ub.sw") or ir.Function(
        mod, ir.FunctionType(v16, [v8, v8]), "llvm.x86.avx2.pmadd.ub.sw"
    )
    maddwd = mod.globals.get("llvm.x86.avx2.pmadd.wd") or ir.Function(
        mod, ir.FunctionType(v32, [v16, v16]), "llvm.x86.avx2.pmadd.wd"
    )
    if signed_q:
        # vpmaddubsw needs an unsigned operand: |q| times x with q's sign moved onto x (llama.cpp's trick)
        sign = mod.globals.get("llvm.x86.avx2.psign.b") or ir.Function(
            mod, ir.FunctionType(v8, [v8, v8]), "llvm.x86.avx2.psign.b"
        )
        absq = builder.call(sign, [q, q])
        x = builder.call(sign, [x, q])
        q = absq
    if VNNI:
        dpbusd = mod.globals.get("llvm.x86.avx512.vpdpbusd.256") or ir.Function(
            mod, ir.FunctionType(v32, [v32, v32, v32]), "llvm.x86.avx512.vpdpbusd.256"
        )
        zero = ir.Constant(v32, None)
        sums = builder.call(dpbusd, [zero, builder.bitcast(q, v32), builder.bitcast(x, v32)])
        return builder.sitofp(sums, _vec(_f32, 8))
    pairs = builder.call(maddubs, [q, x])
    ones = ir.Constant(v16, [1] * 16)
    return builder.sitofp(builder.call(maddwd, [pairs, ones]), _vec(_f32, 8))


def _block_dot(builder: ir.IRBuilder, q: ir.Value, x: ir.Value, signed_q: bool) -> ir.Value:
    """<8 x float> of sums of 4 adjacent products of two <32 x i8> vectors."""
    if AVX2:
        return _avx2_block_dot(builder, q, x, signed_q)
    v16 = _vec(_i16, 32)
    a = builder.sext(q, v16) if signed_q else builder.zext(q, v16)
    b = builder.sext(x, v16)
    p = builder.sext(builder.mul(a, b), _vec(_i32, 32))  # |q*x| <= 128*128 fits i16; widen before adding
    # fold 32 lanes to 8 as vpmaddubsw + vpmaddwd do: lane i sums products 4i..4i+3, so the float
    # accumulation that follows (and the logits) is the same on every instruction set
    quarter = [
        builder.shuffle_vector(p, p, ir.Constant(_vec(_i32, 8), [4 * i + k for i in range(8)])) for k in range(4)
    ]
    s = builder.add(builder.add(quarter[0], quarter[1]), builder.add(quarter[2], quarter[3]))
    return builder.sitofp(s, _vec(_f32, 8))


def _hsum(builder: ir.IRBuilder, v: ir.Value) -> ir.Value:
    """Sum of the 8 lanes as a tree (halves, quarters, pair): 3 dependent adds instead of 7."""
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(_vec(_i32, n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(_i32, 0))


def _c64(v: int) -> ir.Constant:
    return ir.Constant(_i64, v)


def _loop(builder: ir.IRBuilder, n: ir.Value, inits: list[ir.Value], body) -> list[ir.Value]:  # type: ignore[no-untyped-def]
    """Emit ``for i in range(n)`` carrying ``inits`` through ``body(i, values) -> values``; returns the final values."""
    fn = builder.function
    entry = builder.block
    loop = fn.append_basic_block("loop")
    done = fn.append_basic_block("loop_done")
    builder.cbranch(builder.icmp_signed(">", n, _c64(0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_i64)
    phis = [builder.phi(v.type) for v in inits]
    i.add_incoming(_c64(0), entry)
    for p, v in zip(phis, inits, strict=True):
        p.add_incoming(v, entry)
    new = body(i, phis)
    i_next = builder.add(i, _c64(1))
    end = builder.block
    i.add_incoming(i_next, end)
    for p, v in zip(phis, new, strict=True):
        p.add_incoming(v, end)
    builder.cbranch(builder.icmp_signed("<", i_next, n), loop, done)
    builder.position_at_end(done)
    outs = []
    for v0, v1 in zip(inits, new, strict=True):
        phi = builder.phi(v0.type)
        phi.add_incoming(v0, entry)
        phi.add_incoming(v1, end)
        outs.append(phi)
    return outs


def _row_loop(context, builder, nb, body):  # type: ignore[no-untyped-def]
    """Emit ``for b in range(nb)`` carrying a <8 x float> and a float accumulator; returns their final sum.

    One accumulator, blocks in order: llama.cpp's summation order. Two chains (even/odd blocks)
    were ~10 % faster on a Q8_0 row, but the reordered sum moved logits by up to 1.4 (Q8
    activation rounding amplifies 1e-7 through the layers) away from llama.cpp's.
    """
    zero8 = ir.Constant(_vec(_f32, 8), None)
    acc, acc1 = _loop(builder, nb, [zero8, ir.Constant(_f32, 0.0)], lambda b, v: body(b, v[0], v[1]))
    return builder.fadd(_hsum(builder, acc), acc1)


@intrinsic
def row_dot_q4_1_q8_1(typingctx, w_addr, x_addr, xd_addr, xs_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one Q4_1 row at address w_addr, Q8_1 activations); nb blocks of 32.

    x_addr: int8[nb * 32]; xd_addr: float32[nb] activation scales; xs_addr: float32[nb] scale x sum.
    """
    sig = types.float32(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        w, x, xd, xs, nb_ = args

        def body(b, acc, acc1):  # type: ignore[no-untyped-def]
            wb = builder.add(w, builder.mul(b, ir.Constant(_i64, 20)))
            packed = _load(builder, builder.add(wb, ir.Constant(_i64, 4)), _vec(_i8, 16))
            lo = builder.and_(packed, ir.Constant(_vec(_i8, 16), [15] * 16))
            hi = builder.lshr(packed, ir.Constant(_vec(_i8, 16), [4] * 16))
            q = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 32), list(range(32))))
            xv = _load(builder, builder.add(x, builder.mul(b, ir.Constant(_i64, 32))), _vec(_i8, 32))
            scale, offset = _scale_and_offset(builder, wb, xd, xs, b)
            acc = _fmadd(builder, _block_dot(builder, q, xv, signed_q=False), scale, acc)
            return acc, builder.fadd(acc1, offset)

        return _row_loop(context, builder, nb_, body)

    return sig, codegen


@intrinsic
def row_dot_q8_0_q8_0(typingctx, w_addr, x_addr, xd_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one Q8_0 row at address w_addr, Q8_0 activations); nb blocks of 32."""
    sig = types.float32(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        w, x, xd, nb_ = args

        def body(b, acc, acc1):  # type: ignore[no-untyped-def]
            wb = builder.add(w, builder.mul(b, ir.Constant(_i64, 34)))
            d = _half(builder, wb)
            q = _load(builder, builder.add(wb, ir.Constant(_i64, 2)), _vec(_i8, 32))
            xv = _load(builder, builder.add(x, builder.mul(b, ir.Constant(_i64, 32))), _vec(_i8, 32))
            xdb = _load(builder, builder.add(xd, builder.mul(b, ir.Constant(_i64, 4))), _f32, 4)
            scale = _splat(builder, builder.fmul(d, xdb), 8)
            acc = _fmadd(builder, _block_dot(builder, q, xv, signed_q=True), scale, acc)
            return acc, acc1

        return _row_loop(context, builder, nb_, body)

    return sig, codegen


@intrinsic
def row_dot_q4_0_q8_0(typingctx, w_addr, x_addr, xd_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one Q4_0 row at address w_addr, Q8_0 activations); nb blocks of 32 (weights q - 8)."""
    sig = types.float32(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        w, x, xd, nb_ = args

        def body(b, acc, acc1):  # type: ignore[no-untyped-def]
            wb = builder.add(w, builder.mul(b, ir.Constant(_i64, 18)))
            d = _half(builder, wb)
            packed = _load(builder, builder.add(wb, ir.Constant(_i64, 2)), _vec(_i8, 16))
            lo = builder.and_(packed, ir.Constant(_vec(_i8, 16), [15] * 16))
            hi = builder.lshr(packed, ir.Constant(_vec(_i8, 16), [4] * 16))
            q = builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 32), list(range(32))))
            q = builder.sub(q, ir.Constant(_vec(_i8, 32), [8] * 32))
            xv = _load(builder, builder.add(x, builder.mul(b, ir.Constant(_i64, 32))), _vec(_i8, 32))
            xdb = _load(builder, builder.add(xd, builder.mul(b, ir.Constant(_i64, 4))), _f32, 4)
            scale = _splat(builder, builder.fmul(d, xdb), 8)
            acc = _fmadd(builder, _block_dot(builder, q, xv, signed_q=True), scale, acc)
            return acc, acc1

        return _row_loop(context, builder, nb_, body)

    return sig, codegen
