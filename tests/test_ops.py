"""Element-wise activation kernels against float64 NumPy (the definitions, not our code)."""

from __future__ import annotations

import numpy as np

from lmap.kernels import ops


def gelu64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def test_geglu_exact_matches_float64() -> None:
    rng = np.random.default_rng(0)
    g = (rng.standard_normal((7, 300)) * 4).astype(np.float32)
    u = rng.standard_normal((7, 300)).astype(np.float32)
    out = g.copy()
    ops.geglu(out, u, ops.EXACT)
    np.testing.assert_allclose(out, gelu64(g) * u, rtol=2e-6, atol=1e-6)


def test_geglu_table_is_llama_cpps_half_precision_gelu() -> None:
    """ggml: |x| >= 10 short-circuits, else gelu(half(x)) rounded to half, times up."""
    rng = np.random.default_rng(1)
    g = np.concatenate([rng.standard_normal(5000) * 3, [-10.0, -9.99, 0.0, -0.0, 9.99, 10.0, 25.0, -25.0]])
    g = g.astype(np.float32).reshape(1, -1)
    u = rng.standard_normal(g.shape).astype(np.float32)
    out = g.copy()
    ops.geglu(out, u, ops.gelu_f16_table())
    h = g.astype(np.float16).astype(np.float64)
    ref = gelu64(h).astype(np.float16).astype(np.float32)
    ref = np.where(g <= -10, 0.0, np.where(g >= 10, g, ref)).astype(np.float32) * u
    # ggml builds the table in float32, where 1 + tanh(t) cancels for x << 0: allow that float32
    # error (a few ulps of 1, times x / 2) and one half ulp where it crosses a rounding boundary
    diff = np.abs(out - ref)
    ulp = np.abs(ref) * 2.0**-10 + np.abs(g * u) * 2.0**-22 + 1e-9
    assert np.all(diff <= ulp)
    assert np.mean(diff[np.abs(g) < 3] == 0) > 0.99  # outside the cancelling tail, identical
    # and it is GELU to half precision
    np.testing.assert_allclose(out, gelu64(g) * u, rtol=2e-3, atol=2e-3)


def test_swiglu_matches_float64() -> None:
    rng = np.random.default_rng(2)
    g = (rng.standard_normal((5, 333)) * 5).astype(np.float32)
    u = rng.standard_normal((5, 333)).astype(np.float32)
    out = g.copy()
    ops.swiglu(out, u)
    g64 = g.astype(np.float64)
    np.testing.assert_allclose(out, g64 / (1 + np.exp(-g64)) * u, rtol=1e-5, atol=1e-7)
