"""Q5_0, Q5_1, the K-quants and IQ4 against the gguf package (written by the llama.cpp project, not us).

gguf can quantize Q5_0 / Q5_1 only; for the others random blocks are built straight from
random bytes with sane f16 scales, since dequantization is defined for any bytes. Row
lengths are a multiple of the block size and of nothing larger (32 * odd, 256 * odd).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize
from hypothesis import given, settings
from hypothesis import strategies as st

from lmap.gguf import TensorInfo
from lmap.kernels import ops
from lmap.quants import KERNELS, ActScratch, QMatrix, iq4, q2_k, q3_k, q4_k, q5_k, q6_k
from lmap.quants.formats import FORMATS_BY_NAME
from lmap.quants.q8_k import quantize_q8_k, round_q8_k
from lmap.quants.q8_k import round_q8_k_scalar as q8_k_round_scalar

QUANTIZABLE = ["Q5_0", "Q5_1"]
# byte offsets of the f16 fields (scales, mins) in one block: random bytes there could be inf/nan
HALF_FIELDS = {
    "Q2_K": (80, 82),
    "Q3_K": (108,),
    "Q4_K": (0, 2),
    "Q5_K": (0, 2),
    "Q6_K": (208,),
    "IQ4_NL": (0,),
    "IQ4_XS": (0,),
}
RANDOM_BLOCKS = list(HALF_FIELDS)
FORMATS = QUANTIZABLE + RANDOM_BLOCKS
MAX_DOT_PRODUCT_ERROR = 0.02  # llama.cpp tests/test-quantize-fns.cpp


def shapes(fmt: str) -> list[tuple[int, int]]:
    bs = FORMATS_BY_NAME[fmt].block_size
    return [(1, bs), (7, 3 * bs), (33, 5 * bs), (4, bs)]


def make_matrix(fmt: str, rows: int, cols: int, seed: int = 0) -> tuple[QMatrix, np.ndarray]:
    """A QMatrix in ``fmt`` and gguf's float32 dequantization of it."""
    rng = np.random.default_rng(seed)
    f = FORMATS_BY_NAME[fmt]
    qt = gguf.GGMLQuantizationType[fmt]
    if fmt in QUANTIZABLE:
        w = (rng.standard_normal((rows, cols)) * 0.5 + 0.1 * np.cos(np.arange(cols))).astype(np.float32)
        raw = quantize(w, qt).reshape(rows, -1)
    else:
        nb = cols // f.block_size
        blocks = rng.integers(0, 256, (rows, nb, f.type_size), dtype=np.uint8)
        for o in HALF_FIELDS[fmt]:
            h = (rng.uniform(1e-3, 0.1, (rows, nb)) * rng.choice([-1, 1], (rows, nb))).astype(np.float16)
            blocks[:, :, o : o + 2] = h.view(np.uint8).reshape(rows, nb, 2)
        raw = blocks.reshape(rows, -1)
    ref = dequantize(raw, qt).reshape(rows, cols).astype(np.float32)
    info = TensorInfo("w", (cols, rows), f, 0, raw.nbytes)
    return QMatrix(info, raw), ref


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_bit_exact(fmt: str) -> None:
    for rows, cols in shapes(fmt):
        m, ref = make_matrix(fmt, rows, cols, seed=rows)
        out = np.full((rows, cols), np.nan, np.float32)
        m.dequantize_rows(0, rows, out)
        assert np.array_equal(out, ref), (rows, cols)
        # a sub-range of rows lands at the top of out
        part = np.zeros((2, cols), np.float32)
        m.dequantize_rows(rows - 1, rows, part)
        assert np.array_equal(part[0], ref[rows - 1])


