"""The integer prompt GEMM (quants/panels.py, kernels/igemm.py) against references it did not write.

* every packer's bytes and scales rebuild exactly the weights ``gguf.quants.dequantize`` gives;
* the batch activation quantizer's ``dx * q`` is bit for bit the rounding the float path used
  (llama.cpp's Q8_0 / Q8_K), and ``xs`` the scale times the sub-block's sum;
* the product equals float64 ``round(x) @ dequantize(W).T`` within float32 accumulation error,
  for panels of 32 and a 16-column remainder, any row count, 1 or 2 threads (bit-identical:
  each panel is computed whole by one thread);
* a model's prompt logits agree between the integer path and the float tiles + BLAS path.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st
from test_team import matrix

from lmap.quants import KERNELS, panels
from lmap.quants.quantize import quantize_rows

FORMATS = sorted(panels.FORMATS)


def unpack(panel: np.ndarray, c: int, cols: int, sub: int) -> np.ndarray:
    """float32 [c, cols] weights a * u + b read back from a packed panel (the layout igemm.py documents)."""
    u = panel[: c * cols].reshape(cols // 4, c, 4).transpose(1, 0, 2).reshape(c, cols).astype(np.float32)
    ns = cols // sub
    a = panel[c * cols : c * cols + 4 * c * ns].view(np.float32).reshape(ns, c).T
    b = panel[c * cols + 4 * c * ns : c * cols + 8 * c * ns].view(np.float32).reshape(ns, c).T
    return np.repeat(a, sub, 1) * u + np.repeat(b, sub, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_panels_rebuild_the_gguf_dequantization(fmt: str) -> None:
    fid, sub = panels.FORMATS[fmt]
    rows, cols = 48, 512
    rng = np.random.default_rng(fid)
    data = quantize_rows(fmt, rng.standard_normal((rows, cols)).astype(np.float32) * 3)
    ref = quants.dequantize(data, GGMLQuantizationType[fmt]).reshape(rows, cols)
    w = np.ascontiguousarray(data.reshape(rows, -1))
    for c, r0 in ((32, 0), (16, 32)):
        panel = np.zeros(panels.panel_bytes(cols), np.uint8)
        panels.pack_panel(fid, w, r0, c, cols, panel)
        np.testing.assert_array_equal(unpack(panel, c, cols, sub), ref[r0 : r0 + c], err_msg=f"{fmt} {c} columns")


def quantized(fmt: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fid, sub = panels.FORMATS[fmt]
    n, k = x.shape
    xq = np.zeros((n, k), np.int8)
    dx = np.zeros((n, k // sub), np.float32)
    xs = np.zeros_like(dx)
    panels.quantize_rows(x, fid, xq, dx, xs)
    return xq, dx, xs


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_activations_are_the_float_paths_rounding(fmt: str) -> None:
    sub = panels.FORMATS[fmt][1]
    x = np.random.default_rng(5).standard_normal((7, 512)).astype(np.float32) * 4
    x[2, :256] = 0.0  # an all-zero block: scale 0, q 0
    x[3, 7] = -50.0  # a negative extreme sets Q8_K's scale sign
    xq, dx, xs = quantized(fmt, x)
    want = np.empty_like(x)
    KERNELS[fmt].activation(x, want)
    np.testing.assert_array_equal(np.repeat(dx, sub, 1) * xq, want)
    sums = xq.reshape(7, -1, sub).sum(-1, dtype=np.int64).astype(np.float32)
    np.testing.assert_array_equal(xs, dx * sums)


def product(fmt: str, w: np.ndarray, x: np.ndarray, threads: int) -> np.ndarray:
    xq, dx, xs = quantized(fmt, x)
    out = np.full((x.shape[0], w.shape[0]), np.nan, np.float32)
    pan = np.zeros((2, panels.panel_bytes(x.shape[1])), np.uint8)
    panels.gemm(panels.FORMATS[fmt][0], w, xq, dx, xs, out, pan, np.zeros(1, np.int64), threads)
    return out


@settings(max_examples=12, deadline=None)
@given(
    fmt=st.sampled_from(FORMATS),
    n=st.integers(1, 23),
    wide=st.integers(0, 3),
    narrow=st.booleans(),
    seed=st.integers(0, 99),
)
def test_gemm_matches_the_float64_product(fmt: str, n: int, wide: int, narrow: bool, seed: int) -> None:
    rows = 32 * wide + 16 * narrow or 16
    cols = 512
    rng = np.random.default_rng(seed)
    data = quantize_rows(fmt, rng.standard_normal((rows, cols)).astype(np.float32))
    wf = quants.dequantize(data, GGMLQuantizationType[fmt]).reshape(rows, cols).astype(np.float64)
    w = np.ascontiguousarray(data.reshape(rows, -1))
    x = rng.standard_normal((n, cols)).astype(np.float32) * 2
    xr = np.empty_like(x)
    KERNELS[fmt].activation(x, xr)
    want = xr.astype(np.float64) @ wf.T
    got = product(fmt, w, x, 2)
    # float32 accumulation over 16-32 sub-blocks: ~1e-6 of the largest term
    tol = 1e-5 * np.abs(np.abs(xr) @ np.abs(wf).T).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=tol)
    np.testing.assert_array_equal(product(fmt, w, x, 1), got)


def test_format_table_covers_what_the_model_zoo_uses() -> None:
    assert panels.supported("Q4_K", 640, 2048) == panels.VNNI512
    assert not panels.supported("Q4_K", 640, 640 + 32)  # K-quants need whole 256-blocks
    assert not panels.supported("Q8_0", 40, 640)  # rows in 16-column panels
    assert not panels.supported("F16", 640, 640)
    for fmt in ("Q2_K", "Q3_K", "IQ4_NL", "IQ4_XS", "BF16"):
        assert fmt not in panels.FORMATS  # these keep the dequantized tiles + BLAS path


@pytest.mark.skipif(not panels.VNNI512, reason="the integer prompt path runs on AVX512-VNNI hosts only")
@pytest.mark.parametrize("fmt", ["Q4_1", "Q4_K", "Q6_K"])
def test_model_prompt_logits_match_the_float_path(fmt: str) -> None:
    """QMatrix.matmul with activation scratch: integer panels and float tiles give the same sums."""
    from lmap.models.base import TEAM_ROWS, HParams, Scratch

    cols = 512
    hp = HParams(arch="t", n_ctx_train=256, n_embd=cols, n_layer=1, n_ff=1024, n_head=8, n_head_kv=2)
    hp.head_dim_k = hp.head_dim_v = hp.n_rot = cols // 8
    hp.n_vocab = 64
    s = Scratch(hp, 128, 128, 1)
    w = matrix(fmt, 96, cols, 3)
    assert w.fid >= 0
    x = np.random.default_rng(2).standard_normal((TEAM_ROWS + 9, cols)).astype(np.float32)
    got = np.zeros((x.shape[0], w.rows), np.float32)
    w.matmul(x, got, s.tile, s.xq)
    panels_before, s.xq.panels = s.xq.panels, None  # the float path: rounded activations, tiles, BLAS
    want = np.zeros_like(got)
    w.matmul(x, want, s.tile, s.xq)
    s.xq.panels = panels_before
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * np.abs(want).max())


def test_threads_argument_is_clipped() -> None:
    """More threads asked than panels or scratch rows: the extra ones have nothing to claim."""
    fmt = "Q8_0"
    w = np.ascontiguousarray(quantize_rows(fmt, np.ones((16, 64), np.float32)).reshape(16, -1))
    x = np.ones((3, 64), np.float32)
    np.testing.assert_allclose(product(fmt, w, x, numba.config.NUMBA_NUM_THREADS + 8), 64.0, rtol=1e-3)  # f16 scales
