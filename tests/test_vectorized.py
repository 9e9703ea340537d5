"""Hot kernels must compile to packed SIMD: a stray float64 or a non-contiguous access silently de-vectorizes them.

Numba refuses to show assembly for functions loaded from its cache, so each kernel's
Python source is compiled afresh here with the same options and its assembly inspected.
"""

from __future__ import annotations

import re

import numba
import numpy as np
import pytest

from lmap.kernels import ops
from lmap.kernels.simd import VNNI
from lmap.quants import KERNELS

# packed float arithmetic on 256-bit registers, or 512-bit ones where LLVM's tuning for the host
# prefers them (Zen 4/5 compile the Q8_0 mat-vec to zmm only)
PACKED = re.compile(r"\b(vfmadd\d{3}ps|vmulps|vaddps)\b[^\n]*%[yz]mm")


def has_avx2() -> bool:
    try:
        return "avx2" in open("/proc/cpuinfo").read()
    except OSError:
        return False


pytestmark = pytest.mark.skipif(not has_avx2(), reason="checks AVX2 code generation")


def fresh_asm(dispatcher, *args) -> str:  # type: ignore[no-untyped-def]
    opts = {k: v for k, v in dispatcher.targetoptions.items() if k in ("fastmath", "parallel")}
    f = numba.njit(**opts)(dispatcher.py_func)
    f(*args)
    return "\n".join(f.inspect_asm().values())


@pytest.mark.parametrize("fmt", sorted(KERNELS))
def test_matvec_is_vectorized(fmt: str) -> None:
    k = KERNELS[fmt]
    cols, rows = 256, 4
    from lmap.quants.formats import FORMATS_BY_NAME

    f = FORMATS_BY_NAME[fmt]
    width = f.row_bytes(cols) // np.dtype(k.view_dtype).itemsize
    w = np.zeros((rows, width), k.view_dtype)
    asm = fresh_asm(k.matvec, w, np.zeros(cols, np.float32), np.zeros(rows, np.float32))
    assert PACKED.search(asm), f"{fmt} matvec has no packed ymm/zmm float arithmetic"


def test_rmsnorm_and_swiglu_are_vectorized() -> None:
    x = np.zeros((2, 64), np.float32)
    for rmsnorm in (ops.rmsnorm_serial, ops.rmsnorm_parallel):
        assert PACKED.search(fresh_asm(rmsnorm, x, np.zeros(64, np.float32), 1e-5, x.copy()))
    for swiglu in (ops.swiglu_serial, ops.swiglu_parallel):
        assert PACKED.search(fresh_asm(swiglu, x, x.copy()))


@pytest.mark.parametrize("kernel", ["attention_parallel", "attention_serial"])
def test_attention_is_vectorized(kernel: str) -> None:
    q = np.zeros((1, 4, 64), np.float32)
    kc = np.zeros((8, 2, 64), np.uint16)
    asm = fresh_asm(
        getattr(ops, kernel),
        q,
        kc,
        kc.copy(),
        np.zeros(1, np.int32),
        np.zeros(8, np.int32),
        8,
        0.125,
        0,
        0.0,
        np.zeros((numba.config.NUMBA_NUM_THREADS, 8), np.float32),
        np.zeros((1, 4, 64), np.float32),
    )
    assert PACKED.search(asm)


@pytest.mark.parametrize("fmt", sorted(f for f, k in KERNELS.items() if k.matvec_q8 is not None))
def test_integer_matvec_uses_avx2_int8_madd(fmt: str) -> None:
    from lmap.quants.formats import FORMATS_BY_NAME

    k = KERNELS[fmt]
    cols, rows = 256, 4
    w = np.zeros((rows, FORMATS_BY_NAME[fmt].row_bytes(cols)), np.uint8)
    nb = cols // 32
    asm = fresh_asm(
        k.matvec_q8,
        w,
        np.zeros(cols, np.int8),
        np.zeros(nb, np.float32),
        np.zeros(nb, np.float32),
        np.zeros(rows, np.float32),
    )
    if re.search(r"\bvpdpbusd\b[^\n]*%ymm", asm):  # VNNI: both steps in one instruction
        assert VNNI, f"{fmt}: vpdpbusd although the VNNI path is off"
        return
    assert not VNNI or fmt.endswith("_K") or fmt == "IQ4_XS", f"{fmt}: VNNI host but no vpdpbusd"
    assert re.search(r"\bvpmaddubsw\b[^\n]*%ymm", asm), f"{fmt} integer matvec lost its vpmaddubsw"
    assert re.search(r"\bvpmaddwd\b[^\n]*%ymm", asm)


def test_prompt_gemm_uses_512_bit_vnni() -> None:
    """The integer prompt GEMM's micro-kernel: vpdpbusd on zmm where the host has AVX512-VNNI."""
    from lmap.kernels.igemm import PANEL, VNNI512

    if not VNNI512:
        pytest.skip("no AVX512-VNNI here: the prompt path keeps dequantized tiles + BLAS")
    kernel = PANEL[(32, 2)]

    @numba.njit
    def call(w, a, b, x, d, s, out):  # type: ignore[no-untyped-def]
        kernel(
            w.ctypes.data,
            a.ctypes.data,
            b.ctypes.data,
            x.ctypes.data,
            64,
            d.ctypes.data,
            s.ctypes.data,
            8,
            out.ctypes.data,
            128,
            4,
            2,
        )

    call(
        np.zeros(64 * 32, np.uint8),
        np.zeros(64, np.float32),
        np.zeros(64, np.float32),
        np.zeros((4, 64), np.int8),
        np.zeros((4, 2), np.float32),
        np.zeros((4, 2), np.float32),
        np.zeros((4, 32), np.float32),
    )
    asm = "\n".join(call.inspect_asm().values())
    assert re.search(r"\bvpdpbusd\b[^\n]*%zmm", asm), "the panel kernel lost its 512-bit vpdpbusd"


def test_prompt_softmax_is_vectorized() -> None:
    """The masked softmax of prompt attention: the mask-and-max loop in packed vmaxps (a stray
    comparison of floats with -inf under fast-math once made LLVM drop or scalarize it)."""
    from lmap.kernels import attention

    asm = fresh_asm(
        attention._masked_softmax_serial,
        np.zeros((4, 64), np.float32),
        1,
        np.zeros(4, np.int32),
        np.zeros(64, np.int32),
        0,
        0.0,
        np.zeros(4, np.float32),
    )
    assert re.search(r"\bvmaxps\b[^\n]*%[yz]mm", asm)
    assert PACKED.search(asm)
