"""Decode products: a few activation rows times quantized matrices, on the spinning team.

One token (or the server's N sequences, one row each) meets every weight row once:
each weight row is read from memory once and multiplied by the N activation rows
while it sits in L1 — why a batch of N tokens costs much less than N single-token
steps. Matrices that share an input (Q/K/V, gate/up) go out as one job, so the
activations are quantized once and the threads meet once. Each row product is the
format's row-dot intrinsic with llama.cpp's activation quantization, the same the
one-token ``matvec_q8`` kernels use, so every sequence gets bit-for-bit the logits
it would get decoding alone.
"""

from __future__ import annotations

import threading

import numpy as np

from ..quants import ActScratch, QMatrix
from ..threads import decode_threads
from . import ops
from .chunks import CHUNKS
from .team import MAX_MATS, Team, team


class RowActs:
    """Activations of up to ``n_rows`` vectors quantized as the integer products expect.

    q int8 [n_rows, max_cols]; d, s float32 [n_rows, max_cols / 32] (Q8_0/Q8_1 scales and sums,
    or Q8_K scales and block sums). Q8_0/Q8_1 scales are written block-major into the same
    buffers ([nb, n_rows] over the first nb * n_rows floats; team._run, simd_multi._dots32).
    """

    def __init__(self, n_rows: int, max_cols: int) -> None:
        self.q = np.zeros((n_rows, max_cols), np.int8)
        self.d = np.zeros((n_rows, max(max_cols // 32, 1)), np.float32)
        self.s = np.zeros((n_rows, max(max_cols // 32, 1)), np.float32)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + self.s.nbytes


_solo = threading.local()  # a helper-less team per thread, for a caller that finds the team busy


def _run(fmt: str, x: np.ndarray, acts: RowActs, ws: list, outs: list) -> None:
    t = team(decode_threads())
    if t.lock.acquire(blocking=False):
        try:
            t.run(fmt, x, acts, ws, outs)
        finally:
            t.lock.release()
        return
    solo = getattr(_solo, "team", None)
    if solo is None:
        solo = _solo.team = Team(1)
    solo.run(fmt, x, acts, ws, outs)


def on_team(w: QMatrix, act: ActScratch | None) -> bool:
    """Whether products with ``w`` go through the team (quantized weights meeting int8 activations)."""
    return act is not None and w.k.matvec_q8 is not None and w.format.name in CHUNKS


def matmuls(pairs: list[tuple[QMatrix, np.ndarray]], x: np.ndarray, acts: RowActs) -> None:
    """out[j] = W @ x[j] for every (W, out [n, W.rows]) of ``pairs`` (all :func:`on_team`).

    Matrices of one format go out together (one activation quantization, one job).
    """
    by_fmt: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for w, out in pairs:
        ws, outs = by_fmt.setdefault(w.format.name, ([], []))
        ws.append(w.data)
        outs.append(out)
    for fmt, (ws, outs) in by_fmt.items():
        for i in range(0, len(ws), MAX_MATS):
            _run(fmt, x, acts, ws[i : i + MAX_MATS], outs[i : i + MAX_MATS])


def attention_spans(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    pos: np.ndarray,
    cell_pos: np.ndarray,
    spans: np.ndarray,
    scale: float,
    window: int,
    softcap: float,
    scores: np.ndarray,
    out: np.ndarray,
    min_rows: int = 2,
) -> None:
    """:func:`ops.attention_spans`, with the (row, head) pairs of several rows shared by the team.

    The server's decode step attends for every sequence at once; done serially that was a fifth
    of a 4-row step (SmolLM2: 2.2 of 11 ms) while the other thread spun idle. Prange's pool does
    not help here: its workers would compete with the spinning team for the same cores.
    ``min_rows``: fewer rows go serially (one token over a long context passes 1).
    """
    if q.shape[0] >= min_rows and k.dtype == np.uint16 and v.dtype == np.uint16:
        t = team(decode_threads())
        if t.n_threads > 1 and t.lock.acquire(blocking=False):
            try:
                t.attention(q, k, v, pos, cell_pos, spans, scale, window, softcap, scores, out)
            finally:
                t.lock.release()
            return
    ops.attention_spans(q, k, v, pos, cell_pos, spans, scale, window, softcap, scores, out)


def matmul_rows(w: QMatrix, x: np.ndarray, out: np.ndarray, acts: RowActs | None, act: ActScratch | None) -> None:
    """out[j] = W @ x[j] for each row j, each exactly as ``w.matmul(x[j : j + 1], ...)`` computes it.

    ``act`` is the model's activation setting (None: exact float32 products), as for
    :meth:`QMatrix.matmul`; ``acts`` (the quantized rows' scratch) is needed only with it.
    """
    if acts is not None and on_team(w, act):
        matmuls([(w, out)], x, acts)
        return
    kern = w.k
    if act is None or kern.activation is None:
        for j in range(x.shape[0]):  # float weights or exact float activations: the float mat-vec, row by row
            w.matvec(x[j], out[j])
        return
    for r0, xr in act.rounded(x, kern.activation):
        for j in range(xr.shape[0]):
            w.matvec(xr[j], out[r0 + j])
