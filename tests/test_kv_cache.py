"""KV cache cell maps: full layers and sliding-window rings against a plain numpy attention."""

from __future__ import annotations

import numba
import numpy as np
import pytest

from lmap.kernels import ops
from lmap.kv_cache import KVCache


def reference_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, window: int) -> np.ndarray:
    """q [n, H, hd] at positions pos; k, v [P, Hkv, hd] for positions 0..P-1 (float64 softmax)."""
    n, nh, hd = q.shape
    group = nh // k.shape[1]
    out = np.zeros_like(q, dtype=np.float64)
    for t in range(n):
        p = pos[t]
        lo = p - window + 1 if window else 0
        keys = np.arange(max(lo, 0), p + 1)
        for h in range(nh):
            s = k[keys, h // group].astype(np.float64) @ q[t, h] / np.sqrt(hd)
            w = np.exp(s - s.max())
            out[t, h] = (w / w.sum()) @ v[keys, h // group]
    return out


@pytest.mark.parametrize("window,n_batch", [(0, 4), (5, 3), (8, 8), (3, 1)])
def test_ring_cache_attention_equals_reference(window: int, n_batch: int) -> None:
    rng = np.random.default_rng(window * 10 + n_batch)
    P, H, Hkv, hd = 37, 4, 2, 16
    K = rng.standard_normal((P, Hkv, hd)).astype(np.float32)
    V = rng.standard_normal((P, Hkv, hd)).astype(np.float32)
    Q = rng.standard_normal((P, H, hd)).astype(np.float32)
    kv = KVCache(1, 64, Hkv, hd, hd, "f32", "f32", swa_layers=[window > 0], window=window, n_batch=n_batch)
    m = kv.maps[0]
    if window:
        assert m is kv.swa and m.n_cells == window + n_batch  # only the window is kept
    scores = np.zeros((numba.config.NUMBA_NUM_THREADS, 64), np.float32)
    cells, cells_swa = np.zeros(n_batch, np.int32), np.zeros(n_batch, np.int32)
    for start in range(0, P, n_batch):
        pos = np.arange(start, min(start + n_batch, P), dtype=np.int32)
        n = pos.size
        kv.assign(pos, cells[:n], cells_swa[:n])
        c = cells_swa[:n] if window else cells[:n]
        ops.store_kv_f32(K[pos], kv.k[0], c)
        ops.store_kv_f32(V[pos], kv.v[0], c)
        out = np.zeros((n, H, hd), np.float32)
        ops.attention(Q[pos], kv.k[0], kv.v[0], pos, m.cell_pos, m.n_used, 1 / np.sqrt(hd), window, 0.0, scores, out)
        np.testing.assert_allclose(out, reference_attention(Q[pos], K, V, pos, window), rtol=1e-4, atol=1e-5)


def test_truncate_and_reusable_prefix() -> None:
    kv = KVCache(2, 100, 1, 8, 8, swa_layers=[True, False], window=4, n_batch=2)
    cells, cells_swa = np.zeros(2, np.int32), np.zeros(2, np.int32)
    for start in range(0, 20, 2):
        kv.assign(np.arange(start, start + 2, dtype=np.int32), cells, cells_swa)
    assert kv.reusable(20) == 20  # the last window is in the ring
    assert kv.reusable(18) == 18  # positions 14..17 are still held
    assert kv.reusable(10) == 0  # 6..9 were overwritten: evaluate again from the start
    kv.truncate(18)
    assert kv.full.n_used == 18 and (kv.full.cell_pos[18:] == -1).all()
    assert not (kv.swa.cell_pos >= 18).any()


@pytest.mark.parametrize("window,n_batch,chunk", [(5, 12, 4), (8, 9, 2), (3, 7, 7), (6, 16, 5)])
def test_ring_smaller_than_a_batch_stores_and_attends_chunk_by_chunk(window: int, n_batch: int, chunk: int) -> None:
    """A ring of window + chunk cells: each chunk of a batch is stored, then attends over the
    positions the ring holds at that moment (chunk_pos), which are exactly those it must see."""
    rng = np.random.default_rng(window * 100 + n_batch * 10 + chunk)
    P, H, Hkv, hd = 45, 4, 1, 16
    K = rng.standard_normal((P, Hkv, hd)).astype(np.float32)
    V = rng.standard_normal((P, Hkv, hd)).astype(np.float32)
    Q = rng.standard_normal((P, H, hd)).astype(np.float32)
    kv = KVCache(1, 64, Hkv, hd, hd, "f32", "f32", swa_layers=[True], window=window, n_batch=n_batch, swa_chunk=chunk)
    m = kv.swa
    assert m is not None and m.ring and m.n_cells == window + min(chunk, n_batch)
    scores = np.zeros((numba.config.NUMBA_NUM_THREADS, 64), np.float32)
    cells, cells_swa = np.zeros(n_batch, np.int32), np.zeros(n_batch, np.int32)
    chunked = 0
    for start in range(0, P, n_batch):
        pos = np.arange(start, min(start + n_batch, P), dtype=np.int32)
        n = pos.size
        kv.assign(pos, cells[:n], cells_swa[:n])
        out = np.zeros((n, H, hd), np.float32)
        parts = [(c * chunk, min((c + 1) * chunk, n), m.chunk_pos[c], m.chunk_used[c]) for c in range(m.n_chunks)]
        chunked += bool(parts)
        for c0, c1, cp, used in parts or [(0, n, m.cell_pos, m.n_used)]:
            p = pos[c0:c1]
            ops.store_kv_f32(K[p], kv.k[0], cells_swa[c0:c1])
            ops.store_kv_f32(V[p], kv.v[0], cells_swa[c0:c1])
            ops.attention(Q[p], kv.k[0], kv.v[0], p, cp, int(used), 1 / np.sqrt(hd), window, 0.0, scores, out[c0:c1])
        np.testing.assert_allclose(out, reference_attention(Q[pos], K, V, pos, window), rtol=1e-4, atol=1e-5)
        # after the batch the ring holds what it would hold had the batch been assigned at once
        assert set(m.cell_pos[m.cell_pos >= 0]) == set(range(max(0, pos[-1] + 1 - m.n_cells), pos[-1] + 1))
    assert (chunked > 0) == (n_batch > chunk)
