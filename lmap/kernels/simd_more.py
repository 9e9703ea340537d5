"""Row dot products for Q5_0, Q5_1, the K-quants and IQ4, written as LLVM vector IR.

Integer products with 8-bit activations (``row_dot_*_q8_*``) follow
:mod:`lmap.kernels.simd`, whose helpers they reuse: one row's blocks are looped
over in IR, each block's 32 weights are rebuilt as a <32 x i8> vector and
multiplied with the activation block by ``_block_dot`` (vpmaddubsw + vpmaddwd on
AVX2).

Float products (``row_dot_*_f32``) exist because Numba's own loops over these
layouts reach only 2-4 GMAC/s (bit fields split over several arrays, per-16
scales, table lookups that would need gathers), against 8-13 here. Each block's
weights are rebuilt as <32 x i8>, widened to float, dequantized exactly as
gguf / llama.cpp do (q * scale + offset, the product exact in float32, so the
weight is bit-identical) and multiplied into four independent <8 x float>
accumulators, summed once per row. The fifth bits come from the block's 32-bit mask as
llama.cpp's ``bytes_from_bits_32`` does it: the four mask bytes are spread over
the 32 lanes (byte k // 8 to lane k), each lane tests its own bit, and the test
selects the high half of the weight byte. For Q5_0 a clear bit selects 0xF0, so
the byte read as int8 is already q - 16 (nibble - 16 = 0xF0 | nibble).
"""

from __future__ import annotations

from dataclasses import dataclass

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import (
    AVX2,
    F16C,
    _block_dot,
    _c64,
    _f32,
    _fmadd,
    _half_pair,
    _hsum,
    _i8,
    _i16,
    _i32,
    _i64,
    _load,
    _loop,
    _row_loop,
    _scale_and_offset,
    _splat,
    _vec,
)


def _half(builder: ir.IRBuilder, addr: ir.Value) -> ir.Value:
    """float32 of the IEEE half at addr, without a dependency on an unrelated register.

    LLVM lowers a scalar half load to ``vpinsrw $0, mem, %xmmN`` whose untouched upper lanes
    come from whatever register it picks, often the loop's accumulator: the scale then waits
    for the previous block's sum and the loop runs 2-2.5x slower. Here the half's bits go into
    a zeroed vector, converted by F16C's ``vcvtph2ps`` where the CPU has it (3 instructions a
    block), else by integer operations (~14). Both are exact for every half, so the results do
    not depend on which one ran.
    """
    h = builder.zext(_load(builder, addr, _i16), _i32)
    if F16C:
        v = builder.insert_element(ir.Constant(_vec(_i32, 4), None), h, ir.Constant(_i32, 0))
        f = builder.fpext(builder.bitcast(v, _vec(ir.HalfType(), 8)), _vec(_f32, 8))
        return builder.extract_element(f, ir.Constant(_i32, 0))
    c = lambda v: ir.Constant(_i32, v)  # noqa: E731
    bits = builder.shl(builder.and_(h, c(0x7FFF)), c(13))
    exp = builder.and_(bits, c(0x7C00 << 13))
    normal = builder.add(bits, c((127 - 15) << 23))
    special = builder.add(normal, c((128 - 16) << 23))  # inf / nan: exponent all ones
    # subnormal: 2^-14 * (1 + m / 1024) - 2^-14 = m * 2^-24, exact and computed on normal floats
    sub = builder.bitcast(builder.add(normal, c(1 << 23)), _f32)
    sub = builder.bitcast(builder.fsub(sub, ir.Constant(_f32, 2.0**-14)), _i32)
    out = builder.select(builder.icmp_unsigned("==", exp, c(0x7C00 << 13)), special, normal)
    out = builder.select(builder.icmp_unsigned("==", exp, c(0)), sub, out)
    sign = builder.shl(builder.and_(h, c(0x8000)), c(16))
    return builder.bitcast(builder.or_(out, sign), _f32)