def check_dot(out: np.ndarray, w: np.ndarray, x: np.ndarray) -> None:
    exact = w.astype(np.float64) @ x.astype(np.float64)
    # float32 accumulation over the row: a few ulps of the sum of |terms|
    bound = 1e-5 * (np.abs(w) @ np.abs(x)) + 1e-6
    assert np.all(np.abs(out - exact) <= bound), np.max(np.abs(out - exact) / bound)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matvec_matches_reference_dot(fmt: str) -> None:
    for rows, cols in [*shapes(fmt), (257, 9 * FORMATS_BY_NAME[fmt].block_size)]:
        m, ref = make_matrix(fmt, rows, cols, seed=rows + 1)
        x = np.random.default_rng(rows).standard_normal(cols).astype(np.float32)
        out = np.zeros(rows, np.float32)
        m.matvec(x, out)
        check_dot(out, ref, x)
        assert np.max(np.abs(out - ref.astype(np.float64) @ x)) / cols < MAX_DOT_PRODUCT_ERROR


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), blocks=st.integers(1, 5), fmt=st.sampled_from(FORMATS), seed=st.integers(0, 2**16))
def test_kernels_any_shape(rows: int, blocks: int, fmt: str, seed: int) -> None:
    cols = FORMATS_BY_NAME[fmt].block_size * blocks
    m, ref = make_matrix(fmt, rows, cols, seed)
    out = np.zeros((rows, cols), np.float32)
    m.dequantize_rows(0, rows, out)
    assert np.array_equal(out, ref)
    x = np.random.default_rng(seed).standard_normal(cols).astype(np.float32)
    y = np.zeros(rows, np.float32)
    m.matvec(x, y)
    check_dot(y, ref, x)


def test_activation_is_llama_cpp_vec_dot_type() -> None:
    """ggml-cpu's vec_dot_type: Q8_0 for Q5_0 and IQ4_NL, Q8_1 for Q5_1 (same rounding), Q8_K for the rest."""
    for fmt in ["Q5_0", "Q5_1", "IQ4_NL"]:
        assert KERNELS[fmt].activation is ops.round_q8
    for fmt in ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS"]:
        assert KERNELS[fmt].activation is round_q8_k
        assert KERNELS[fmt].quantize is quantize_q8_k and KERNELS[fmt].matvec_q8 is Q8K_KERNELS[fmt]


def q8_k_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy transcription of llama.cpp's quantize_row_q8_K_ref: (q int8 [blocks, 256], d float32 [blocks])."""
    blocks = x.astype(np.float32).reshape(-1, 256)
    q = np.zeros(blocks.shape, np.int8)
    d = np.zeros(len(blocks), np.float32)
    for i, blk in enumerate(blocks):
        j = int(np.argmax(np.abs(blk)))  # first of equal magnitudes, as its strict `>`
        if blk[j] == 0:
            continue
        iscale = np.float32(-127.0) / blk[j]
        # nearest_int adds 1.5 * 2^23: round half to even, as np.rint
        q[i] = np.minimum(np.float32(127), np.rint(iscale * blk)).astype(np.int8)
        d[i] = np.float32(1.0) / iscale
    return q, d


def test_round_q8_k_equals_llama_cpp_reference() -> None:
    rng = np.random.default_rng(11)
    x = (rng.standard_normal((4, 256 * 3)) * rng.uniform(0.01, 30, (4, 1))).astype(np.float32)
    x[1, 256:512] = 0  # an all-zero block
    x[2, :256] = np.round(x[2, :256])
    x[2, 3], x[2, 9] = -1000, 1000  # equal magnitudes: the first one sets the sign of d
    x[3, 300] = 1e4  # one outlier: the rest of its block rounds to small integers
    out = np.zeros_like(x)
    round_q8_k(x, out)
    q, d = q8_k_reference(x)
    expect = (d[:, None] * q.astype(np.float32)).reshape(x.shape)
    assert np.array_equal(out, expect)
    assert q.reshape(4, -1)[2, 3] == -127 and d.reshape(4, -1)[2, 0] > 0  # d = -1000 / -127
    # the integer form agrees with the rounded floats, and its 32-sums are those of q
    for t in range(4):
        xq, xd, xs = np.zeros(768, np.int8), np.zeros(3, np.float32), np.zeros(24, np.float32)
        quantize_q8_k(x[t], xq, xd, xs)
        assert np.array_equal(xq, q.reshape(4, -1)[t])
        assert np.array_equal(xd, d.reshape(4, -1)[t])
        assert np.array_equal(xs, xq.reshape(-1, 32).sum(axis=1))


