"""Block-format kernels against the gguf package (written by the llama.cpp project, not us).

Dequantization must be bit-exact with ``gguf.quants.dequantize``; the fused
mat-vec must agree with a float64 dot of those dequantized rows within a tight
rounding bound, and within llama.cpp's test-quantize-fns bound (0.02 normalised).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from lmap.gguf import TensorInfo
from lmap.quants import KERNELS, QMatrix
from lmap.quants.formats import FORMATS, FORMATS_BY_NAME

# formats gguf can quantize for us; the K-quants get their own quantizer later (issue 3)
QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
MAX_DOT_PRODUCT_ERROR = 0.02  # llama.cpp tests/test-quantize-fns.cpp


def make_matrix(fmt: str, rows: int, cols: int, seed: int = 0) -> tuple[QMatrix, np.ndarray]:
    """A QMatrix of random weights in ``fmt`` and gguf's float32 dequantization of it."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * 0.5 + 0.1 * np.cos(np.arange(cols))).astype(np.float32)
    qt = gguf.GGMLQuantizationType[fmt]
    raw = quantize(w, qt)
    ref = dequantize(raw, qt).reshape(rows, cols).astype(np.float32)
    info = TensorInfo("w", (cols, rows), FORMATS_BY_NAME[fmt], 0, raw.nbytes)
    return QMatrix(info, raw.reshape(rows, -1)), ref


@pytest.mark.parametrize("fmt", QUANTIZABLE)
@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 96), (33, 160), (5, 256)])
def test_dequantize_bit_exact(fmt: str, rows: int, cols: int) -> None:
    m, ref = make_matrix(fmt, rows, cols)
    out = np.full((rows, cols), np.nan, np.float32)
    m.dequantize_rows(0, rows, out)
    assert np.array_equal(out, ref)
    # a sub-range of rows lands at the top of out
    part = np.zeros((2, cols), np.float32)
    m.dequantize_rows(rows - 1, rows, part)
    assert np.array_equal(part[0], ref[rows - 1])


@pytest.mark.parametrize("fmt", QUANTIZABLE)
@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 96), (33, 160), (257, 576)])
def test_matvec_matches_reference_dot(fmt: str, rows: int, cols: int) -> None:
    m, ref = make_matrix(fmt, rows, cols, seed=rows)
    x = np.random.default_rng(1).standard_normal(cols).astype(np.float32)
    out = np.zeros(rows, np.float32)
    m.matvec(x, out)
    exact = ref.astype(np.float64) @ x.astype(np.float64)
    # float32 accumulation over `cols` terms: a few ulps of the sum of |terms|
    bound = 1e-5 * (np.abs(ref) @ np.abs(x)) + 1e-6
    assert np.all(np.abs(out - exact) <= bound), np.max(np.abs(out - exact) / bound)
    assert np.max(np.abs(out - exact)) / cols < MAX_DOT_PRODUCT_ERROR


@pytest.mark.parametrize("fmt", QUANTIZABLE)
def test_matmul_tiles_equal_matvec(fmt: str) -> None:
    m, ref = make_matrix(fmt, 45, 64, seed=3)
    x = np.random.default_rng(2).standard_normal((5, 64)).astype(np.float32)
    out = np.zeros((5, 45), np.float32)
    m.matmul(x, out, np.zeros(64 * 8, np.float32))  # tile of 8 rows: several tiles and a ragged last one
    np.testing.assert_allclose(out, x @ ref.T, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), blocks=st.integers(1, 6), fmt=st.sampled_from(QUANTIZABLE), seed=st.integers(0, 2**16))
def test_kernels_any_shape(rows: int, blocks: int, fmt: str, seed: int) -> None:
    m, ref = make_matrix(fmt, rows, 32 * blocks, seed)
    out = np.zeros((rows, 32 * blocks), np.float32)
    m.dequantize_rows(0, rows, out)
    assert np.array_equal(out, ref)
    x = np.random.default_rng(seed).standard_normal(32 * blocks).astype(np.float32)
    y = np.zeros(rows, np.float32)
    m.matvec(x, y)
    np.testing.assert_allclose(y, ref @ x, rtol=1e-4, atol=1e-4)


