"""SentencePiece-style merges (llama.cpp's ``llm_tokenizer_spm_session``), compiled over bytes.

The vocabulary is a :class:`~lmap.string_array.StringArray` and its hash table; a pair's text is
the byte range its two neighbouring symbols span, hashed in place.  Symbols and the queue
(score descending, leftmost on ties) are :mod:`lmap.kernels.merges`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .merges import merge_top, push, split_symbols, workspace
from .strings import lookup


@njit(cache=True, nogil=True)
def spm_tokenize(
    text: np.ndarray,
    data: np.ndarray,
    offsets: np.ndarray,
    gap: int,
    table: np.ndarray,
    scores: np.ndarray,
    byte_ids: np.ndarray,
    work: np.ndarray,
    hs: np.ndarray,
    out: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """Write the ids of ``text`` (uint8 [m], spaces already U+2581) to ``out`` (int32 [m]).

    The vocabulary is ``data``, ``offsets``, ``gap`` and ``table`` of a
    :class:`~lmap.string_array.StringArray`.  Returns how many, or ``-1 - b`` when byte ``b``
    needs a byte-fallback token the vocabulary lacks.  ``work`` (int64 [13 m]) and ``hs``
    (float64 [3 m]) as :mod:`lmap.kernels.merges` says.
    """
    m = text.shape[0]
    start, size, prv, nxt, hl, hr, hz = workspace(work, m)
    ns = split_symbols(text, 0, m, start, size, prv, nxt)

    nh = 0
    for i in range(1, ns):
        t = lookup(data, offsets, gap, table, text, start[i - 1], start[i] + size[i])
        if t >= 0:
            nh = push(hs, hl, hr, hz, nh, scores[t], i - 1, i, size[i - 1] + size[i])

    while nh > 0:
        nh, left = merge_top(hs, hl, hr, hz, nh, size, prv, nxt)
        if left < 0:
            continue
        before = prv[left]
        after = nxt[left]
        if before >= 0:
            t = lookup(data, offsets, gap, table, text, start[before], start[left] + size[left])
            if t >= 0:
                nh = push(hs, hl, hr, hz, nh, scores[t], before, left, size[before] + size[left])
        if after >= 0:
            t = lookup(data, offsets, gap, table, text, start[left], start[after] + size[after])
            if t >= 0:
                nh = push(hs, hl, hr, hz, nh, scores[t], left, after, size[left] + size[after])

    # Every merged symbol is a token (a pair is queued only if its text is one), so llama.cpp's
    # resegment reduces to: a token, or a single character spelled as byte tokens.
    k = 0
    i = 0
    while i != -1:
        s = start[i]
        e = s + size[i]
        t = lookup(data, offsets, gap, table, text, s, e)
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
    data: np.ndarray, offsets: np.ndarray, gap: int, table: np.ndarray, key: np.ndarray, out: np.ndarray
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
        t = lookup(data, offsets, gap, table, key, 0, 6)
        if t < 0:
            key[0] = b
            t = lookup(data, offsets, gap, table, key, 0, 1)
            key[0] = 60
        out[b] = t
