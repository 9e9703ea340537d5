"""The usual sampler chain (top-k, top-p, min-p, temperature, draw) in one compiled pass.

The NumPy chain in ``lmap.sampling`` makes a dozen small array operations per token; right
after a forward pass (the logits half in the other core's cache, the caches full of weights)
they cost 0.17-0.26 ms per token in the server, 7 % of a 4-slot decode step. Here the
vocabulary is scanned once, in chunks whose maximum (a vector reduction) rarely beats the
smallest of the k kept so far, and the k survivors go through the same float64 arithmetic as
the NumPy stages. ``Sampler.sample`` takes this path when no logit bias or penalty edits the
logits and typical-p is off; ``tests/test_sampling.py`` checks it draws what the chain draws.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

CHUNK = 64  # logits per maximum check: a few vector instructions, skipped whole once k are kept


@njit(cache=True, inline="always")
def _chunk_max(x: np.ndarray, a: int, b: int) -> float:
    """max(x[a:b]); eight running maxima, so the loop is not one long chain of dependent compares."""
    if b - a < 8:
        m = x[a]
        for i in range(a + 1, b):
            m = max(m, x[i])
        return m
    m0, m1, m2, m3, m4, m5, m6, m7 = x[a], x[a + 1], x[a + 2], x[a + 3], x[a + 4], x[a + 5], x[a + 6], x[a + 7]
    i = a + 8
    while i + 8 <= b:
        m0, m1, m2, m3 = max(m0, x[i]), max(m1, x[i + 1]), max(m2, x[i + 2]), max(m3, x[i + 3])
        m4, m5, m6, m7 = max(m4, x[i + 4]), max(m5, x[i + 5]), max(m6, x[i + 6]), max(m7, x[i + 7])
        i += 8
    while i < b:
        m0 = max(m0, x[i])
        i += 1
    return max(max(max(m0, m1), max(m2, m3)), max(max(m4, m5), max(m6, m7)))


@njit(cache=True)
def _kth_largest(a: np.ndarray, n: int, k: int) -> float:
    """The k-th largest of a[:n] (1 <= k <= n), by quickselect in place."""
    target = n - k
    lo, hi = 0, n - 1
    while lo < hi:
        pivot = a[(lo + hi) // 2]
        i, j = lo, hi
        while i <= j:
            while a[i] < pivot:
                i += 1
            while a[j] > pivot:
                j -= 1
            if i <= j:
                a[i], a[j] = a[j], a[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:
            break
    return a[target]


@njit(cache=True)
def _top_k(x: np.ndarray, k: int, ids: np.ndarray, vals: np.ndarray, cmax: np.ndarray, tmp: np.ndarray) -> int:
    """ids, vals = the k largest logits (float64), sorted descending, ties by lower id; returns how many.

    Every chunk's maximum is a distinct logit, so the k-th largest chunk maximum t has at least
    k logits at or above it, and only chunks reaching t need a look: about k of the n / 64.
    """
    n = x.shape[0]
    nch = (n + CHUNK - 1) // CHUNK
    for c in range(nch):
        cmax[c] = _chunk_max(x, c * CHUNK, min(n, c * CHUNK + CHUNK))
    t = -math.inf
    if k <= nch:
        tmp[:nch] = cmax[:nch]
        t = _kth_largest(tmp, nch, k)
    m = 0
    for c in range(nch):
        if cmax[c] < t:
            continue
        for j in range(c * CHUNK, min(n, c * CHUNK + CHUNK)):
            v = x[j]
            if not v >= t:
                continue
            if m < k:
                p = m
                m += 1
            elif v > vals[k - 1]:  # strictly: among equal logits the lower id (seen first) stays
                p = k - 1
            else:
                continue
            while p > 0 and vals[p - 1] < v:
                vals[p] = vals[p - 1]
                ids[p] = ids[p - 1]
                p -= 1
            vals[p] = v
            ids[p] = j
    return m


@njit(cache=True, inline="always")
def _cum_weights(vals: np.ndarray, n: int, cum: np.ndarray) -> None:
    """cum[:n] = running sums of exp(vals[i] - vals[0]) (vals sorted descending), as np.cumsum sums."""
    s = 0.0
    for i in range(n):
        s += math.exp(vals[i] - vals[0])
        cum[i] = s


@njit(cache=True)
def sample_top_k(
    x: np.ndarray,  # [n_vocab] float32 logits
    k: int,  # 0 < k < n_vocab
    top_p: float,
    min_p: float,
    temperature: float,  # > 0
    u: float,  # the draw's uniform in [0, 1)
    ids: np.ndarray,  # [k] int64 scratch
    vals: np.ndarray,  # [k] float64 scratch
    cum: np.ndarray,  # [k] float64 scratch
    cmax: np.ndarray,  # [ceil(n_vocab / CHUNK)] float32 scratch
    tmp: np.ndarray,  # [ceil(n_vocab / CHUNK)] float32 scratch
) -> int:
    """The token ``Sampler`` draws with uniform ``u``: TopK, TopP, MinP, Temperature, then the draw."""
    n = _top_k(x, k, ids, vals, cmax, tmp)
    if n == 0 or vals[0] == -math.inf:  # nothing to weigh (the chain's draw takes the first too)
        return ids[0] if n else 0
    if top_p < 1.0 and n > 1:
        _cum_weights(vals, n, cum)
        target = top_p * cum[n - 1]
        last = 0
        while last < n and cum[last] < target:  # searchsorted(cum, target, "left")
            last += 1
        n = min(max(last + 1, 1), n)
    if min_p > 0.0 and n > 1:
        threshold = vals[0] + math.log(min_p)
        c = 0
        for i in range(n):
            if vals[i] >= threshold:
                c += 1
        n = max(c, 1)
    if temperature != 1.0:
        for i in range(n):
            vals[i] = vals[i] / temperature
    if n == 1:
        return ids[0]
    _cum_weights(vals, n, cum)
    target = u * cum[n - 1]
    i = 0
    while i < n and cum[i] <= target:  # searchsorted(cum, target, "right")
        i += 1
    return ids[min(i, n - 1)]