def test_every_kernel_format_is_in_the_table() -> None:
    for name in KERNELS:
        assert name in FORMATS_BY_NAME
        assert FORMATS_BY_NAME[name].type_id in FORMATS


@pytest.mark.slow
def test_real_model_tensors_bit_exact(smollm2_path) -> None:
    from lmap.gguf import GGUFFile

    g = GGUFFile(smollm2_path)
    r = gguf.GGUFReader(smollm2_path)
    seen = set()
    for t in r.tensors:
        fmt = t.tensor_type.name
        if fmt in seen or len(t.shape) != 2:
            continue
        seen.add(fmt)
        m = QMatrix(g.tensors[t.name], g.tensor(t.name))
        rows = min(m.rows, 300)
        out = np.zeros((rows, m.cols), np.float32)
        m.dequantize_rows(0, rows, out)
        ref = dequantize(np.asarray(t.data)[:rows], t.tensor_type).reshape(rows, m.cols)
        assert np.array_equal(out, ref), t.name
    assert {"Q4_1", "Q8_0"} <= seen


def test_activation_quantization_equals_gguf_q8_0() -> None:
    """ops.quantize_q8 produces the same int8 values and f16 scales as gguf's Q8_0 quantizer."""
    from lmap.kernels import ops

    x = np.random.default_rng(5).standard_normal(32 * 40).astype(np.float32) * 3
    q, d, s = np.zeros(x.size, np.int8), np.zeros(40, np.float32), np.zeros(40, np.float32)
    ops.quantize_q8(x, q, d, s)
    ref = quantize(x.reshape(1, -1), gguf.GGMLQuantizationType.Q8_0).reshape(40, 34)
    assert np.array_equal(ref[:, :2].copy().view(np.float16).astype(np.float32).reshape(-1), d)
    assert np.array_equal(ref[:, 2:].copy().view(np.int8).reshape(-1), q)
    # Q8_1's extra term: f16 of scale x sum(q), computed from the unrounded scale
    unrounded = np.abs(x.reshape(40, 32)).max(axis=1) / np.float32(127)
    expect = (q.reshape(40, 32).sum(axis=1).astype(np.float32) * unrounded).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(s, expect)


@pytest.mark.parametrize("fmt", [f for f in QUANTIZABLE if KERNELS[f].matvec_q8 is not None])
@pytest.mark.parametrize("rows,cols", [(1, 32), (7, 96), (257, 576)])
def test_integer_matvec_matches_llama_cpp_arithmetic(fmt: str, rows: int, cols: int) -> None:
    """The int8 SIMD product equals dequantized weights times dequantized 8-bit activations.

    The only rounding besides float32 accumulation is Q8_1's f16 (scale x sum) term, bounded per block.
    """
    from lmap.kernels import ops

    m, ref = make_matrix(fmt, rows, cols, seed=rows + cols)
    x = np.random.default_rng(7).standard_normal(cols).astype(np.float32)
    q, d, s = np.zeros(cols, np.int8), np.zeros(cols // 32, np.float32), np.zeros(cols // 32, np.float32)
    ops.quantize_q8(x, q, d, s)
    xr = (np.repeat(d, 32) * q).astype(np.float64)
    out = np.zeros(rows, np.float32)
    KERNELS[fmt].matvec_q8(m.data, q, d, s, out)
    exact = ref.astype(np.float64) @ xr
    bound = 1e-5 * (np.abs(ref) @ np.abs(xr)) + 1e-6
    if fmt == "Q4_1":  # m_w * f16(d_x * sum q_x) instead of m_w * d_x * sum q_x
        mins = ref.reshape(rows, -1, 32).min(axis=2)  # |m_w| <= |min of the block| for Q4_1
        bound += np.abs(mins) @ np.abs(s) * 2.0**-10
    assert np.all(np.abs(out - exact) <= bound), np.max(np.abs(out - exact) / bound)
    # and against the unquantized activations, llama.cpp's test-quantize-fns bound
    assert np.max(np.abs(out - ref.astype(np.float64) @ x)) / cols < MAX_DOT_PRODUCT_ERROR
