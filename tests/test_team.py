"""Decode's spinning thread team (lmap/kernels/team.py) against the per-format prange kernels.

The team must give bit-for-bit the products of each format's own ``matvec_q8`` (same row-dot
intrinsic, same activation quantization), whatever splits the rows into chunks, however many
matrices share a job and activation rows a call carries, whether the helper threads are awake,
asleep, or busy with another caller.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from lmap.kernels import team as T
from lmap.kernels.chunks import CHUNKS
from lmap.kernels.multivec import RowActs, matmuls
from lmap.quants import KERNELS, QMatrix
from lmap.quants.formats import FORMATS_BY_NAME
from lmap.quants.quantize import quantize_rows


class Info:
    """The few TensorInfo fields QMatrix reads."""

    def __init__(self, name: str, fmt: str, rows: int, cols: int) -> None:
        self.name = name
        self.format = FORMATS_BY_NAME[fmt]
        self.shape = (cols, rows)


def matrix(fmt: str, rows: int, cols: int, seed: int) -> QMatrix:
    rng = np.random.default_rng(seed)
    raw = quantize_rows(fmt, rng.standard_normal((rows, cols)).astype(np.float32))
    return QMatrix(Info(f"w{seed}", fmt, rows, cols), raw.reshape(-1))  # type: ignore[arg-type]


def reference(w: QMatrix, x: np.ndarray) -> np.ndarray:
    """Each row of x through the format's own quantization and prange integer kernel."""
    k = w.k
    out = np.zeros((x.shape[0], w.rows), np.float32)
    cols = x.shape[1]
    for j in range(x.shape[0]):
        q = np.zeros(cols, np.int8)
        d = np.zeros(cols // 32, np.float32)
        s = np.zeros(cols // 32, np.float32)
        k.quantize(x[j], q, d, s)
        k.matvec_q8(w.data, q, d, s, out[j])
    return out


@pytest.mark.parametrize("fmt", sorted(CHUNKS))
@pytest.mark.parametrize("n", [1, 3, 7])
def test_team_products_equal_each_formats_kernel(fmt: str, n: int) -> None:
    cols = 512
    # row counts that are not multiples of any chunk, one matrix smaller than a chunk
    ws = [matrix(fmt, rows, cols, seed) for seed, rows in enumerate((301, 7, 130))]
    x = np.random.default_rng(9).standard_normal((n, cols)).astype(np.float32)
    outs = [np.full((n, w.rows), np.nan, np.float32) for w in ws]
    matmuls(list(zip(ws, outs, strict=True)), x, RowActs(8, 1024))
    for w, out in zip(ws, outs, strict=True):
        np.testing.assert_array_equal(out, reference(w, x))


def test_mixed_formats_split_into_jobs_and_more_matrices_than_a_job_holds() -> None:
    cols = 256
    ws = [matrix(f, 64 + i, cols, i) for i, f in enumerate(["Q4_0", "Q4_K", "Q4_0", "Q8_0", "Q4_0", "Q4_0", "Q4_0"])]
    x = np.random.default_rng(3).standard_normal((2, cols)).astype(np.float32)
    outs = [np.zeros((2, w.rows), np.float32) for w in ws]
    matmuls(list(zip(ws, outs, strict=True)), x, RowActs(2, cols))
    for w, out in zip(ws, outs, strict=True):
        np.testing.assert_array_equal(out, reference(w, x))


def test_helpers_take_chunks_then_sleep_and_wake() -> None:
    team = T.Team(2)
    try:
        w = matrix("Q4_0", 4096, 1024, 5)
        x = np.random.default_rng(4).standard_normal((1, 1024)).astype(np.float32)
        acts = RowActs(1, 1024)
        out = np.zeros((1, w.rows), np.float32)
        ref = reference(w, x)
        for _ in range(200):
            team.run("Q4_0", x, acts, [w.data], [out])
            np.testing.assert_array_equal(out, ref)
            if team.ctrl[T.HELPED] > 0:
                break
        assert team.ctrl[T.HELPED] > 0, "the helper thread never took a chunk"
        # idle: the helper goes to sleep after its spin limit ...
        deadline = time.monotonic() + 10
        while team.ctrl[T.SLEEPERS] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert team.ctrl[T.SLEEPERS] == 1
        # ... a job posted meanwhile is done (by the caller alone if need be), and wakes it
        out[:] = np.nan
        wakes = int(team.ctrl[T.WAKES])
        team.run("Q4_0", x, acts, [w.data], [out])
        np.testing.assert_array_equal(out, ref)
        # (it may fall asleep again within its ~1 ms spin, so count wakes rather than watch SLEEPERS)
        deadline = time.monotonic() + 10
        while team.ctrl[T.WAKES] == wakes and time.monotonic() < deadline:
            time.sleep(0.001)
        assert team.ctrl[T.WAKES] == wakes + 1, "the sleeping helper was not woken"
    finally:
        team.stop()
    assert not team.threads


def test_concurrent_callers_each_get_their_own_products() -> None:
    """Two threads decoding at once: one holds the team, the other computes alone; both exact."""
    cols = 512
    w = matrix("Q8_0", 2048, cols, 11)
    results: dict[int, list[bool]] = {0: [], 1: []}

    def caller(i: int) -> None:
        x = np.random.default_rng(100 + i).standard_normal((1, cols)).astype(np.float32)
        ref = reference(w, x)
        acts = RowActs(1, cols)
        out = np.zeros((1, w.rows), np.float32)
        for _ in range(50):
            out[:] = np.nan
            matmuls([(w, out)], x, acts)
            results[i].append(bool(np.array_equal(out, ref)))

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results[0] == [True] * 50 and results[1] == [True] * 50


def test_every_format_has_a_chunk_kernel() -> None:
    """A format with an integer kernel but no chunk kernel would silently take the slow float path."""
    assert {f for f, k in KERNELS.items() if k.matvec_q8 is not None} == set(CHUNKS)


def _spans_case(rng: np.random.Generator, n: int, nh: int, nkv: int, hd: int, per_seq: int):  # type: ignore[no-untyped-def]
    """n sequences, each holding a random number of cells of its own region of one half cache."""
    cells = n * per_seq
    q = rng.standard_normal((n, nh, hd)).astype(np.float32)
    k = rng.standard_normal((cells, nkv, hd)).astype(np.float16).view(np.uint16)
    v = rng.standard_normal((cells, nkv, hd)).astype(np.float16).view(np.uint16)
    cell_pos = np.full(cells, -1, np.int32)
    spans = np.zeros((n, 2), np.int32)
    pos = np.zeros(n, np.int32)
    for t in range(n):
        used = int(rng.integers(1, per_seq + 1))
        spans[t] = (t * per_seq, t * per_seq + used)
        cell_pos[t * per_seq : t * per_seq + used] = rng.permutation(used)  # cells in any order
        pos[t] = used - 1
    return q, k, v, pos, cell_pos, spans


@pytest.mark.parametrize("window,softcap", [(0, 0.0), (7, 0.0), (0, 30.0)])
@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_team_attention_equals_the_serial_kernel_bit_for_bit(n: int, window: int, softcap: float) -> None:
    from lmap.kernels import ops

    rng = np.random.default_rng(n * 100 + window)
    nh, nkv, hd, per_seq = 6, 2, 64, 40
    q, k, v, pos, cell_pos, spans = _spans_case(rng, n, nh, nkv, hd, per_seq)
    scores = np.zeros((4, per_seq), np.float32)
    want = np.zeros((n, nh, hd), np.float32)
    ops.attention_spans_serial(q, k, v, pos, cell_pos, spans, 0.125, window, softcap, scores, want)
    for threads in (1, 2, 3):
        got = np.full((n, nh, hd), np.nan, np.float32)
        t = T.Team(threads)
        try:
            t.attention(q, k, v, pos, cell_pos, spans, 0.125, window, softcap, scores, got)
        finally:
            t.stop()
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("n_cells", [5, 300])
def test_one_token_on_the_team_equals_decode_attention(n_cells: int) -> None:
    """One token's heads shared by the team: the bits ops.attention (decode) gives, window and all."""
    from lmap.kernels import ops
    from lmap.kernels.multivec import attention_spans

    rng = np.random.default_rng(n_cells)
    C, nh, nkv, hd = 320, 9, 3, 64
    q = rng.standard_normal((1, nh, hd)).astype(np.float32)
    k = rng.standard_normal((C, nkv, hd)).astype(np.float16).view(np.uint16)
    v = rng.standard_normal((C, nkv, hd)).astype(np.float16).view(np.uint16)
    cell_pos = np.full(C, -1, np.int32)
    cell_pos[:n_cells] = rng.permutation(n_cells)
    pos = np.array([n_cells - 1], np.int32)
    scores = np.zeros((8, C), np.float32)
    for window in (0, 50):
        want = np.zeros((1, nh, hd), np.float32)
        ops.attention(q, k, v, pos, cell_pos, n_cells, 0.125, window, 0.0, scores, want)
        got = np.full((1, nh, hd), np.nan, np.float32)
        span = np.array([[0, n_cells]], np.int32)
        attention_spans(q, k, v, pos, cell_pos, span, 0.125, window, 0.0, scores, got, min_rows=1)
        np.testing.assert_array_equal(got, want)


def test_team_attention_refuses_arrays_that_do_not_fit() -> None:
    rng = np.random.default_rng(5)
    q, k, v, pos, cell_pos, spans = _spans_case(rng, 2, 4, 2, 32, 16)
    spans[:] = [[0, 16], [16, 32]]  # both sequences hold all their 16 cells
    cell_pos[:] = np.tile(np.arange(16, dtype=np.int32), 2)
    pos[:] = 15
    out = np.zeros_like(q)
    t = T.Team(2)
    try:
        with pytest.raises(ValueError, match="shapes"):  # a span longer than a row of scores
            t.attention(q, k, v, pos, cell_pos, spans, 0.1, 0, 0.0, np.zeros((2, 4), np.float32), out)
        with pytest.raises(ValueError, match="shapes"):  # one scores row for two threads
            t.attention(q, k, v, pos, cell_pos, spans, 0.1, 0, 0.0, np.zeros((1, 16), np.float32), out)
        bad = spans.copy()
        bad[1, 1] = k.shape[0] + 1  # a span past the cache
        with pytest.raises(ValueError, match="shapes"):
            t.attention(q, k, v, pos, cell_pos, bad, 0.1, 0, 0.0, np.zeros((2, 16), np.float32), out)
        with pytest.raises(ValueError, match="shapes"):  # a strided query view
            t.attention(q[:, ::2], k, v, pos, cell_pos, spans, 0.1, 0, 0.0, np.zeros((2, 16), np.float32), out[:, ::2])
        t.attention(q, k, v, pos, cell_pos, spans, 0.1, 0, 0.0, np.zeros((2, 16), np.float32), out)  # and all fit
        assert np.isfinite(out).all() and np.abs(out).sum() > 0
    finally:
        t.stop()


def test_a_new_job_is_never_claimed_half_written() -> None:
    # every job after the first on a fresh team used to race a helper's stale claim; run many
    # short jobs of alternating sizes on fresh teams and check each against the serial kernel
    from lmap.kernels import ops

    for trial in range(20):
        rng = np.random.default_rng(trial)
        t = T.Team(2)
        try:
            for n in (2, 5, 3, 8):
                q, k, v, pos, cell_pos, spans = _spans_case(rng, n, 6, 2, 32, 24)
                scores = np.zeros((2, 24), np.float32)
                want = np.zeros_like(q)
                ops.attention_spans_serial(q, k, v, pos, cell_pos, spans, 0.2, 0, 0.0, scores, want)
                got = np.full_like(q, np.nan)
                t.attention(q, k, v, pos, cell_pos, spans, 0.2, 0, 0.0, scores, got)
                np.testing.assert_array_equal(got, want)
        finally:
            t.stop()
