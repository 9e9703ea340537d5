"""Block quantizers (lmap.quants.quantize) against the references nobody here wrote.

- gguf-py's ``quantize`` (llama.cpp's reference quantizers in numpy) for the formats it has:
  byte-identical over hypothesis-drawn shapes and value scales.
- llama.cpp itself: bytes recorded from libggml-base's ``ggml_quantize_chunk`` by
  scripts/make_quantize_fixtures.py (tests/fixtures/quantize_blocks.npz), every format, with
  and without an importance matrix: byte-identical.
- gguf-py's ``dequantize``: round-trip RMSE and dot-product error on llama.cpp's
  test-quantize-fns synthetic data within that test's thresholds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmap.errors import InvalidParameterError
from lmap.quants.formats import FORMATS_BY_NAME
from lmap.quants.quantize import SUPPORTED, quantize_rows

gguf = pytest.importorskip("gguf")
GT = gguf.GGMLQuantizationType

FIXTURE = Path(__file__).parent / "fixtures" / "quantize_blocks.npz"

GGUF_FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]
ALL_FORMATS = GGUF_FORMATS + ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"]


def _gguf_bytes(fmt: str, x: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):  # f16 scales of huge blocks overflow to inf, as in llama.cpp
        q = gguf.quants.quantize(x, GT[fmt])
    return np.ascontiguousarray(q).view(np.uint8).reshape(x.shape[0], -1)


def _data(seed: int, kind: str, scale: float, rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "normal":
        x = rng.standard_normal((rows, cols))
    elif kind == "heavy":
        x = np.clip(rng.standard_t(2, (rows, cols)), -1000.0, 1000.0)
    elif kind == "ties":
        # quarter-integers: x / d lands on .5 exactly for many blocks (Q8_0's roundf, the +0.5 truncations)
        x = rng.integers(-16, 17, (rows, cols)) * 0.25
    elif kind == "positive":
        x = rng.uniform(0.5, 2.0, (rows, cols))
    else:  # sparse: mostly zeros, some blocks all zero
        x = rng.standard_normal((rows, cols)) * (rng.random((rows, cols)) < 0.05)
    x = (x * scale).astype(np.float32)
    if rows > 1:
        x[rows // 2] = 0.0
    # +0.0: gguf-py takes the sign of an all-zero block's scale from its first value, llama.cpp
    # from a +0.0 it starts with (see test_negative_zero_block_follows_llama_cpp)
    return x + np.float32(0.0)


SCALES = [1e-30, 1e-6, 1.0, 3.0, 1e6, 1e30, 1e35]  # 1e35 * 1000: max - min stays finite


@pytest.mark.parametrize("fmt", GGUF_FORMATS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    kind=st.sampled_from(["normal", "heavy", "ties", "positive", "sparse"]),
    scale=st.sampled_from(SCALES),
    rows=st.integers(1, 5),
    nblocks=st.integers(1, 9),
)
def test_byte_identical_to_gguf(fmt: str, seed: int, kind: str, scale: float, rows: int, nblocks: int) -> None:
    # tiny scales stop at 1e-30: below ~1e-36 the C computes 1/d = inf and converts inf to int (undefined)
    cols = nblocks * 32
    x = _data(seed, kind, scale, rows, cols)
    want = _gguf_bytes(fmt, x)
    got = quantize_rows(fmt, x)
    assert got.dtype == np.uint8 and got.shape == (rows, FORMATS_BY_NAME[fmt].row_bytes(cols))
    np.testing.assert_array_equal(got, want)


def test_float_formats_special_values() -> None:
    x = np.array(
        [[0.0, -0.0, 1.0, -2.5, 65504.0, 65520.0, 1e9, -np.inf, np.inf, 6e-8, 1e-45, 3.4e38, 1.00390625, 1.01171875]],
        np.float32,
    )
    for fmt in ("F32", "F16", "BF16"):
        np.testing.assert_array_equal(quantize_rows(fmt, x), _gguf_bytes(fmt, x), err_msg=fmt)
    # NaN stays NaN (llama.cpp and gguf-py quiet it for BF16)
    nan = np.array([[np.nan, -np.nan]], np.float32)
    for fmt, dt in (("F16", np.float16), ("BF16", None)):
        b = quantize_rows(fmt, nan).view(np.uint16)
        if dt is not None:
            assert np.isnan(b.view(dt)).all()
        else:
            assert ((b & 0x7F80) == 0x7F80).all() and (b & 0x7F).all()


def test_negative_zero_block_follows_llama_cpp() -> None:
    # llama.cpp's quantize_row_q4_0_ref starts from max = +0.0, so an all-zero block gets d = 0 / -8 = -0.0
    # (f16 0x8000) whatever the zeros' signs; gguf-py would take -0.0 / -8 = +0.0 from a leading -0.0
    x = np.full((1, 32), -0.0, np.float32)
    for fmt in ("Q4_0", "Q5_0"):
        got = quantize_rows(fmt, x)
        assert got[0, 0] == 0 and got[0, 1] == 0x80, fmt
    np.testing.assert_array_equal(quantize_rows("Q4_0", np.zeros((1, 32), np.float32))[0, :2], [0, 0x80])


@pytest.mark.parametrize("fmt", sorted(SUPPORTED))
def test_bad_columns_and_format(fmt: str) -> None:
    bs = FORMATS_BY_NAME[fmt].block_size
    if bs > 1:
        with pytest.raises(InvalidParameterError, match=rf"{fmt}.*{bs + 1}"):
            quantize_rows(fmt, np.zeros((2, bs + 1), np.float32))
    with pytest.raises(InvalidParameterError, match="imatrix"):
        quantize_rows(fmt, np.zeros((2, 256), np.float32), imatrix=np.ones(255, np.float32))


def test_unknown_format() -> None:
    with pytest.raises(InvalidParameterError, match="Q9_9"):
        quantize_rows("Q9_9", np.zeros((1, 32), np.float32))
    with pytest.raises(InvalidParameterError, match="IQ2_XXS"):
        quantize_rows("IQ2_XXS", np.zeros((1, 256), np.float32))


def test_supported_formats() -> None:
    assert set(GGUF_FORMATS) <= SUPPORTED


def test_empty_and_non_contiguous() -> None:
    assert quantize_rows("Q8_0", np.zeros((0, 64), np.float32)).shape == (0, 68)
    x = np.random.default_rng(1).standard_normal((64, 6)).astype(np.float64)
    xt = x.T  # float64, Fortran order: converted like np.asarray(..., float32)
    np.testing.assert_array_equal(quantize_rows("Q4_1", xt), _gguf_bytes("Q4_1", np.ascontiguousarray(xt, np.float32)))


# ---------------------------------------------------------------------------- llama.cpp's own bytes


def _fixture() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as d:
        return {k: d[k] for k in d.files}


@pytest.mark.parametrize("fmt", [f for f in ALL_FORMATS if f != "F32"])
@pytest.mark.parametrize("cols", [768, 256])
def test_byte_identical_to_llama_cpp(fmt: str, cols: int) -> None:
    fx = _fixture()
    x = fx[f"x_c{cols}"]
    np.testing.assert_array_equal(quantize_rows(fmt, x), fx[f"{fmt}_c{cols}"], err_msg=fmt)
    key = f"{fmt}_c{cols}_imatrix"
    if key in fx:
        got = quantize_rows(fmt, x, imatrix=fx[f"imatrix_c{cols}"])
        np.testing.assert_array_equal(got, fx[key], err_msg=f"{fmt} with imatrix")
    else:  # llama.cpp ignores the importance for these: so must we
        np.testing.assert_array_equal(quantize_rows(fmt, x, imatrix=fx[f"imatrix_c{cols}"]), fx[f"{fmt}_c{cols}"])


def test_imatrix_changes_the_search() -> None:
    fx = _fixture()
    x, qw = fx["x_c768"], fx["imatrix_c768"]
    for fmt in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"):
        assert (quantize_rows(fmt, x, imatrix=qw) != quantize_rows(fmt, x)).any(), fmt


# ---------------------------------------------------------------------------- test-quantize-fns bounds


def _generate_data(offset: float, n: int, amplitude: float = 2.0) -> np.ndarray:
    # tests/test-quantize-fns.cpp: dst[i] = 0.1 + amplitude * cosf(i + offset), i + offset in float
    i = np.arange(n, dtype=np.float32) + np.float32(offset)
    return (0.1 + (np.float32(amplitude) * np.cos(i)).astype(np.float64)).astype(np.float32)


# MAX_QUANTIZATION_TOTAL_ERROR(_2BITS, _3BITS) and MAX_DOT_PRODUCT_ERROR(_LOWBIT) by type
TOTAL_ERROR = {"Q2_K": 0.0075, "Q3_K": 0.0040}
DOT_ERROR = {"Q2_K": 0.04}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_quantize_fns_error_bounds(fmt: str) -> None:
    from lmap.quants import KERNELS

    n = 32 * 128
    data1 = _generate_data(0.0, n)
    data2 = _generate_data(1.0, n)
    q = quantize_rows(fmt, data1[None, :])
    back = np.asarray(gguf.quants.dequantize(q[0], GT[fmt]), np.float32).reshape(-1)
    # array_rmse as the C test defines it: sqrt(sum of squares) / n
    err = np.sqrt(np.sum((data1.astype(np.float64) - back) ** 2)) / n
    assert err < TOTAL_ERROR.get(fmt, 0.002), (fmt, err)

    # dot product with activations quantized the way llama.cpp pairs them (its vec_dot_type)
    k = KERNELS[fmt]
    w = q.view(k.view_dtype)
    out = np.zeros(1, np.float32)
    if k.matvec_q8 is not None:
        xq = np.zeros(n, np.int8)
        xd = np.zeros(n // 32, np.float32)
        xs = np.zeros(n // 32, np.float32)
        k.quantize(data2, xq, xd, xs)
        k.matvec_q8(w, xq, xd, xs, out)
    else:
        x2 = data2[None, :].copy()
        if k.activation is not None:
            k.activation(data2[None, :], x2)
        k.matvec(w, x2[0], out)
    ref = float(np.dot(data1.astype(np.float64), data2.astype(np.float64)))
    dot_err = abs(float(out[0]) - ref) / n
    assert dot_err < DOT_ERROR.get(fmt, 0.02), (fmt, dot_err)


# ---------------------------------------------------------------------------- shapes, rows, imatrix

# relative RMS error on normal data, about 1.4x what llama.cpp's quantizers reach on 1024-wide rows
REL_RMS = {
    "F32": 0.0,
    "F16": 0.0004,
    "BF16": 0.003,
    "Q8_0": 0.008,
    "Q4_0": 0.13,
    "Q4_1": 0.12,
    "Q5_0": 0.065,
    "Q5_1": 0.06,
    "Q2_K": 0.42,
    "Q3_K": 0.22,
    "Q4_K": 0.11,
    "Q5_K": 0.055,
    "Q6_K": 0.028,
    "IQ4_NL": 0.11,
    "IQ4_XS": 0.11,
}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    rows=st.integers(1, 9),
    nblocks=st.integers(1, 3),
    with_imatrix=st.booleans(),
)
def test_rows_are_independent_and_dequantize(fmt: str, seed: int, rows: int, nblocks: int, with_imatrix: bool) -> None:
    cols = 256 * nblocks
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-3, 3, (rows, 1)))).astype(np.float32)
    qw = np.exp(rng.standard_normal(cols)).astype(np.float32) if with_imatrix else None
    q = quantize_rows(fmt, x, qw)
    # parallel rows: each row's bytes are what quantizing it alone gives
    for r in range(rows):
        np.testing.assert_array_equal(q[r : r + 1], quantize_rows(fmt, x[r : r + 1], qw))
    back = np.asarray(gguf.quants.dequantize(q, GT[fmt]), np.float32).reshape(rows, cols)
    rel = np.sqrt(np.mean((back - x) ** 2, axis=1) / np.mean(x**2, axis=1))
    assert (rel <= REL_RMS[fmt] * 1.5 if cols == 256 else rel <= REL_RMS[fmt]).all(), (fmt, rel)


@pytest.mark.parametrize("fmt", ALL_FORMATS)
def test_zero_rows_dequantize_to_zero(fmt: str) -> None:
    x = np.zeros((3, 512), np.float32)
    x[1, 256:] = 1.0  # a zero super-block next to a constant one
    for qw in (None, np.ones(512, np.float32)):
        back = np.asarray(gguf.quants.dequantize(quantize_rows(fmt, x, qw), GT[fmt]), np.float32).reshape(x.shape)
        np.testing.assert_array_equal(back[0], 0.0)
        np.testing.assert_array_equal(back[1, :256], 0.0)
        np.testing.assert_allclose(back[1, 256:], 1.0, rtol=0.02, atol=0.02)
