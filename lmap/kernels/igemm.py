"""Prompt products in 8-bit integers: weight panels times quantized activations, as a GEMM.

A prompt's product ``out[n, rows] = x[n, k] @ W.T`` used to dequantize W to float32 tiles and
call sgemm. With activations already rounded to llama.cpp's 8-bit grid, the same sums exist
in integers: an AVX512-VNNI ``vpdpbusd`` does 64 byte products per instruction where an FMA
does 16 float ones. This module is the register-blocked micro-kernel; ``prompt.py`` feeds it
panels of weights unpacked to bytes.

Layout (one panel of ``16 * nc`` weight rows, "columns" of out):

* ``w``: uint8 ``[nsub][sub / 4][nc * 16][4]``: for each group of 4 inputs, 4 bytes per column,
  so one 64-byte load holds 16 columns' 4 weights and ``vpdpbusd`` sums each column's 4
  products with one activation's 4 bytes (broadcast) into its int32 lane;
* ``a``, ``b``: float32 ``[nsub][nc * 16]``: a weight is ``a * u + b`` for its byte u in the
  sub-block (Q4_0: a = d, b = -8 d; Q4_K: a = d * sc, b = -dmin * m; ...);
* activations: int8 ``x[n, k]`` with float32 ``dx[n, nsub]`` (the scale of the 8-bit block the
  sub-block lies in) and ``xs[n, nsub]`` (dx times the sub-block's sum of q), so that

      out[r, c] = sum over sub-blocks of  dx * a[c] * isum(u, q)  +  xs * b[c].

Weights are unsigned (offset by b), activations signed: the operand order vpdpbusd wants.
Without VNNI the same function is emitted in portable vector IR (correct everywhere, slow);
the prompt path uses the integer GEMM only where VNNI makes it pay.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .simd import SIMD, _c64, _f32, _fmadd, _host_has, _i8, _i32, _load, _loop, _splat, _vec

VNNI512 = SIMD == "auto" and _host_has("avx512vnni") and _host_has("avx512bw") and _host_has("avx512f")

ROWS = 4  # activation rows per register block: 4 x nc int32 + 4 x nc float accumulators
_v16i, _v16f, _v64b = _vec(_i32, 16), _vec(_f32, 16), _vec(_i8, 64)


def _dpbusd(builder: ir.IRBuilder, acc: ir.Value, u: ir.Value, x: ir.Value) -> ir.Value:
    """acc[i] + sum of 4 products u[4i + t] (unsigned bytes) * x[4i + t] (signed bytes)."""
    mod = builder.module
    if VNNI512:
        name = "llvm.x86.avx512.vpdpbusd.512"
        fn = mod.globals.get(name) or ir.Function(mod, ir.FunctionType(_v16i, [_v16i] * 3), name)
        return builder.call(fn, [acc, u, x])
    v64 = _vec(_i32, 64)
    p = builder.mul(builder.zext(builder.bitcast(u, _v64b), v64), builder.sext(builder.bitcast(x, _v64b), v64))
    parts = [builder.shuffle_vector(p, p, ir.Constant(_v16i, [4 * i + t for i in range(16)])) for t in range(4)]
    return builder.add(acc, builder.add(builder.add(parts[0], parts[1]), builder.add(parts[2], parts[3])))


def _panel_kernel(sub: int, nc: int):  # type: ignore[no-untyped-def]
    """The micro-kernel for sub-blocks of ``sub`` inputs and panels of ``16 * nc`` columns."""
    groups = sub // 4
    wstep = 64 * nc  # bytes of the panel per group of 4 inputs

    def igemm(typingctx, w, a, b, x, xst, dx, xs, sst, out, ost, n, nsub):  # type: ignore[no-untyped-def]
        sig = types.void(*([types.int64] * 12))

        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            w, a, b, x, xst, dx, xs, sst, out, ost, n, nsub = args
            c = _c64

            def block(r0, count):  # type: ignore[no-untyped-def]
                xr = [builder.add(x, builder.mul(builder.add(r0, c(j)), xst)) for j in range(count)]
                sr = [builder.mul(builder.add(r0, c(j)), sst) for j in range(count)]

                def body(s, facc):  # type: ignore[no-untyped-def]
                    iacc = [ir.Constant(_v16i, None)] * (count * nc)
                    wsub = builder.add(w, builder.mul(s, c(groups * wstep)))
                    for g in range(groups):
                        wv = [_load(builder, builder.add(wsub, c(g * wstep + 64 * k)), _v16i, 1) for k in range(nc)]
                        for j in range(count):
                            xa = builder.add(xr[j], builder.add(builder.mul(s, c(sub)), c(4 * g)))
                            xb = _splat(builder, _load(builder, xa, _i32), 16)
                            for k in range(nc):
                                iacc[j * nc + k] = _dpbusd(builder, iacc[j * nc + k], wv[k], xb)
                    soff = builder.mul(s, c(4))
                    aoff = builder.mul(s, c(64 * nc))
                    av = [_load(builder, builder.add(a, builder.add(aoff, c(64 * k))), _v16f, 4) for k in range(nc)]
                    bv = [_load(builder, builder.add(b, builder.add(aoff, c(64 * k))), _v16f, 4) for k in range(nc)]
                    new = list(facc)
                    for j in range(count):
                        dj = _splat(builder, _load(builder, builder.add(dx, builder.add(sr[j], soff)), _f32, 4), 16)
                        sj = _splat(builder, _load(builder, builder.add(xs, builder.add(sr[j], soff)), _f32, 4), 16)
                        for k in range(nc):
                            i = j * nc + k
                            t = builder.sitofp(iacc[i], _v16f)
                            new[i] = _fmadd(builder, t, builder.fmul(av[k], dj), new[i])
                            new[i] = _fmadd(builder, sj, bv[k], new[i])
                    return new

                facc = _loop(builder, nsub, [ir.Constant(_v16f, None)] * (count * nc), body)
                for j in range(count):
                    orow = builder.add(out, builder.mul(builder.add(r0, c(j)), ost))
                    for k in range(nc):
                        ptr = builder.inttoptr(builder.add(orow, c(64 * k)), _v16f.as_pointer())
                        builder.store(facc[j * nc + k], ptr, align=4)

            full = builder.sdiv(n, c(ROWS))

            def per_group(g, vals):  # type: ignore[no-untyped-def]
                block(builder.mul(g, c(ROWS)), ROWS)
                return vals

            _loop(builder, full, [], per_group)
            rest0 = builder.mul(full, c(ROWS))

            def per_row(i, vals):  # type: ignore[no-untyped-def]
                block(builder.add(rest0, i), 1)
                return vals

            _loop(builder, builder.sub(n, rest0), [], per_row)
            return context.get_dummy_value()

        return sig, codegen

    igemm.__name__ = igemm.__qualname__ = f"igemm_s{sub}_c{nc}"
    return intrinsic(igemm)


PANEL = {(s, nc): _panel_kernel(s, nc) for s in (16, 32) for nc in (1, 2)}


def _load_unsigned(bits: int):  # type: ignore[no-untyped-def]
    def load(typingctx, addr):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.zext(_load(builder, args[0], ir.IntType(bits)), ir.IntType(64))

        return types.int64(types.int64), codegen

    load.__name__ = load.__qualname__ = f"load_u{bits}"
    return intrinsic(load)


# the unsigned little-endian 1, 2 or 4 bytes at an address (any alignment), widened to int64
load_u8, load_u16, load_u32 = _load_unsigned(8), _load_unsigned(16), _load_unsigned(32)


@intrinsic
def store_u32(typingctx, addr, value):  # type: ignore[no-untyped-def]
    """Store the low 32 bits of ``value`` at ``addr`` (any alignment)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], _i32.as_pointer())
        builder.store(builder.trunc(args[1], _i32), ptr, align=1)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen
