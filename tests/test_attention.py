"""The batched (prefill) attention against float64 NumPy softmax attention, and the vector exp against libm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from lmap.kernels.attention import AttentionScratch, attention_batch
from lmap.kernels.vexp import exp8_inplace


@njit(cache=False)
def _exp_all(a: np.ndarray) -> None:
    base = a.ctypes.data
    for j in range(0, a.shape[0], 8):
        exp8_inplace(base + 4 * j)


def test_vector_exp_matches_libm() -> None:
    x = np.concatenate([np.linspace(-87, 88, 100_000), [0.0, -0.0, -1e-30, 1e-30, -86.99, -87.5, -200, -np.inf]])
    x = x[: len(x) // 8 * 8].astype(np.float32)
    y = x.copy()
    _exp_all(y)
    ref = np.exp(x.astype(np.float64))
    ok = x >= -87
    assert np.all(np.abs(y[ok] - ref[ok]) <= 3 * 2.0**-23 * ref[ok] + 1e-45)
    assert np.all(y[~ok] == 0)


def reference(q, k, v, pos, cell_pos, n_cells, scale, window, softcap):  # type: ignore[no-untyped-def]
    """float64 attention; with a half cache, Q rounded to half first (as llama.cpp and lmap do)."""
    n, nh, hd = q.shape
    if k.dtype == np.uint16:
        q = q.astype(np.float16).astype(np.float32)
    group = nh // k.shape[1]
    kf = k.view(np.float16).astype(np.float64) if k.dtype == np.uint16 else k.astype(np.float64)
    vf = v.view(np.float16).astype(np.float64) if v.dtype == np.uint16 else v.astype(np.float64)
    out = np.zeros((n, nh, v.shape[2]))
    cp = cell_pos[:n_cells]
    for t in range(n):
        seen = (cp >= 0) & (cp <= pos[t])
        if window > 0:
            seen &= cp > pos[t] - window
        for h in range(nh):
            s = kf[:n_cells, h // group] @ q[t, h].astype(np.float64) * scale
            if softcap > 0:
                s = softcap * np.tanh(s / softcap)
            s = np.where(seen, s, -np.inf)
            if not seen.any():
                continue
            e = np.exp(s - s.max())
            out[t, h] = e @ vf[:n_cells, h // group] / e.sum()
    return out


def run_batch(q, k, v, pos, cell_pos, n_cells, scale, window, softcap, n_ctx=None, threads=1):  # type: ignore[no-untyped-def]
    n, nh, hd = q.shape
    w = AttentionScratch(n, n_ctx or k.shape[0], nh, k.shape[1], hd, v.shape[2])
    for a in (w.k, w.v, w.q, w.s, w.o, w.inv):
        a.fill(np.nan)  # nothing may read scratch it did not write
    out = np.full((n, nh, v.shape[2]), np.nan, np.float32)
    # a copy: with one KV head the queries are scaled in place
    attention_batch(q.copy(), k, v, pos, cell_pos, n_cells, scale, window, softcap, w, out, threads)
    return out


@pytest.mark.parametrize("nkv", [1, 2])
@pytest.mark.parametrize("threads", [2, 3])
def test_threads_share_blocks_with_the_same_result(threads: int, nkv: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks shared among threads, each on its own share of the scratch: the one-thread result."""
    from lmap.kernels import attention as A
    from lmap.threads import blas_single

    # scores for 2 x 128 queries of 4 heads over 300 cells: a half share holds a full block
    monkeypatch.setattr(A, "SCORES_BYTES", 2 << 20)

    rng = np.random.default_rng(threads)
    nh, hd, n = 4 * nkv, 64, 300
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    v = rng.standard_normal((n, nkv, hd)).astype(np.float16).view(np.uint16)
    k = rng.standard_normal((n, nkv, hd)).astype(np.float16).view(np.uint16)
    pos = np.arange(n, dtype=np.int32)
    cell_pos = np.arange(n, dtype=np.int32)
    with blas_single():  # as Model.forward runs it
        one = run_batch(q, k, v, pos, cell_pos, n, 0.125, 0, 0.0)
        many = run_batch(q, k, v, pos, cell_pos, n, 0.125, 0, 0.0, threads=threads)
    assert n > A.MAX_BLOCK  # several query blocks, so each thread gets some
    if threads == 2:  # a half share of the scratch still holds one thread's blocks: the same products
        np.testing.assert_array_equal(many, one)
    else:  # thirds hold smaller blocks: other BLAS shapes, float32 rounding apart
        np.testing.assert_allclose(many, one, rtol=0, atol=2e-6)
    np.testing.assert_allclose(one, reference(q, k, v, pos, cell_pos, n, 0.125, 0, 0.0), rtol=2e-3, atol=2e-4)


