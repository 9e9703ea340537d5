"""One pass over a quantized matrix for several activation vectors: the batched decode product.

When the server decodes N sequences together, each weight row is read from memory
once and multiplied by the N sequences' activations while it sits in L1 — the
reason a batch of N tokens costs much less than N single-token steps. Each row
product is the very row-dot intrinsic the one-token path uses (``matvec_q8`` of
each format), with the same activation quantization, so every sequence gets
bit-for-bit the logits it would get decoding alone.

Kernels take xq [N, k] int8, xd and xs [N, k/32] float32 (the per-row buffers
``quantize_rows`` fills, row strides may exceed k) and write out [N, rows].
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numba import njit, prange

from ..quants import KERNELS, ActScratch, QMatrix
from ..quants.q8_k import quantize_q8_k
from . import ops
from .simd import row_dot_q4_0_q8_0, row_dot_q4_1_q8_1, row_dot_q8_0_q8_0
from .simd_more import (
    row_dot_iq4_nl_q8_0,
    row_dot_iq4_xs_q8_k,
    row_dot_q2_k_q8_k,
    row_dot_q3_k_q8_k,
    row_dot_q4_k_q8_k,
    row_dot_q5_0_q8_0,
    row_dot_q5_1_q8_1,
    row_dot_q5_k_q8_k,
    row_dot_q6_k_q8_k,
)


class RowActs:
    """Activations of up to ``n_rows`` vectors quantized as each format's one-token product expects."""

    def __init__(self, n_rows: int, max_cols: int) -> None:
        self.q = np.zeros((n_rows, max_cols), np.int8)
        self.d = np.zeros((n_rows, max(max_cols // 32, 1)), np.float32)
        self.s = np.zeros((n_rows, max(max_cols // 32, 1)), np.float32)

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.d.nbytes + self.s.nbytes


@njit(cache=True)
def quantize_rows_q8(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    for j in range(x.shape[0]):
        ops.quantize_q8(x[j], xq[j], xd[j], xs[j])


@njit(cache=True)
def quantize_rows_q8_k(x: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> None:
    for j in range(x.shape[0]):
        quantize_q8_k(x[j], xq[j], xd[j], xs[j])


# Blocks of 32 activations (Q8_0 / Q8_1 partners). Loop order: a weight row stays in L1 while
# the N activation rows pass over it.
@njit(cache=True, parallel=True)
def _q8_0(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 32
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q8_0_q8_0(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q4_0(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 32
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q4_0_q8_0(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q5_0(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 32
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q5_0_q8_0(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _iq4_nl(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 32
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_iq4_nl_q8_0(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q4_1(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 32
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    sp = xs.ctypes.data
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q4_1_q8_1(wp + r * ws, xp + j * xst, dp + j * dst, sp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q5_1(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 32
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    sp = xs.ctypes.data
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q5_1_q8_1(wp + r * ws, xp + j * xst, dp + j * dst, sp + j * dst, nb)


# Super-blocks of 256 (Q8_K partners)
@njit(cache=True, parallel=True)
def _q2_k(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 256
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q2_k_q8_k(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q3_k(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 256
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q3_k_q8_k(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q4_k(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 256
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q4_k_q8_k(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q5_k(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 256
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q5_k_q8_k(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _q6_k(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 256
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_q6_k_q8_k(wp + r * ws, xp + j * xst, dp + j * dst, nb)


@njit(cache=True, parallel=True)
def _iq4_xs(w, xq, xd, xs, out):  # type: ignore[no-untyped-def]
    n, nb = xq.shape[0], xq.shape[1] // 256
    wp, ws, xp, dp, xst, dst = w.ctypes.data, w.strides[0], xq.ctypes.data, xd.ctypes.data, xq.strides[0], xd.strides[0]
    for r in prange(w.shape[0]):
        for j in range(n):
            out[j, r] = row_dot_iq4_xs_q8_k(wp + r * ws, xp + j * xst, dp + j * dst, nb)


# format -> (its one-token integer product, the batched kernel over the same row dot)
MULTI: dict[str, tuple[Callable[..., None] | None, Callable[..., None]]] = {
    name: (KERNELS[name].matvec_q8 if name in KERNELS else None, kernel)
    for name, kernel in {
        "Q8_0": _q8_0,
        "Q4_0": _q4_0,
        "Q4_1": _q4_1,
        "Q5_0": _q5_0,
        "Q5_1": _q5_1,
        "IQ4_NL": _iq4_nl,
        "Q2_K": _q2_k,
        "Q3_K": _q3_k,
        "Q4_K": _q4_k,
        "Q5_K": _q5_k,
        "Q6_K": _q6_k,
        "IQ4_XS": _iq4_xs,
    }.items()
}

_QUANTIZE_ROWS = {ops.quantize_q8: quantize_rows_q8, quantize_q8_k: quantize_rows_q8_k}


def matmul_rows(w: QMatrix, x: np.ndarray, out: np.ndarray, acts: RowActs | None, act: ActScratch | None) -> None:
    """out[j] = W @ x[j] for each row j, each exactly as ``w.matmul(x[j : j + 1], ...)`` computes it.

    ``act`` is the model's activation setting (None: exact float32 products), as for
    :meth:`QMatrix.matmul`; ``acts`` (the quantized rows' scratch) is needed only with it.
    """
    n, k = x.shape
    kern = w.k
    if act is None or kern.activation is None or kern.matvec_q8 is None:
        # float weights or exact float activations: the one-token float mat-vec, row by row
        if act is not None and kern.activation is not None:
            xr = act.f32[: x.size].reshape(x.shape)
            kern.activation(x, xr)
            x = xr
        for j in range(n):
            w.matvec(x[j], out[j])
        return
    assert acts is not None, "quantized activations need the RowActs scratch (Scratch.acts)"
    xq, xd, xs = acts.q[:n, :k], acts.d[:n, : k // 32], acts.s[:n, : k // 32]
    quantize = _QUANTIZE_ROWS.get(kern.quantize)
    if quantize is not None:
        quantize(x, xq, xd, xs)
    else:
        for j in range(n):
            kern.quantize(x[j], xq[j], xd[j], xs[j])
    single, multi = MULTI.get(w.format.name, (None, None))
    if multi is not None and single is kern.matvec_q8:
        multi(w.data, xq, xd, xs, out)
        return
    for j in range(n):  # a format without a batched kernel: its own product, one row at a time
        kern.matvec_q8(w.data, xq[j], xd[j], xs[j], out[j])
