"""Attention for a batch of queries (prefill) as two BLAS products around a compiled softmax.

The one-query-at-a-time kernel (``ops.attention``) converts every half-precision key and
value once per query and calls a scalar ``exp`` per score; for a 512-token prompt that
made attention a third of prefill time. Here, per layer, the cache is converted to float32
once ([Hkv, C, hd]), then per KV head and block of queries:

    S = (Q_g * scale) @ K_h^T      BLAS; Q_g: the group's query heads, [T * group, hd]
    P = exp(mask(S) - max)         compiled, parallel over rows, vector exp (``vexp``)
    O_g = (P @ V_h) / rowsum(P)    BLAS, then the division on the way out

The causal upper triangle is computed and then masked: BLAS does the full rectangle faster
than a loop does the triangle. Query blocks keep the score scratch at [T * group, C] with
T chosen so it stays within ``SCORES_BYTES``, whatever the context length.

Visibility is the same as ops.attention: a cell is seen by a query at position p when
0 <= cell_pos <= p and, with a window w > 0, cell_pos > p - w.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from numba import njit, prange

from .. import arena
from .half import float_to_half, half_to_float
from .ops import _f32
from .vexp import LOWEST, masked_exp_sum, masked_max

SCORES_BYTES = 1 << 20  # score scratch per block of queries (2 and 8 MiB measured no faster on 1.5k-token prompts)
# Queries per block at most: smaller blocks skip more of the causal triangle (cells past a
# block's last position are left out of its products) at the cost of more calls.
MAX_BLOCK = 128


class AttentionScratch:
    """float32 buffers sized once from (n_batch, n_ctx) and the head shapes.

    The score buffer holds [rows, n_cells] for however many rows fit: all of a batch's
    queries at once while the context is short, fewer blocks of them as it fills.

    With one KV head (gemma3) a block's query rows [T * H, hd] are the model's q[t0:t1] as they
    lie in memory and its output rows are att[t0:t1]: the queries are scaled in place and the
    products write the output directly, so there is no q or o buffer (4 MiB for gemma3 at
    n_batch 512). With several KV heads a block's rows are strided and are gathered into q, o,
    sized for one block per thread rather than for the whole batch.
    """

    def __init__(
        self,
        n_batch: int,
        n_ctx: int,
        n_head: int,
        n_head_kv: int,
        head_dim_k: int,
        head_dim_v: int,
        buf: np.ndarray | None = None,
        threads: int | None = None,
    ) -> None:
        shapes = self.shapes(n_batch, n_ctx, n_head, n_head_kv, head_dim_k, head_dim_v, threads)
        # its own buffer, or a region of the scratch arena it shares with the FFN (lmap.arena)
        self.buf = np.zeros(arena.floats(shapes), np.float32) if buf is None else None
        self.k, self.v, self.q, self.o, self.inv, self.s = arena.carve(self.buf if buf is None else buf, shapes)
        self.in_place = n_head_kv == 1

    @staticmethod
    def shapes(
        n_batch: int,
        n_ctx: int,
        n_head: int,
        n_head_kv: int,
        head_dim_k: int,
        head_dim_v: int,
        threads: int | None = None,
    ) -> list[tuple[int, ...]]:
        """k, v (f32 copies of the cache) [Hkv, n_ctx, hd]; q, o [rows, hd] (none with one KV head);
        inv [n_batch * group] (1 / softmax sum per row); s, the scores, with at least one query's
        group of rows over the whole context. ``threads``: how many may share a batch (default:
        Numba's thread count)."""
        group = n_head // n_head_kv
        threads = threads or numba.config.NUMBA_NUM_THREADS
        rows = 0 if n_head_kv == 1 else min(n_batch, threads * MAX_BLOCK) * group
        return [
            (n_head_kv, n_ctx, head_dim_k),
            (n_head_kv, n_ctx, head_dim_v),
            (rows, head_dim_k),
            (rows, head_dim_v),
            (n_batch * group,),
            (max(SCORES_BYTES // 4, group * n_ctx),),
        ]

    def block(self, n: int, n_cells: int, group: int, parts: int = 1) -> int:
        """Queries per block so that their scores over n_cells fit in a ``parts``-th of the buffers."""
        s = self.s.size // parts
        rows = (self.inv.size if self.in_place else self.q.shape[0]) // parts // group
        return max(1, min(n, MAX_BLOCK, s // (group * max(n_cells, 1)), rows))

    @property
    def nbytes(self) -> int:
        """Bytes of its own buffer (0 when it is a region of the scratch arena)."""
        return self.buf.nbytes if self.buf is not None else 0


@njit(cache=True, fastmath=True, parallel=True)
def _cache_to_f32(c: np.ndarray, n_cells: int, out: np.ndarray) -> None:
    """out[h, j] = float32(c[j, h]) for j < n_cells (c: [C, Hkv, hd], half bits or float32)."""
    nkv = c.shape[1]
    hd = c.shape[2]
    for j in prange(n_cells):
        for h in range(nkv):
            for i in range(hd):
                out[h, j, i] = _f32(c[j, h, i])


@njit(cache=True, fastmath=True, parallel=True)
def _cache_q8_to_f32(c: np.ndarray, n_cells: int, out: np.ndarray) -> None:
    """out[h, j] = dequantized c[j, h] for j < n_cells (c: [C, Hkv, hd / 32 * 34] Q8_0 blocks)."""
    nkv = c.shape[1]
    nb = out.shape[2] // 32
    for j in prange(n_cells):
        for h in range(nkv):
            for b in range(nb):
                o = b * 34
                d = half_to_float(np.uint16(c[j, h, o]) | (np.uint16(c[j, h, o + 1]) << np.uint16(8)))
                for i in range(32):
                    out[h, j, b * 32 + i] = d * np.float32(np.int8(c[j, h, o + 2 + i]))


@njit(cache=True, fastmath=True, nogil=True)
def _gather_q(
    q: np.ndarray, t0: int, t1: int, h0: int, group: int, scale: float, round16: bool, out: np.ndarray
) -> None:
    """out[(t - t0) * group + g] = q[t, h0 + g] * scale, q first rounded to half when ``round16``.

    ``out`` may be q[t0:t1] itself (one KV head: each element is read, then written in place).

    llama.cpp converts Q to the half-precision cache's type before Q·K (flash attention's
    ``q_to_vec_dot``); doing the same keeps prompt logits on its side of Q8 rounding
    boundaries more often (measured on the golden fixtures: 365/366 confident steps
    instead of 363).
    """
    sc = np.float32(scale)
    for t in range(t0, t1):
        for g in range(group):
            r = (t - t0) * group + g
            for i in range(q.shape[2]):
                x = q[t, h0 + g, i]
                if round16:
                    x = half_to_float(float_to_half(x))
                out[r, i] = x * sc


@njit(cache=True, fastmath=True, nogil=True)
def _scatter_o(o: np.ndarray, inv: np.ndarray, t0: int, t1: int, h0: int, group: int, out: np.ndarray) -> None:
    """out[t, h0 + g] = o[r] * inv[r]: the softmax's normalization, applied to the output rows
    (``o`` may be out[t0:t1] itself, as for _gather_q)."""
    for t in range(t0, t1):
        for g in range(group):
            r = (t - t0) * group + g
            for i in range(o.shape[1]):
                out[t, h0 + g, i] = o[r, i] * inv[r]


@njit(cache=True, fastmath=True, inline="always")
def _softmax_row(s, r, group, pos, cell_pos, window, softcap, inv):  # type: ignore[no-untyped-def]
    """row r of s: exp(score - max) of the cells query r // group sees, 0 elsewhere; inv[r] = 1 / their sum.

    Two passes over the row (the mask and its max, then exp and the sum), the 1 / sum left to
    the output rows (``_scatter_o``, hd values instead of n_cells): a block of scores outgrows
    L2 at long contexts, and the five passes this replaced (mask, shift, exp, sum, scale) made
    the softmax cost as much as both products around it.
    """
    n_cells = s.shape[1]
    cap = np.float32(softcap)
    n8 = n_cells // 8 * 8
    p = pos[r // group]
    lo = p - window if window > 0 else -1
    row = s[r]
    if cap > 0.0:
        for j in range(n_cells):
            row[j] = cap * np.float32(math.tanh(row[j] / cap))
    lowest = np.float32(LOWEST)
    mx = masked_max(row.ctypes.data, cell_pos.ctypes.data, n8, p, lo)
    for j in range(n8, n_cells):
        cp = cell_pos[j]
        if cp >= 0 and cp <= p and cp > lo:
            mx = max(mx, row[j])
    # nothing visible: output zeros (flagged by a finite float: under fast-math LLVM may assume no
    # float is infinite and fold a test of mx == -inf away, as it did once this was inlined)
    if mx == lowest:
        for j in range(n_cells):
            row[j] = np.float32(0.0)
        inv[r] = np.float32(0.0)
        return
    total = masked_exp_sum(row.ctypes.data, cell_pos.ctypes.data, n8, p, lo, mx)
    for j in range(n8, n_cells):
        cp = cell_pos[j]
        ok = (cp >= 0) & (cp <= p) & (cp > lo)
        row[j] = np.float32(math.exp(row[j] - mx)) if ok else np.float32(0.0)
        total += row[j]
    inv[r] = np.float32(1.0) / total


@njit(cache=True, fastmath=True, parallel=True)
def _masked_softmax(
    s: np.ndarray,  # [rows, n_cells]: scores in, unnormalized probabilities out
    group: int,
    pos: np.ndarray,  # positions of this block's queries (row r is query r // group)
    cell_pos: np.ndarray,
    window: int,
    softcap: float,
    inv: np.ndarray,  # [rows]: 1 / each row's sum out
) -> None:
    for r in prange(s.shape[0]):
        _softmax_row(s, r, group, pos, cell_pos, window, softcap, inv)


@njit(cache=True, fastmath=True, nogil=True)
def _masked_softmax_serial(
    s: np.ndarray, group: int, pos: np.ndarray, cell_pos: np.ndarray, window: int, softcap: float, inv: np.ndarray
) -> None:
    """:func:`_masked_softmax` on the calling thread, without the GIL (one block per thread)."""
    for r in range(s.shape[0]):
        _softmax_row(s, r, group, pos, cell_pos, window, softcap, inv)


@njit(cache=True, nogil=True)
def _visible_span(cell_pos: np.ndarray, n_cells: int, pmin: int, pmax: int, window: int) -> tuple[int, int]:
    """[j0, j1): the cells any query at positions pmin..pmax may see lie in this index range."""
    j0, j1 = n_cells, 0
    lo = pmin - window if window > 0 else -1
    for j in range(n_cells):
        cp = cell_pos[j]
        if cp >= 0 and cp <= pmax and cp > lo:
            j0 = min(j0, j)
            j1 = j + 1
    return j0, max(j0, j1)


def attention_batch(
    q: np.ndarray,  # [n, H, hd] float32 (overwritten: scaled in place when the scratch has no q buffer)
    k: np.ndarray,  # [C, Hkv, hd] cache (float32, uint16 half, or uint8 Q8_0 blocks [C, Hkv, hd / 32 * 34])
    v: np.ndarray,  # [C, Hkv, hdv]
    pos: np.ndarray,  # [n] int32
    cell_pos: np.ndarray,  # [C] int32, -1 if empty
    n_cells: int,
    scale: float,
    window: int,
    softcap: float,
    w: AttentionScratch,
    out: np.ndarray,  # [n, H, hdv]
    threads: int = 1,
) -> None:
    """Same result as ops.attention (to float32 rounding), for many queries at once.

    ``threads`` > 1 shares the (query block, KV head) items among that many threads, each with
    its own share of the scratch and single-threaded BLAS calls (the caller holds BLAS at one
    thread: see Model.forward); each item is computed exactly as with one thread.
    """
    n, nh, _ = q.shape
    nkv = k.shape[1]
    group = nh // nkv
    in_place = w.in_place
    if in_place and not (nkv == 1 and q.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError(
            "attention_batch with a one-KV-head scratch works on q and out in place: "
            f"needs one KV head (got {nkv}) and C-contiguous q and out"
        )
    kf, vf = w.k[:, :n_cells], w.v[:, :n_cells]
    # one float32 copy per layer: Q8_0 blocks are dequantized here, so the products below are the same
    (_cache_q8_to_f32 if k.dtype == np.uint8 else _cache_to_f32)(k, n_cells, w.k)
    (_cache_q8_to_f32 if v.dtype == np.uint8 else _cache_to_f32)(v, n_cells, w.v)
    # each thread's share of the scratch must hold at least one query's group of rows; the blocks
    # stay those of one thread where they fit in a share (then so do the results, bit for bit)
    row_parts = threads if in_place else w.q.shape[0] // group
    parts = max(1, min(threads, w.s.size // (group * max(n_cells, 1)), row_parts, w.inv.size // group))
    block = w.block(n, n_cells, group)
    if parts > 1 and w.block(n, n_cells, group, parts) < block:
        block = w.block(n, n_cells, group, parts)
    items = [(t0, h) for t0 in range(0, n, block) for h in range(nkv)]
    parts = min(parts, len(items))
    rows_cap, s_cap, inv_cap = w.q.shape[0] // parts, w.s.size // parts, w.inv.size // parts

    def run(part: int, mine: list[tuple[int, int]]) -> None:
        qbuf, obuf = w.q[part * rows_cap : (part + 1) * rows_cap], w.o[part * rows_cap : (part + 1) * rows_cap]
        ibuf = w.inv[part * inv_cap : (part + 1) * inv_cap]
        sbuf = w.s[part * s_cap : (part + 1) * s_cap]
        softmax = _masked_softmax if parts == 1 else _masked_softmax_serial
        for t0, h in mine:
            t1 = min(t0 + block, n)
            rows = (t1 - t0) * group
            pb = pos[t0:t1]
            j0, j1 = _visible_span(cell_pos, n_cells, int(pb.min()), int(pb.max()), window)
            nc = j1 - j0
            if in_place:  # the block's rows (t, g) are q[t0:t1] and out[t0:t1] as laid out
                qg, o = q[t0:t1].reshape(rows, -1), out[t0:t1].reshape(rows, -1)
            else:
                qg, o = qbuf[:rows], obuf[:rows]
            s = sbuf[: rows * nc].reshape(rows, nc)
            _gather_q(q, t0, t1, h * group, group, scale, k.dtype == np.uint16, qg)
            np.matmul(qg, kf[h, j0:j1].T, out=s)
            softmax(s, group, pb, cell_pos[j0:j1], window, softcap, ibuf)
            np.matmul(s, vf[h, j0:j1], out=o)
            _scatter_o(o, ibuf, t0, t1, h * group, group, out)

    if parts == 1:
        run(0, items)
        return
    pool = _helpers(parts - 1)
    futures = [pool.submit(run, i, items[i::parts]) for i in range(1, parts)]
    run(0, items[0::parts])
    for f in futures:
        f.result()


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _helpers(n: int) -> ThreadPoolExecutor:
    """A pool of at least ``n`` helper threads, made once (threads are kept between layers)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="lmap-attention")
            _pool_size = n
        return _pool
