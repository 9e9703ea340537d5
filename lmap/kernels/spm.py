"""SentencePiece-style merges (llama.cpp's ``llm_tokenizer_spm_session``), compiled over bytes.

The vocabulary is a :class:`~lmap.string_array.StringArray` and its hash table; a symbol is a
byte range of the text, as llama.cpp's ``llm_symbol`` is a pointer and a length, so a merge is
two integer updates and a lookup hashes the range in place.  Priority queue: a binary heap on
(score descending, left index ascending), llama.cpp's ``llm_bigram_spm::comparator``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .strings import lookup

# lead byte's high nibble -> bytes in the character, as llama.cpp's unicode_len_utf8
_LEN_UTF8 = np.array([1] * 12 + [2, 2, 3, 4], dtype=np.int64)


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
def _push(
    hs: np.ndarray,
    hl: np.ndarray,
    hr: np.ndarray,
    hz: np.ndarray,
    n: int,
    score: float,
    left: int,
    right: int,
    size: int,
) -> int:  # pragma: no cover - compiled
    hs[n], hl[n], hr[n], hz[n] = score, left, right, size
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


@njit(cache=True, nogil=True)
def spm_tokenize(
    text: np.ndarray,
    data: np.ndarray,
    offsets: np.ndarray,
    table: np.ndarray,
    scores: np.ndarray,
    byte_ids: np.ndarray,
    work: np.ndarray,
    hs: np.ndarray,
    out: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """Write the ids of ``text`` (uint8 [m], spaces already U+2581) to ``out`` (int32 [m]).

    Returns how many, or ``-1 - b`` when byte ``b`` needs a byte-fallback token the vocabulary
    lacks.  ``work`` is int64 [13 m]: per symbol its start, length, previous and next; per heap
    entry its left and right symbols and byte size (m - 1 first pairs, at most two per merge);
    ``hs`` is float64 [3 m], the heap entries' scores.
    """
    m = text.shape[0]
    start = work[0:m]
    size = work[m : 2 * m]
    prv = work[2 * m : 3 * m]
    nxt = work[3 * m : 4 * m]
    hl = work[4 * m : 7 * m]
    hr = work[7 * m : 10 * m]
    hz = work[10 * m : 13 * m]

    # one symbol per character, cut by lead bytes without validation (unicode_len_utf8)
    ns = 0
    o = 0
    while o < m:
        ln = min(_LEN_UTF8[text[o] >> 4], m - o)
        start[ns] = o
        size[ns] = ln
        prv[ns] = ns - 1
        o += ln
        nxt[ns] = -1 if o == m else ns + 1
        ns += 1

    nh = 0
    for i in range(1, ns):
        t = lookup(data, offsets, table, text, start[i - 1], start[i] + size[i])
        if t >= 0:
            nh = _push(hs, hl, hr, hz, nh, scores[t], i - 1, i, size[i - 1] + size[i])

    while nh > 0:
        nh = _pop(hs, hl, hr, hz, nh)
        left = hl[nh]
        right = hr[nh]
        if size[left] == 0 or size[right] == 0 or size[left] + size[right] != hz[nh]:
            continue  # a side changed since the pair was queued
        size[left] += size[right]
        size[right] = 0
        after = nxt[right]
        nxt[left] = after
        if after >= 0:
            prv[after] = left
        before = prv[left]
        if before >= 0:
            t = lookup(data, offsets, table, text, start[before], start[left] + size[left])
            if t >= 0:
                nh = _push(hs, hl, hr, hz, nh, scores[t], before, left, size[before] + size[left])
        if after >= 0:
            t = lookup(data, offsets, table, text, start[left], start[after] + size[after])
            if t >= 0:
                nh = _push(hs, hl, hr, hz, nh, scores[t], left, after, size[left] + size[after])

    # Every merged symbol is a token (a pair is queued only if its text is one), so llama.cpp's
    # resegment reduces to: a token, or a single character spelled as byte tokens.
    k = 0
    i = 0
    while i != -1:
        s = start[i]
        e = s + size[i]
        t = lookup(data, offsets, table, text, s, e)
        if t >= 0:
            out[k] = t
            k += 1
        else:
            for j in range(s, e):
                b = byte_ids[text[j]]
                if b < 0:
                    return -1 - np.int64(text[j])
                out[k] = b
                k += 1
        i = nxt[i]
    return k


@njit(cache=True, nogil=True)
def spm_byte_ids(
    data: np.ndarray, offsets: np.ndarray, table: np.ndarray, key: np.ndarray, out: np.ndarray
) -> None:  # pragma: no cover - compiled
    """``out[b]``: the token of byte ``b`` (llama.cpp's ``byte_to_token``): ``<0xXX>``, else the
    byte itself as a text, else -1.  ``key`` is uint8 [6] scratch."""
    key[0] = 60  # <
    key[1] = 48  # 0
    key[2] = 120  # x
    key[5] = 62  # >
    for b in range(256):
        hi = b >> 4
        lo = b & 15
        key[3] = 48 + hi if hi < 10 else 55 + hi  # uppercase hex, as llama.cpp's snprintf("%02X")
        key[4] = 48 + lo if lo < 10 else 55 + lo
        t = lookup(data, offsets, table, key, 0, 6)
        if t < 0:
            key[0] = b
            t = lookup(data, offsets, table, key, 0, 1)
            key[0] = 60
        out[b] = t