def q8_0_reference(x: np.ndarray) -> np.ndarray:
    """numpy transcription of llama.cpp's quantize_row_q8_0_ref, dequantized: d (as f16) * round(x / d)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    dh = d.astype(np.float16).astype(np.float32)
    return (dh[:, None] * np.rint(blocks * inv[:, None])).reshape(x.shape)


@pytest.mark.parametrize("kind", ["q8", "q8_k"])
def test_vector_rounding_equals_reference_and_scalar_twin(kind: str) -> None:
    """The vector-IR block rounding (kernels/vround.py) against numpy references, contiguous and strided."""
    rng = np.random.default_rng(12)
    x = (rng.standard_normal((6, 256 * 3)) * rng.uniform(0.001, 300, (6, 1))).astype(np.float32)
    x[1, 256:512] = 0
    x[2, 3], x[2, 9] = -1000, 1000  # equal magnitudes: the first sets the Q8_K scale's sign
    x[3, 40] = 1e4
    x[4, ::7] = 0.5  # ties to even after scaling
    if kind == "q8":
        fn, twin, expect = ops.round_q8, ops.round_q8_scalar, q8_0_reference(x)
    else:
        q, d = q8_k_reference(x)
        fn, twin, expect = round_q8_k, q8_k_round_scalar, (d[:, None] * q.astype(np.float32)).reshape(x.shape)
    out = np.zeros_like(x)
    fn(x, out)
    assert np.array_equal(out, expect)
    strided = np.zeros((6, 2 * x.shape[1]), np.float32)[:, ::2]  # the scalar twin's path
    fn(x, strided)
    assert np.array_equal(strided, expect)
    twin(x, out)
    assert np.array_equal(out, expect)


@pytest.mark.parametrize("fmt", FORMATS)
def test_matmul_with_llama_cpp_activations(fmt: str) -> None:
    """Batches go through the format's activation rounding, then tiles of dequantized rows and BLAS."""
    cols = 3 * FORMATS_BY_NAME[fmt].block_size
    m, ref = make_matrix(fmt, 45, cols, seed=3)
    x = np.random.default_rng(2).standard_normal((5, cols)).astype(np.float32)
    xr = np.zeros_like(x)
    KERNELS[fmt].activation(x, xr)
    out = np.zeros((5, 45), np.float32)
    m.matmul(x, out, np.zeros(cols * 8, np.float32), ActScratch(5, cols))  # 8-row tiles, a ragged last one
    np.testing.assert_allclose(out, xr @ ref.T, rtol=1e-5, atol=1e-5)
    # one token: the integer product where there is one, else the float kernel on rounded activations
    one = np.zeros((1, 45), np.float32)
    m.matmul(x[:1], one, np.zeros(cols * 8, np.float32), ActScratch(1, cols))
    expect = np.zeros(45, np.float32)
    k = KERNELS[fmt]
    if k.matvec_q8 is None:
        k.matvec(m.data, xr[0], expect)
    else:
        q, d, s = np.zeros(cols, np.int8), np.zeros(cols // 32, np.float32), np.zeros(cols // 32, np.float32)
        k.quantize(x[0], q, d, s)
        k.matvec_q8(m.data, q, d, s, expect)
    assert np.array_equal(one[0], expect)


INTEGER = [f for f in FORMATS if KERNELS[f].matvec_q8 is not None and KERNELS[f].quantize is ops.quantize_q8]


@pytest.mark.parametrize("fmt", INTEGER)
def test_integer_matvec_matches_llama_cpp_arithmetic(fmt: str) -> None:
    """The int8 SIMD product equals dequantized weights times dequantized 8-bit activations.

    The only rounding besides float32 accumulation is Q8_1's f16 (scale x sum) term, bounded per block.
    """
    for rows, cols in [(1, 32), (7, 96), (33, 160), (257, 576)]:
        m, ref = make_matrix(fmt, rows, cols, seed=rows + cols)
        x = np.random.default_rng(7).standard_normal(cols).astype(np.float32)
        q, d, s = np.zeros(cols, np.int8), np.zeros(cols // 32, np.float32), np.zeros(cols // 32, np.float32)
        ops.quantize_q8(x, q, d, s)
        xr = (np.repeat(d, 32) * q).astype(np.float64)
        out = np.zeros(rows, np.float32)
        KERNELS[fmt].matvec_q8(m.data, q, d, s, out)
        exact = ref.astype(np.float64) @ xr
        bound = 1e-5 * (np.abs(ref) @ np.abs(xr)) + 1e-6
        if fmt == "Q5_1":  # m_w * f16(d_x * sum q_x) instead of m_w * d_x * sum q_x
            mins = ref.reshape(rows, -1, 32).min(axis=2)  # |m_w| <= |min of the block| (q >= 0, d >= 0)
            bound += np.abs(mins) @ np.abs(s) * 2.0**-10
        assert np.all(np.abs(out - exact) <= bound), np.max(np.abs(out - exact) / bound)
        assert np.max(np.abs(out - ref.astype(np.float64) @ x)) / cols < MAX_DOT_PRODUCT_ERROR


@pytest.mark.slow
def test_gemma3_tensors_bit_exact(gemma3_path) -> None:
    from lmap.gguf import GGUFFile

    g = GGUFFile(gemma3_path)
    r = gguf.GGUFReader(gemma3_path)
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
        x = np.random.default_rng(0).standard_normal(m.cols).astype(np.float32)
        y = np.zeros(m.rows, np.float32)
        m.matvec(x, y)
        check_dot(y[:rows], ref, x)
    assert {"Q5_0", "Q4_K", "Q6_K", "Q8_0"} <= seen


# integer products against Q8_K activations, which QMatrix uses for one token
Q8K_KERNELS = {
    "Q2_K": q2_k.matvec_q8k,
    "Q3_K": q3_k.matvec_q8k,
    "Q4_K": q4_k.matvec_q8k,
    "Q5_K": q5_k.matvec_q8k,
    "Q6_K": q6_k.matvec_q8k,
    "IQ4_XS": iq4.matvec_q8k_xs,
}


@pytest.mark.parametrize("fmt", sorted(Q8K_KERNELS))
def test_q8_k_integer_matvec_matches_llama_cpp_arithmetic(fmt: str) -> None:
    """The int8 SIMD product equals dequantized weights times the dequantized Q8_K activations."""
    for rows, cols in [(1, 256), (7, 768), (33, 1280)]:
        m, ref = make_matrix(fmt, rows, cols, seed=rows + cols)
        x = (np.random.default_rng(rows).standard_normal(cols) * 2).astype(np.float32)
        xq, xd, xs = np.zeros(cols, np.int8), np.zeros(cols // 32, np.float32), np.zeros(cols // 32, np.float32)
        quantize_q8_k(x, xq, xd, xs)
        xr = np.repeat(xd[: cols // 256], 256).astype(np.float64) * xq
        out = np.zeros(rows, np.float32)
        Q8K_KERNELS[fmt](m.data, xq, xd, xs, out)
        check_dot(out, ref, xr)
        # against the unquantized activations: each is off by at most half its block's step
        step = np.abs(ref) @ (np.repeat(np.abs(xd[: cols // 256]), 256) / 2)
        assert np.all(np.abs(out - ref.astype(np.float64) @ x) <= step * 1.001 + 1e-3)
        # and what the float kernel computes from round_q8_k's activations, up to float rounding
        xf = np.zeros((1, cols), np.float32)
        round_q8_k(x.reshape(1, -1), xf)
        y = np.zeros(rows, np.float32)
        m.matvec(xf[0], y)
        check_dot(y, ref, xr)


@pytest.mark.parametrize("fmt", ["Q2_K", "Q3_K"])
def test_float_products_run_in_chunks_when_activations_are_sized_for_int8(fmt: str) -> None:
    """A model whose prompt products are all integer sizes ActScratch.f32 for int8 activations; a
    float product that still comes (a format without the panel GEMM) rounds and multiplies its rows
    in chunks of what fits, with the result of one pass over the whole batch."""
    from lmap.kernels.multivec import matmul_rows

    cols = FORMATS_BY_NAME[fmt].block_size
    m, _ = make_matrix(fmt, 33, cols, seed=4)
    x = np.random.default_rng(5).standard_normal((40, cols)).astype(np.float32)
    full, small = ActScratch(40, cols), ActScratch(40, cols, float_rows=0)
    chunks = [xr.shape[0] for _, xr in small.rounded(x, KERNELS[fmt].activation)]
    assert small.f32.size < full.f32.size and len(chunks) > 1 and sum(chunks) == 40  # several chunks
    tile = np.zeros(cols * 64, np.float32)
    want, got = np.zeros((40, 33), np.float32), np.zeros((40, 33), np.float32)
    m.matmul(x, want, tile, full)
    m.matmul(x, got, tile, small)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)  # BLAS on fewer rows: its sums may regroup
    rows_want, rows_got = np.zeros((40, 33), np.float32), np.zeros((40, 33), np.float32)
    matmul_rows(m, x, rows_want, None, full)
    matmul_rows(m, x, rows_got, None, small)
    assert np.array_equal(rows_got, rows_want)  # the same mat-vec per row
