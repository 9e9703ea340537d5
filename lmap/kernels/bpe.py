"""Byte-level BPE merges (llama.cpp's ``llm_tokenizer_bpe_session``), compiled over bytes.

Words arrive already split by the pre-tokenizer and byte-encoded (GPT-2's byte -> character
table), as UTF-8, joined in one buffer.  A symbol is a byte range of a word; the pair of two
adjacent symbols is looked up as the merge text ``left + " " + right`` (byte-level symbols never
hold a raw space) in the merges' hash table, ranked by the merge's first index.  Symbols and the
queue are :mod:`lmap.kernels.merges`, keyed on ``-rank``: lowest rank first, leftmost on ties.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .merges import merge_top, push, split_symbols, workspace
from .strings import lookup, lookup_pair


@njit(cache=True, nogil=True)
def bpe_merge_words(
    words: np.ndarray,
    word_offsets: np.ndarray,
    vocab_data: np.ndarray,
    vocab_offsets: np.ndarray,
    vocab_gap: int,
    vocab_table: np.ndarray,
    merge_data: np.ndarray,
    merge_offsets: np.ndarray,
    merge_gap: int,
    merge_table: np.ndarray,
    ignore_merges: bool,
    work: np.ndarray,
    hs: np.ndarray,
    out: np.ndarray,
    counts: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """Write the ids of every word (``words[word_offsets[w] : word_offsets[w + 1]]``) to ``out``
    (int32, one per byte at most) and their number to ``counts[w]``; return the total.

    Vocabulary and merges are each ``data``, ``offsets``, ``gap`` and a hash table of a
    :class:`~lmap.string_array.StringArray`.  ``work`` is int64 [13 m] and ``hs`` float64 [3 m]
    for m the longest word's bytes (see :mod:`lmap.kernels.merges`).  A symbol that is not a token
    is spelled as the tokens of its single bytes, skipping bytes that have none, as llama.cpp does.
    """
    start, size, prv, nxt, hl, hr, hz = workspace(work, hs.shape[0] // 3)
    k = 0
    for w in range(word_offsets.shape[0] - 1):
        ws = word_offsets[w]
        we = word_offsets[w + 1]
        k0 = k
        if ignore_merges:
            t = lookup(vocab_data, vocab_offsets, vocab_gap, vocab_table, words, ws, we)
            if t >= 0:
                out[k] = t
                k += 1
                counts[w] = 1
                continue

        ns = split_symbols(words, ws, we, start, size, prv, nxt)
        nh = 0
        for i in range(1, ns):
            r = lookup_pair(
                merge_data,
                merge_offsets,
                merge_gap,
                merge_table,
                words,
                start[i - 1],
                start[i],
                start[i],
                start[i] + size[i],
            )
            if r >= 0:
                nh = push(hs, hl, hr, hz, nh, -np.float64(r), i - 1, i, size[i - 1] + size[i])

        while nh > 0:
            nh, left = merge_top(hs, hl, hr, hz, nh, size, prv, nxt)
            if left < 0:
                continue
            before = prv[left]
            after = nxt[left]
            ls = start[left]
            le = ls + size[left]
            if before >= 0:
                bs = start[before]
                r = lookup_pair(merge_data, merge_offsets, merge_gap, merge_table, words, bs, bs + size[before], ls, le)
                if r >= 0:
                    nh = push(hs, hl, hr, hz, nh, -np.float64(r), before, left, size[before] + size[left])
            if after >= 0:
                as_ = start[after]
                r = lookup_pair(
                    merge_data, merge_offsets, merge_gap, merge_table, words, ls, le, as_, as_ + size[after]
                )
                if r >= 0:
                    nh = push(hs, hl, hr, hz, nh, -np.float64(r), left, after, size[left] + size[after])

        i = 0 if ns else -1
        while i != -1:
            s = start[i]
            e = s + size[i]
            t = lookup(vocab_data, vocab_offsets, vocab_gap, vocab_table, words, s, e)
            if t >= 0:
                out[k] = t
                k += 1
            else:
                for j in range(s, e):
                    t = lookup(vocab_data, vocab_offsets, vocab_gap, vocab_table, words, j, j + 1)
                    if t >= 0:
                        out[k] = t
                        k += 1
            i = nxt[i]
        counts[w] = k - k0
    return k