_BIT_LANE = ir.Constant(_vec(_i32, 32), [k // 8 for k in range(32)])
_BIT_MASK = ir.Constant(_vec(_i8, 32), [1 << (k % 8) for k in range(32)])


def _q5_bytes(builder: ir.IRBuilder, qh_addr: ir.Value, qs_addr: ir.Value, set_hi: int, clear_hi: int) -> ir.Value:
    """<32 x i8> of nibble | (bit set ? set_hi : clear_hi) for one block of 32 five-bit weights."""
    v4 = _load(builder, qh_addr, _vec(_i8, 4))
    spread = builder.shuffle_vector(v4, ir.Constant(_vec(_i8, 4), ir.Undefined), _BIT_LANE)
    bit = builder.icmp_unsigned("!=", builder.and_(spread, _BIT_MASK), ir.Constant(_vec(_i8, 32), [0] * 32))
    hi = builder.select(bit, ir.Constant(_vec(_i8, 32), [set_hi] * 32), ir.Constant(_vec(_i8, 32), [clear_hi] * 32))
    packed = _load(builder, qs_addr, _vec(_i8, 16))
    lo = builder.and_(packed, ir.Constant(_vec(_i8, 16), [15] * 16))
    up = builder.lshr(packed, ir.Constant(_vec(_i8, 16), [4] * 16))
    nib = builder.shuffle_vector(lo, up, ir.Constant(_vec(_i32, 32), list(range(32))))
    return builder.or_(nib, hi)


@intrinsic
def row_dot_q5_0_q8_0(typingctx, w_addr, x_addr, xd_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one Q5_0 row at address w_addr, Q8_0 activations); nb blocks of 32 (weights q - 16)."""
    sig = types.float32(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        w, x, xd, nb_ = args

        def body(b, acc, acc1):  # type: ignore[no-untyped-def]
            wb = builder.add(w, builder.mul(b, ir.Constant(_i64, 22)))
            d = _half(builder, wb)
            q = _q5_bytes(
                builder, builder.add(wb, ir.Constant(_i64, 2)), builder.add(wb, ir.Constant(_i64, 6)), 0, 0xF0
            )
            xv = _load(builder, builder.add(x, builder.mul(b, ir.Constant(_i64, 32))), _vec(_i8, 32))
            xdb = _load(builder, builder.add(xd, builder.mul(b, ir.Constant(_i64, 4))), _f32, 4)
            scale = _splat(builder, builder.fmul(d, xdb), 8)
            acc = _fmadd(builder, _block_dot(builder, q, xv, signed_q=True), scale, acc)
            return acc, acc1

        return _row_loop(context, builder, nb_, body)

    return sig, codegen


@intrinsic
def row_dot_q5_1_q8_1(typingctx, w_addr, x_addr, xd_addr, xs_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one Q5_1 row at address w_addr, Q8_1 activations); nb blocks of 32.

    x_addr: int8[nb * 32]; xd_addr: float32[nb] activation scales; xs_addr: float32[nb] scale x sum.
    """
    sig = types.float32(types.int64, types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        w, x, xd, xs, nb_ = args

        def body(b, acc, acc1):  # type: ignore[no-untyped-def]
            wb = builder.add(w, builder.mul(b, ir.Constant(_i64, 24)))
            q = _q5_bytes(builder, builder.add(wb, ir.Constant(_i64, 4)), builder.add(wb, ir.Constant(_i64, 8)), 16, 0)
            xv = _load(builder, builder.add(x, builder.mul(b, ir.Constant(_i64, 32))), _vec(_i8, 32))
            scale, offset = _scale_and_offset(builder, wb, xd, xs, b)
            acc = _fmadd(builder, _block_dot(builder, q, xv, signed_q=False), scale, acc)
            return acc, builder.fadd(acc1, offset)

        return _row_loop(context, builder, nb_, body)

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# float32 activations

_CONTRACT = ("contract",)  # let LLVM fuse q * scale + offset and w * x + acc into FMAs
_v8f = _vec(_f32, 8)


def _bytes(builder: ir.IRBuilder, addr: ir.Value, n: int) -> ir.Value:
    return _load(builder, addr, _vec(_i8, n))


def _bconst(v: int | list[int], n: int = 32) -> ir.Constant:
    return ir.Constant(_vec(_i8, n), v if isinstance(v, list) else [v] * n)


def _lanes(builder: ir.IRBuilder, v: ir.Value, idx: list[int]) -> ir.Value:
    return builder.shuffle_vector(v, ir.Constant(v.type, ir.Undefined), ir.Constant(_vec(_i32, len(idx)), idx))


def _fma32(
    builder: ir.IRBuilder,
    acc: list[ir.Value],
    q: ir.Value,
    signed: bool,
    scale: tuple[ir.Value, ir.Value],
    offset: tuple[ir.Value, ir.Value] | None,
    x_addr: ir.Value,
) -> list[ir.Value]:
    """acc[k] += (q * scale + offset) * x over the four quarters of a <32 x i8> block.

    scale / offset: float scalars for weights 0-15 and 16-31 (formats with a scale per 16).
    """
    out = []
    for k in range(4):
        qk = _lanes(builder, q, [8 * k + i for i in range(8)])
        qf = builder.sitofp(qk, _v8f) if signed else builder.uitofp(qk, _v8f)
        w = builder.fmul(qf, _splat(builder, scale[k // 2], 8), flags=_CONTRACT)
        if offset is not None:
            w = builder.fadd(w, _splat(builder, offset[k // 2], 8), flags=_CONTRACT)
        xv = _load(builder, builder.add(x_addr, _c64(32 * k)), _v8f, 4)
        out.append(builder.fadd(acc[k], builder.fmul(w, xv, flags=_CONTRACT), flags=_CONTRACT))
    return out


def _float_row(builder: ir.IRBuilder, args, block_bytes: int, block_weights: int, block) -> ir.Value:  # type: ignore[no-untyped-def]
    """Sum over a row's blocks of ``block(wb, xb, acc) -> acc`` (block at wb, its activations at xb), as a float."""
    w, x, nb = args
    zero = ir.Constant(_v8f, None)

    def body(b, acc):  # type: ignore[no-untyped-def]
        wb = builder.add(w, builder.mul(b, _c64(block_bytes)))
        xb = builder.add(x, builder.mul(b, _c64(4 * block_weights)))
        return block(wb, xb, acc)

    acc = _loop(builder, nb, [zero] * 4, body)
    return _hsum(builder, builder.fadd(builder.fadd(acc[0], acc[1]), builder.fadd(acc[2], acc[3])))


def _elem(builder: ir.IRBuilder, v: ir.Value, i: int) -> ir.Value:
    return builder.extract_element(v, ir.Constant(_i32, i))


_F32_ROW_SIG = types.float32(types.int64, types.int64, types.int64)


@intrinsic
def row_dot_q5_0_f32(typingctx, w_addr, x_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one Q5_0 row at address w_addr, float32 activations at x_addr); nb blocks of 32."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        def block(wb, xb, acc):  # type: ignore[no-untyped-def]
            d = _half(builder, wb)
            q = _q5_bytes(builder, builder.add(wb, _c64(2)), builder.add(wb, _c64(6)), 0, 0xF0)
            return _fma32(builder, acc, q, True, (d, d), None, xb)

        return _float_row(builder, args, 22, 32, block)

    return _F32_ROW_SIG, codegen


@intrinsic
def row_dot_q5_1_f32(typingctx, w_addr, x_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one Q5_1 row at address w_addr, float32 activations at x_addr); nb blocks of 32."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        def block(wb, xb, acc):  # type: ignore[no-untyped-def]
            d, m = _half_pair(builder, wb)
            q = _q5_bytes(builder, builder.add(wb, _c64(4)), builder.add(wb, _c64(8)), 16, 0)
            return _fma32(builder, acc, q, False, (d, d), (m, m), xb)

        return _float_row(builder, args, 24, 32, block)

    return _F32_ROW_SIG, codegen


# llama.cpp's kvalues_iq4nl: the 16 levels an IQ4 nibble indexes
IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def _nibbles(builder: ir.IRBuilder, addr: ir.Value) -> ir.Value:
    """<32 x i8>: low nibbles of the 16 bytes at addr, then their high nibbles (Q4_0 order)."""
    packed = _bytes(builder, addr, 16)
    lo = builder.and_(packed, _bconst(15, 16))
    hi = builder.lshr(packed, _bconst(4, 16))
    return builder.shuffle_vector(lo, hi, ir.Constant(_vec(_i32, 32), list(range(32))))


def _iq4_levels(builder: ir.IRBuilder, idx: ir.Value) -> ir.Value:
    """<32 x i8> IQ4_LEVELS[idx] for indices 0..15: one vpshufb on AVX2 (as llama.cpp), lane by lane elsewhere."""
    if AVX2:
        v8 = _vec(_i8, 32)
        mod = builder.module
        shuf = mod.globals.get("llvm.x86.avx2.pshuf.b") or ir.Function(
            mod, ir.FunctionType(v8, [v8, v8]), "llvm.x86.avx2.pshuf.b"
        )
        # vpshufb looks up within each 128-bit lane, so the table fills both lanes
        return builder.call(shuf, [_bconst([v & 0xFF for v in IQ4_LEVELS * 2]), idx])
    table = _bconst([v & 0xFF for v in IQ4_LEVELS], 16)
    out = ir.Constant(_vec(_i8, 32), ir.Undefined)
    for k in range(32):
        out = builder.insert_element(out, builder.extract_element(table, _elem(builder, idx, k)), ir.Constant(_i32, k))
    return out


@intrinsic
def row_dot_iq4_nl_f32(typingctx, w_addr, x_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one IQ4_NL row at address w_addr, float32 activations at x_addr); nb blocks of 32."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        def block(wb, xb, acc):  # type: ignore[no-untyped-def]
            d = _half(builder, wb)
            q = _iq4_levels(builder, _nibbles(builder, builder.add(wb, _c64(2))))
            return _fma32(builder, acc, q, True, (d, d), None, xb)

        return _float_row(builder, args, 18, 32, block)

    return _F32_ROW_SIG, codegen


@intrinsic
def row_dot_iq4_nl_q8_0(typingctx, w_addr, x_addr, xd_addr, nb):  # type: ignore[no-untyped-def]
    """dot(one IQ4_NL row at address w_addr, Q8_0 activations); nb blocks of 32 (llama.cpp's vpshufb path)."""
    sig = types.float32(types.int64, types.int64, types.int64, types.int64)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        w, x, xd, nb_ = args

        def body(b, acc, acc1):  # type: ignore[no-untyped-def]
            wb = builder.add(w, builder.mul(b, _c64(18)))
            d = _half(builder, wb)
            q = _iq4_levels(builder, _nibbles(builder, builder.add(wb, _c64(2))))
            xv = _load(builder, builder.add(x, builder.mul(b, _c64(32))), _vec(_i8, 32))
            xdb = _load(builder, builder.add(xd, builder.mul(b, _c64(4))), _f32, 4)
            scale = _splat(builder, builder.fmul(d, xdb), 8)
            acc = _fmadd(builder, _block_dot(builder, q, xv, signed_q=True), scale, acc)
            return acc, acc1

        return _row_loop(context, builder, nb_, body)

    return sig, codegen


# ---------------------------------------------------------------------------------------------
# super-blocks of 256 (K-quants, IQ4_XS): one description, two products


@dataclass
class _SuperBlock:
    """A 256-weight super-block as both row dots see it: w = d * scale * q - dmin * min per sub-block."""

    d: ir.Value  # float32 scale of the scales
    scales: ir.Value  # <n x i8> signed sub-block scales
    # per 32 weights: (q <32 x i8>, q signed, scale index of weights 0-15, of 16-31, first weight)
    blocks: list[tuple[ir.Value, bool, int, int, int]]
    dmin: ir.Value | None = None  # float32 scale of the mins
    mins: ir.Value | None = None  # <n x i8> sub-block mins


def _float_super_block(builder: ir.IRBuilder, sb: _SuperBlock, xb: ir.Value, acc: list[ir.Value]) -> list[ir.Value]:
    n = sb.scales.type.count
    dl = builder.fmul(builder.sitofp(sb.scales, _vec(_f32, n)), _splat(builder, sb.d, n))
    ml = None
    if sb.mins is not None:
        ml = builder.fneg(builder.fmul(builder.sitofp(sb.mins, _vec(_f32, n)), _splat(builder, sb.dmin, n)))
    for q, signed, i0, i1, first in sb.blocks:
        scale = (_elem(builder, dl, i0), _elem(builder, dl, i1))
        offset = None if ml is None else (_elem(builder, ml, i0), _elem(builder, ml, i1))
        acc = _fma32(builder, acc, q, signed, scale, offset, builder.add(xb, _c64(4 * first)))
    return acc


def _block_dot_i32(builder: ir.IRBuilder, q: ir.Value, x: ir.Value, signed_q: bool, scale16: ir.Value) -> ir.Value:
    """<8 x i32>: lane m = sum over bytes 4m..4m+3 of q * x, each pair of bytes times its <16 x i16> scale.

    llama.cpp's K-quant step (vpmaddubsw, then vpmaddwd against the scales instead of ones).
    No i16 saturation for the formats here: |q| * 127 * 2 < 2^15.
    """
    v8, v16, v32 = _vec(_i8, 32), _vec(_i16, 16), _vec(_i32, 8)
    if AVX2:
        mod = builder.module
        maddubs = mod.globals.get("llvm.x86.avx2.pmadd.ub.sw") or ir.Function(
            mod, ir.FunctionType(v16, [v8, v8]), "llvm.x86.avx2.pmadd.ub.sw"
        )
        maddwd = mod.globals.get("llvm.x86.avx2.pmadd.wd") or ir.Function(
            mod, ir.FunctionType(v32, [v16, v16]), "llvm.x86.avx2.pmadd.wd"
        )
        if signed_q:
            sign = mod.globals.get("llvm.x86.avx2.psign.b") or ir.Function(
                mod, ir.FunctionType(v8, [v8, v8]), "llvm.x86.avx2.psign.b"
            )
            x = builder.call(sign, [x, q])
            q = builder.call(sign, [q, q])
        return builder.call(maddwd, [builder.call(maddubs, [q, x]), scale16])
    w16 = _vec(_i16, 32)
    p = builder.mul(builder.sext(q, w16) if signed_q else builder.zext(q, w16), builder.sext(x, w16))
    even = [2 * i for i in range(16)]
    pairs = builder.add(_lanes(builder, p, even), _lanes(builder, p, [i + 1 for i in even]))
    p32 = builder.mul(builder.sext(pairs, _vec(_i32, 16)), builder.sext(scale16, _vec(_i32, 16)))
    return builder.add(_lanes(builder, p32, even[:8]), _lanes(builder, p32, [i + 1 for i in even[:8]]))


def _q8k_super_block(
    builder: ir.IRBuilder, sb: _SuperBlock, xq: ir.Value, xd: ir.Value, acc: list[ir.Value]
) -> list[ir.Value]:
    """acc[0] += this super-block times its 256 Q8_K activations at xq (int8) with scale xd (float32)."""
    n = sb.scales.type.count
    sc16 = builder.sext(sb.scales, _vec(_i16, n))
    zero = ir.Constant(_vec(_i32, 8), None)
    isum = zero
    msum = zero
    for q, signed, i0, i1, first in sb.blocks:
        xv = _load(builder, builder.add(xq, _c64(first)), _vec(_i8, 32))
        pick = [i0] * 8 + [i1] * 8
        isum = builder.add(isum, _block_dot_i32(builder, q, xv, signed, _lanes(builder, sc16, pick)))
        if sb.mins is not None:
            m16 = _lanes(builder, builder.sext(sb.mins, _vec(_i16, n)), pick)
            msum = builder.add(msum, _block_dot_i32(builder, _bconst(1), xv, False, m16))
    out = _fmadd(builder, builder.sitofp(isum, _v8f), _splat(builder, builder.fmul(sb.d, xd), 8), acc[0])
    if sb.mins is not None:
        neg = builder.fneg(builder.sitofp(msum, _v8f))
        out = _fmadd(builder, neg, _splat(builder, builder.fmul(sb.dmin, xd), 8), out)
    return [out]


def _q8k_row(builder: ir.IRBuilder, args, block_bytes: int, parts) -> ir.Value:  # type: ignore[no-untyped-def]
    """dot(one row, Q8_K activations): int8 xq[nb * 256], float32 xd[nb]; parts(wb) describes a super-block."""
    w, x, xd, nb = args

    def body(b, acc):  # type: ignore[no-untyped-def]
        wb = builder.add(w, builder.mul(b, _c64(block_bytes)))
        xdb = _load(builder, builder.add(xd, builder.mul(b, _c64(4))), _f32, 4)
        return _q8k_super_block(builder, parts(builder, wb), builder.add(x, builder.mul(b, _c64(256))), xdb, acc)

    (acc,) = _loop(builder, nb, [ir.Constant(_v8f, None)], body)
    return _hsum(builder, acc)


_Q8K_ROW_SIG = types.float32(types.int64, types.int64, types.int64, types.int64)


def _super_block_row_dots(name: str, block_bytes: int, parts):  # type: ignore[no-untyped-def]
    """The float and the Q8_K row-dot intrinsics of one 256-weight format described by ``parts(builder, wb)``."""

    def f32(typingctx, w_addr, x_addr, nb):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            def block(wb, xb, acc):  # type: ignore[no-untyped-def]
                return _float_super_block(builder, parts(builder, wb), xb, acc)

            return _float_row(builder, args, block_bytes, 256, block)

        return _F32_ROW_SIG, codegen

    def q8k(typingctx, w_addr, x_addr, xd_addr, nb):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return _q8k_row(builder, args, block_bytes, parts)

        return _Q8K_ROW_SIG, codegen

    f32.__doc__ = f"dot(one {name} row at address w_addr, float32 activations at x_addr); nb super-blocks of 256."
    q8k.__doc__ = f"dot(one {name} row at address w_addr, Q8_K activations: int8 at x_addr, float32 scales at xd_addr)."
    for f, kind in ((f32, "f32"), (q8k, "q8_k")):
        f.__name__ = f.__qualname__ = f"row_dot_{name.lower()}_{kind}"
    return intrinsic(f32), intrinsic(q8k)


def _k4_scales_mins(builder: ir.IRBuilder, addr: ir.Value) -> tuple[ir.Value, ir.Value]:
    """<8 x i8> scales and mins of the eight sub-blocks, from the 12 scale bytes of Q4_K / Q5_K at addr.

    Sub-blocks 0-3 keep 6 bits in bytes j (scale) and j + 4 (min); 4-7 keep their low 4 bits
    in the two nibbles of byte j + 4 and their top 2 bits in the spare top bits of bytes j - 4 and j.
    """
    v = _bytes(builder, addr, 12)
    low = _bconst([63] * 4 + [15] * 4, 8)
    top = _bconst([0] * 4 + [0x30] * 4, 8)

    def top2(idx: list[int]) -> ir.Value:
        return builder.and_(builder.lshr(_lanes(builder, v, idx), _bconst(2, 8)), top)  # bits 6-7 to 4-5

    sc = builder.or_(builder.and_(_lanes(builder, v, [0, 1, 2, 3, 8, 9, 10, 11]), low), top2([0, 1, 2, 3] * 2))
    mins = builder.lshr(_lanes(builder, v, [4, 5, 6, 7, 8, 9, 10, 11]), _bconst([0] * 4 + [4] * 4, 8))
    mins = builder.or_(builder.and_(mins, low), top2([4, 5, 6, 7] * 2))
    return sc, mins


def _q4_k(builder: ir.IRBuilder, wb: ir.Value) -> _SuperBlock:
    """Q4_K: f16 d, f16 dmin, 12 scale bytes, then 128 bytes whose low / high nibbles are sub-blocks 2g / 2g + 1."""
    d, dmin = _half_pair(builder, wb)
    sc, mins = _k4_scales_mins(builder, builder.add(wb, _c64(4)))
    blocks = []
    for g in range(4):
        qs = _bytes(builder, builder.add(wb, _c64(16 + 32 * g)), 32)
        for h, q in enumerate((builder.and_(qs, _bconst(15)), builder.lshr(qs, _bconst(4)))):
            j = 2 * g + h
            blocks.append((q, False, j, j, 32 * j))
    return _SuperBlock(d, sc, blocks, dmin, mins)


def _q5_k(builder: ir.IRBuilder, wb: ir.Value) -> _SuperBlock:
    """Q5_K: as Q4_K with 32 bytes qh after the scales; weight 32j + l's fifth bit is bit j of qh[l]."""
    d, dmin = _half_pair(builder, wb)
    sc, mins = _k4_scales_mins(builder, builder.add(wb, _c64(4)))
    qh = _bytes(builder, builder.add(wb, _c64(16)), 32)
    blocks = []
    for g in range(4):
        qs = _bytes(builder, builder.add(wb, _c64(48 + 32 * g)), 32)
        for h, q in enumerate((builder.and_(qs, _bconst(15)), builder.lshr(qs, _bconst(4)))):
            j = 2 * g + h
            hb = builder.shl(builder.and_(builder.lshr(qh, _bconst(j)), _bconst(1)), _bconst(4))
            blocks.append((builder.or_(q, hb), False, j, j, 32 * j))
    return _SuperBlock(d, sc, blocks, dmin, mins)


def _q6_k(builder: ir.IRBuilder, wb: ir.Value) -> _SuperBlock:
    """Q6_K: 128 bytes ql, 64 bytes qh, 16 int8 scales (one per 16 weights), f16 d; q in -32..31."""
    d = _half(builder, builder.add(wb, _c64(208)))
    blocks = []
    for n in range(2):
        ql = [_bytes(builder, builder.add(wb, _c64(64 * n + 32 * i)), 32) for i in range(2)]
        qh = _bytes(builder, builder.add(wb, _c64(128 + 32 * n)), 32)
        for j in range(4):
            # weights 128n + 32j + l: nibble (low for j < 2) of ql[64n + 32(j & 1) + l], bits 2j.. of qh[l]
            lo = builder.and_(ql[j & 1], _bconst(15)) if j < 2 else builder.lshr(ql[j & 1], _bconst(4))
            hi = builder.shl(builder.and_(builder.lshr(qh, _bconst(2 * j)), _bconst(3)), _bconst(4))
            i = 8 * n + 2 * j
            blocks.append((builder.sub(builder.or_(lo, hi), _bconst(32)), True, i, i + 1, 128 * n + 32 * j))
    return _SuperBlock(d, _bytes(builder, builder.add(wb, _c64(192)), 16), blocks)


def _q2_k(builder: ir.IRBuilder, wb: ir.Value) -> _SuperBlock:
    """Q2_K: 16 bytes of (min << 4 | scale) per 16 weights, 64 bytes of 2-bit q, f16 d, f16 dmin."""
    d, dmin = _half_pair(builder, builder.add(wb, _c64(80)))
    sc = _bytes(builder, wb, 16)
    blocks = []
    for n in range(2):
        qs = _bytes(builder, builder.add(wb, _c64(16 + 32 * n)), 32)
        for j in range(4):
            i = 8 * n + 2 * j
            q = builder.and_(builder.lshr(qs, _bconst(2 * j)), _bconst(3))
            blocks.append((q, False, i, i + 1, 128 * n + 32 * j))
    return _SuperBlock(d, builder.and_(sc, _bconst(15, 16)), blocks, dmin, builder.lshr(sc, _bconst(4, 16)))


def _q3_k(builder: ir.IRBuilder, wb: ir.Value) -> _SuperBlock:
    """Q3_K: 32 bytes hmask, 64 bytes of 2-bit q, 12 bytes of 6-bit scales, f16 d; q in -4..3.

    Scale i's low nibble is nibble i // 8 of byte i % 8; its top 2 bits are bits 2(i // 4).. of byte 8 + i % 4.
    """
    d = _half(builder, builder.add(wb, _c64(108)))
    v = _bytes(builder, builder.add(wb, _c64(96)), 12)
    lo = builder.lshr(_lanes(builder, v, list(range(8)) * 2), _bconst([0] * 8 + [4] * 8, 16))
    hi = builder.lshr(_lanes(builder, v, [8, 9, 10, 11] * 4), _bconst([0] * 4 + [2] * 4 + [4] * 4 + [6] * 4, 16))
    sc = builder.or_(builder.and_(lo, _bconst(15, 16)), builder.shl(builder.and_(hi, _bconst(3, 16)), _bconst(4, 16)))
    hm = _bytes(builder, wb, 32)
    blocks = []
    for n in range(2):
        qs = _bytes(builder, builder.add(wb, _c64(32 + 32 * n)), 32)
        for j in range(4):
            # low 2 bits from qs, minus 4 where bit 4n + j of hmask is clear
            low = builder.and_(builder.lshr(qs, _bconst(2 * j)), _bconst(3))
            hb = builder.and_(builder.lshr(hm, _bconst(4 * n + j)), _bconst(1))
            i = 8 * n + 2 * j
            q = builder.sub(builder.add(low, builder.shl(hb, _bconst(2))), _bconst(4))
            blocks.append((q, True, i, i + 1, 128 * n + 32 * j))
    return _SuperBlock(d, builder.sub(sc, _bconst(32, 16)), blocks)


def _iq4_xs(builder: ir.IRBuilder, wb: ir.Value) -> _SuperBlock:
    """IQ4_XS: f16 d, uint16 scales_h, 4 bytes scales_l, 128 bytes of level indices (IQ4_NL order per 32).

    ls of sub-block i = nibble i % 2 of scales_l[i // 2] | (bits 2i..2i+1 of scales_h) << 4; scale = ls - 32.
    """
    lo = _lanes(builder, _bytes(builder, builder.add(wb, _c64(4)), 4), [0, 0, 1, 1, 2, 2, 3, 3])
    lo = builder.and_(builder.lshr(lo, _bconst([0, 4] * 4, 8)), _bconst(15, 8))
    h = _lanes(builder, _bytes(builder, builder.add(wb, _c64(2)), 2), [0, 0, 0, 0, 1, 1, 1, 1])
    hi = builder.and_(builder.lshr(h, _bconst([0, 2, 4, 6] * 2, 8)), _bconst(3, 8))
    ls = builder.or_(lo, builder.shl(hi, _bconst(4, 8)))
    blocks = []
    for i in range(8):
        q = _iq4_levels(builder, _nibbles(builder, builder.add(wb, _c64(8 + 16 * i))))
        blocks.append((q, True, i, i, 32 * i))
    return _SuperBlock(_half(builder, wb), builder.sub(ls, _bconst(32, 8)), blocks)


row_dot_q2_k_f32, row_dot_q2_k_q8_k = _super_block_row_dots("Q2_K", 84, _q2_k)
row_dot_q3_k_f32, row_dot_q3_k_q8_k = _super_block_row_dots("Q3_K", 110, _q3_k)
row_dot_q4_k_f32, row_dot_q4_k_q8_k = _super_block_row_dots("Q4_K", 144, _q4_k)
row_dot_q5_k_f32, row_dot_q5_k_q8_k = _super_block_row_dots("Q5_K", 176, _q5_k)
row_dot_q6_k_f32, row_dot_q6_k_q8_k = _super_block_row_dots("Q6_K", 210, _q6_k)
row_dot_iq4_xs_f32, row_dot_iq4_xs_q8_k = _super_block_row_dots("IQ4_XS", 136, _iq4_xs)
