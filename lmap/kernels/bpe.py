"""Byte-level BPE merges (llama.cpp's ``llm_tokenizer_bpe_session``), compiled over bytes.

Words arrive already split by the pre-tokenizer and byte-encoded (GPT-2's byte -> character
table), as UTF-8, joined in one buffer.  A symbol is a byte range of a word; the pair of two
adjacent symbols is looked up as the merge text ``left + " " + right`` (byte-level symbols never
hold a raw space) in the merges' hash table, ranked by the merge's first index.  The heap is the
SPM one (:mod:`lmap.kernels.spm`) keyed on ``-rank``: lowest rank first, leftmost on ties.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .spm import _LEN_UTF8, _pop, _push
from .strings import lookup, lookup_pair


@njit(cache=True, nogil=True)
def bpe_merge_words(
    words: np.ndarray,
    word_offsets: np.ndarray,
    vocab_data: np.ndarray,
    vocab_offsets: np.ndarray,
    vocab_table: np.ndarray,
    merge_data: np.ndarray,
    merge_offsets: np.ndarray,
    merge_table: np.ndarray,
    ignore_merges: bool,
    work: np.ndarray,
    hs: np.ndarray,
    out: np.ndarray,
    counts: np.ndarray,
) -> int:  # pragma: no cover - compiled
    """Write the ids of every word (``words[word_offsets[w] : word_offsets[w + 1]]``) to ``out``
    (int32, one per byte at most) and their number to ``counts[w]``; return the total.

    ``work`` is int64 [13 m] and ``hs`` float64 [3 m] for m the longest word's bytes (see
    :func:`lmap.kernels.spm.spm_tokenize`).  A symbol that is not a token is spelled as the
    tokens of its single bytes, skipping bytes that have none, as llama.cpp does.
    """
    m = hs.shape[0] // 3
    start = work[0:m]
    size = work[m : 2 * m]
    prv = work[2 * m : 3 * m]
    nxt = work[3 * m : 4 * m]
    hl = work[4 * m : 7 * m]
    hr = work[7 * m : 10 * m]
    hz = work[10 * m : 13 * m]
    k = 0
    for w in range(word_offsets.shape[0] - 1):
        ws = word_offsets[w]
        we = word_offsets[w + 1]
        k0 = k
        if ignore_merges:
            t = lookup(vocab_data, vocab_offsets, vocab_table, words, ws, we)
            if t >= 0:
                out[k] = t
                k += 1
                counts[w] = 1
                continue

        ns = 0
        o = ws
        while o < we:
            ln = min(_LEN_UTF8[words[o] >> 4], we - o)
            start[ns] = o
            size[ns] = ln
            prv[ns] = ns - 1
            o += ln
            nxt[ns] = -1 if o == we else ns + 1
            ns += 1

        nh = 0
        for i in range(1, ns):
            r = lookup_pair(
                merge_data, merge_offsets, merge_table, words, start[i - 1], start[i], start[i], start[i] + size[i]
            )
            if r >= 0:
                nh = _push(hs, hl, hr, hz, nh, -np.float64(r), i - 1, i, size[i - 1] + size[i])

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
            ls = start[left]
            le = ls + size[left]
            if before >= 0:
                bs = start[before]
                r = lookup_pair(merge_data, merge_offsets, merge_table, words, bs, bs + size[before], ls, le)
                if r >= 0:
                    nh = _push(hs, hl, hr, hz, nh, -np.float64(r), before, left, size[before] + size[left])
            if after >= 0:
                as_ = start[after]
                r = lookup_pair(merge_data, merge_offsets, merge_table, words, ls, le, as_, as_ + size[after])
                if r >= 0:
                    nh = _push(hs, hl, hr, hz, nh, -np.float64(r), left, after, size[left] + size[after])

        i = 0 if ns else -1
        while i != -1:
            s = start[i]
            e = s + size[i]
            t = lookup(vocab_data, vocab_offsets, vocab_table, words, s, e)
            if t >= 0:
                out[k] = t
                k += 1
            else:
                for j in range(s, e):
                    t = lookup(vocab_data, vocab_offsets, vocab_table, words, j, j + 1)
                    if t >= 0:
                        out[k] = t
                        k += 1
            i = nxt[i]
        counts[w] = k - k0
    return k
