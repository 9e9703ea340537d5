"""What llama.cpp's SPM and BPE sessions share, compiled: symbols as byte ranges, a priority queue.

A symbol is a byte range of the text (start, size) in a doubly linked list, as llama.cpp's
``llm_symbol`` is a pointer, a length, prev and next; merging two neighbours is a few integer
updates.  The queue is a binary heap of candidate pairs (priority, left, right, byte size)
ordered by priority descending, then left ascending (``llm_bigram_spm::comparator``; BPE passes
``-rank``, so the lowest rank comes first, leftmost on ties, as ``llm_bigram_bpe``).  A pair whose
sides changed after it was queued is skipped when it comes up, as llama.cpp skips it.

Work arrays (the caller allocates them; see :func:`workspace`): int64 [13 m] and float64 [3 m]
for a text of m bytes: m symbols, and m - 1 first pairs plus at most two per merge.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# lead byte's high nibble -> bytes in the character, as llama.cpp's unicode_len_utf8
_LEN_UTF8 = np.array([1] * 12 + [2, 2, 3, 4], dtype=np.int64)


@njit(cache=True, nogil=True, inline="always")
def workspace(
    work: np.ndarray, m: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:  # pragma: no cover
    """(start, size, prev, next) per symbol and (left, right, size) per heap entry, from ``work``."""
    return (
        work[0:m],
        work[m : 2 * m],
        work[2 * m : 3 * m],
        work[3 * m : 4 * m],
        work[4 * m : 7 * m],
        work[7 * m : 10 * m],
        work[10 * m : 13 * m],
    )


@njit(cache=True, nogil=True, inline="always")
def split_symbols(
    text: np.ndarray, s: int, e: int, start: np.ndarray, size: np.ndarray, prv: np.ndarray, nxt: np.ndarray
) -> int:  # pragma: no cover - compiled
    """Cut ``text[s:e]`` into one symbol per character by lead bytes, without validating
    (llama.cpp's ``unicode_len_utf8``); return how many."""
    ns = 0
    o = s
    while o < e:
        ln = min(_LEN_UTF8[text[o] >> 4], e - o)
        start[ns] = o
        size[ns] = ln
        prv[ns] = ns - 1
        o += ln
        nxt[ns] = -1 if o == e else ns + 1
        ns += 1
    return ns


@njit(cache=True, nogil=True, inline="always")
def _before(hs: np.ndarray, hl: np.ndarray, a: int, b: int) -> bool:  # pragma: no cover - compiled
    return hs[a] > hs[b] or (hs[a] == hs[b] and hl[a] < hl[b])


@njit(cache=True, nogil=True, inline="always")
def _swap(hs: np.ndarray, hl: np.ndarray, hr: np.ndarray, hz: np.ndarray, a: int, b: int) -> None:  # pragma: no cover
    hs[a], hs[b] = hs[b], hs[a]
    hl[a], hl[b] = hl[b], hl[a]
    hr[a], hr[b] = hr[b], hr[a]
    hz[a], hz[b] = hz[b], hz[a]


@njit(cache=True, nogil=True)
def push(
    hs: np.ndarray,
    hl: np.ndarray,
    hr: np.ndarray,
    hz: np.ndarray,
    n: int,
    priority: float,
    left: int,
    right: int,
    size: int,
) -> int:  # pragma: no cover - compiled
    """Queue a pair on the heap of ``n`` entries; return the new count."""
    hs[n], hl[n], hr[n], hz[n] = priority, left, right, size
    c = n
    while c > 0:
        p = (c - 1) >> 1
        if not _before(hs, hl, c, p):
            break
        _swap(hs, hl, hr, hz, c, p)
        c = p
    return n + 1


@njit(cache=True, nogil=True)
def _pop(hs: np.ndarray, hl: np.ndarray, hr: np.ndarray, hz: np.ndarray, n: int) -> int:  # pragma: no cover
    """Move the top to slot ``n - 1`` and restore the heap over the first ``n - 1``."""
    n -= 1
    _swap(hs, hl, hr, hz, 0, n)
    p = 0
    while True:
        c = 2 * p + 1
        if c >= n:
            break
        if c + 1 < n and _before(hs, hl, c + 1, c):
            c += 1
        if not _before(hs, hl, c, p):
            break
        _swap(hs, hl, hr, hz, c, p)
        p = c
    return n


@njit(cache=True, nogil=True, inline="always")
def merge_top(
    hs: np.ndarray,
    hl: np.ndarray,
    hr: np.ndarray,
    hz: np.ndarray,
    nh: int,
    size: np.ndarray,
    prv: np.ndarray,
    nxt: np.ndarray,
) -> tuple[int, int]:  # pragma: no cover - compiled
    """Pop the best pair and merge its right symbol into its left one: (entries left, the merged
    symbol, or -1 when the pair was stale).  The caller then queues the merged symbol's new pairs
    with ``prv[left]`` and ``nxt[left]``."""
    nh = _pop(hs, hl, hr, hz, nh)
    left = hl[nh]
    right = hr[nh]
    if size[left] == 0 or size[right] == 0 or size[left] + size[right] != hz[nh]:
        return nh, -1  # a side changed since the pair was queued
    size[left] += size[right]
    size[right] = 0
    after = nxt[right]
    nxt[left] = after
    if after >= 0:
        prv[after] = left
    return nh, left