def test_query_buffers_hold_one_block_per_thread_and_none_for_one_kv_head() -> None:
    """With one KV head the queries and outputs are used where they lie; otherwise the gathered
    rows take one block per thread, not the whole batch."""
    from lmap.kernels.attention import MAX_BLOCK

    one = AttentionScratch(512, 2048, 4, 1, 256, 256, threads=2)
    assert one.q.size == 0 and one.o.size == 0 and one.in_place
    gqa = AttentionScratch(512, 2048, 9, 3, 64, 64, threads=2)
    assert gqa.q.shape == (2 * MAX_BLOCK * 3, 64) == gqa.o.shape and not gqa.in_place
    rng = np.random.default_rng(0)
    q = rng.standard_normal((20, 4, 16)).astype(np.float32)
    k = rng.standard_normal((20, 1, 16)).astype(np.float32)
    pos = np.arange(20, dtype=np.int32)
    with pytest.raises(ValueError, match="C-contiguous"):
        attention_batch(q[:, ::-1], k, k, pos, pos, 20, 0.25, 0, 0.0, AttentionScratch(20, 20, 4, 1, 16, 16), q.copy())


@pytest.mark.parametrize("half", [False, True])
@pytest.mark.parametrize("window", [0, 5, 100])
def test_prompt_after_cached_prefix(half: bool, window: int) -> None:
    rng = np.random.default_rng(window)
    nh, nkv, hd, n_cells, n = 8, 2, 64, 3 * 64 + 7, 40
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    k = (rng.standard_normal((n_cells + 5, nkv, hd)) * 0.5).astype(np.float32)
    v = rng.standard_normal((n_cells + 5, nkv, hd)).astype(np.float32)
    cell_pos = np.full(n_cells + 5, -1, np.int32)
    cell_pos[:n_cells] = rng.permutation(n_cells)  # cells in any order (ring buffers, shifts)
    cell_pos[rng.choice(n_cells, 9, replace=False)] = -1  # and some empty
    pos = np.arange(n_cells - n, n_cells, dtype=np.int32)
    if half:
        k, v = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
    got = run_batch(q, k, v, pos, cell_pos, n_cells, 0.125, window, 0.0)
    ref = reference(q, k, v, pos, cell_pos, n_cells, 0.125, window, 0.0)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 50),
    prefix=st.integers(0, 150),
    group=st.sampled_from([1, 3, 4]),
    nkv=st.sampled_from([1, 2]),
    hd=st.sampled_from([8, 64, 72]),
    window=st.integers(0, 60),
    softcap=st.sampled_from([0.0, 30.0]),
    seed=st.integers(0, 1000),
)
def test_any_shape(n: int, prefix: int, group: int, nkv: int, hd: int, window: int, softcap: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    nh = nkv * group
    n_cells = prefix + n
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    k = rng.standard_normal((n_cells, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((n_cells, nkv, hd)).astype(np.float32)
    cell_pos = np.arange(n_cells, dtype=np.int32)
    pos = cell_pos[prefix:].copy()
    got = run_batch(q, k, v, pos, cell_pos, n_cells, 1 / np.sqrt(hd), window, softcap)
    ref = reference(q, k, v, pos, cell_pos, n_cells, 1 / np.sqrt(hd), window, softcap)
    np.testing.assert_allclose(got, ref, atol=3e-5, rtol=1e-4)


def test_small_score_scratch_and_blind_queries() -> None:
    """A long context splits queries into blocks; a query that sees no cell gets zeros."""
    rng = np.random.default_rng(5)
    n, nh, nkv, hd, n_cells = 300, 4, 2, 16, 5000
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    k = rng.standard_normal((n_cells, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((n_cells, nkv, hd)).astype(np.float32)
    cell_pos = np.arange(n_cells, dtype=np.int32)
    cell_pos[:10] = -1
    pos = np.arange(n_cells - n, n_cells, dtype=np.int32)
    pos[0] = 3  # sees only cells 0..3, all empty
    got = run_batch(q, k, v, pos, cell_pos, n_cells, 0.25, 0, 0.0)
    ref = reference(q, k, v, pos, cell_pos, n_cells, 0.25, 0, 0.0)
    assert np.all(got[0] == 0)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["attention_serial", "attention_parallel"])
def test_a_query_that_sees_no_cell_gets_zeros_like_the_batch_kernel(kernel: str) -> None:
    """Every cell empty or in the future: zeros (as attention_batch gives), not a division by zero."""
    from lmap.kernels import ops

    n, nh, nkv, hd, cells = 2, 4, 2, 64, 16
    rng = np.random.default_rng(0)
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    k = rng.standard_normal((cells, nkv, hd)).astype(np.float16).view(np.uint16)
    v = rng.standard_normal((cells, nkv, hd)).astype(np.float16).view(np.uint16)
    cell_pos = np.full(cells, -1, np.int32)
    cell_pos[:4] = [5, 6, 7, 8]  # all after the queries' positions
    pos = np.array([3, 4], np.int32)
    out = np.full((n, nh, hd), 7.0, np.float32)
    getattr(ops, kernel)(q, k, v, pos, cell_pos, cells, 0.125, 0, 0.0, np.zeros((2, cells), np.float32), out)
    ref = np.full_like(out, 7.0)
    w = AttentionScratch(n, cells, nh, nkv, hd, hd)
    attention_batch(q, k, v, pos, cell_pos, cells, 0.125, 0, 0.0, w, ref)
    assert not out.any() and not ref.any()


@pytest.mark.parametrize("hd", [16, 64, 128, 256])
def test_decode_attention_over_a_half_cache(hd: int) -> None:
    """One token (ops.attention) against float64, at head sizes with a register-held weighted sum
    of value rows (64, 128, 256) and without (16); hidden cells' values never reach the output."""
    from lmap.kernels import ops

    rng = np.random.default_rng(hd)
    nh, nkv, cells = 4, 2, 300
    q = rng.standard_normal((1, nh, hd)).astype(np.float32)
    k = (rng.standard_normal((cells, nkv, hd)) * 0.3).astype(np.float16).view(np.uint16)
    cell_pos = np.arange(cells, dtype=np.int32)
    cell_pos[::7] = -1  # empty cells ...
    v16 = rng.standard_normal((cells, nkv, hd)).astype(np.float16)
    v16[cell_pos < 0] = np.nan  # ... whose values must be skipped, not multiplied by 0
    v = v16.view(np.uint16)
    pos = np.array([cells - 5], np.int32)  # the last cells are in the future: hidden too
    scale = 1 / np.sqrt(hd)
    out = np.full((1, nh, hd), np.nan, np.float32)
    ops.attention(q, k, v, pos, cell_pos, cells, scale, 0, 0.0, np.zeros((2, cells), np.float32), out)
    kf, vf = k.view(np.float16).astype(np.float64), v16.astype(np.float64)
    seen = (cell_pos >= 0) & (cell_pos <= pos[0])
    for h in range(nh):
        s = kf[seen, h // 2] @ q[0, h].astype(np.float64) * scale
        e = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, h], e @ vf[seen, h // 2] / e.sum(), rtol=1e-4, atol=2e-5)
