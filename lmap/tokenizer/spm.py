"""SentencePiece-style tokenization (``tokenizer.ggml.model = "llama"``), as llama.cpp's ``llm_tokenizer_spm``.

The text (spaces already turned into U+2581) starts as one symbol per UTF-8
character.  Repeatedly, of all adjacent pairs whose concatenation is a vocabulary
token, the one whose token has the highest score is merged (leftmost on ties).
Symbols that end up outside the vocabulary are emitted as ``<0xXX>`` byte tokens.

Pure Python (``tokenizers`` has no score-driven merge model).  To make that
affordable the text is cut into words before a U+2581 wherever no vocabulary token
could span the cut (see :meth:`SPMSession.tokenize`), and words are cached.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from ..errors import LmapError

_LEN_UTF8 = bytes([1] * 12 + [2, 2, 3, 4])  # by the high nibble of the lead byte, as llama.cpp


def symbols_from_bytes(data: bytes) -> list[str]:
    """Cut bytes into symbols by their lead bytes, without validating (llama.cpp's ``unicode_len_utf8``).

    Symbols are returned as ``surrogateescape`` strings so that they compare equal
    to vocabulary entries with the same bytes.
    """
    out: list[str] = []
    i, n = 0, len(data)
    while i < n:
        j = min(n, i + _LEN_UTF8[data[i] >> 4])
        out.append(data[i:j].decode("utf-8", "surrogateescape"))
        i = j
    return out


class SPMSession:
    """Score-driven merges over a vocabulary given as text -> id and per-id scores."""

    def __init__(self, token_to_id: Mapping[str, int], scores: Sequence[float], n_vocab: int) -> None:
        self._t2i = token_to_id
        self._scores = scores
        self._n_vocab = n_vocab
        self._byte_ids: dict[int, int] = {}
        self._glue: frozenset[str] | None = None  # characters some token joins to a following U+2581
        self._cache: dict[str, tuple[int, ...]] = {}

    def byte_to_token(self, byte: int) -> int:
        """The id of the token for one raw byte: ``<0xXX>``, else the byte itself as text."""
        tid = self._byte_ids.get(byte)
        if tid is None:
            tid = self._t2i.get(f"<0x{byte:02X}>")
            if tid is None:
                tid = self._t2i.get(bytes((byte,)).decode("utf-8", "surrogateescape"))
            if tid is None:
                raise LmapError(f"vocabulary has no token for byte 0x{byte:02X} (needed for byte fallback)")
            self._byte_ids[byte] = tid
        return tid

    def tokenize(self, syms: list[str], out: list[int]) -> None:
        """Append the ids for the symbols ``syms`` (one per character) to ``out``.

        A merged symbol is always a vocabulary token, so no merge can cross a point
        between characters ``c`` and U+2581 when no token contains ``c`` + U+2581.
        Merges on either side of such a point never meet, and their relative order
        does not change the result, so the words between those points are
        tokenized separately -- the same ids, and repeated words come from a cache.
        """
        glue = self._glue
        if glue is None:
            glue = self._glue = _glue_chars(self._t2i)
        cache = self._cache
        start = 0
        n = len(syms)
        for i in range(1, n + 1):
            if i < n and not (syms[i] == "\u2581" and syms[i - 1][-1] not in glue):
                continue
            key = "".join(syms[start:i]) if i - start > 1 else syms[start]
            ids = cache.get(key)
            if ids is None:
                seg: list[int] = []
                self._tokenize_word(syms[start:i], seg)
                ids = tuple(seg)
                if len(cache) < 65536:
                    cache[key] = ids
            out.extend(ids)
            start = i

    def _tokenize_word(self, syms: list[str], out: list[int]) -> None:
        n = len(syms)
        if n == 0:
            return
        t2i, scores, n_vocab = self._t2i, self._scores, self._n_vocab
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[float, int, int, int]] = []
        # the last pair queued for each merged text; llama.cpp uses it to split unknown symbols
        rev_merge: dict[str, tuple[int, int]] = {}

        for i in range(n - 1):
            text = syms[i] + syms[i + 1]
            tid = t2i.get(text)
            if tid is not None and tid < n_vocab:
                heap.append((-scores[tid], i, i + 1, len(text)))
                rev_merge[text] = (i, i + 1)
        heapq.heapify(heap)

        while heap:
            _, left, right, size = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or len(a) + len(b) != size:
                continue  # a side changed since the pair was queued
            merged = a + b
            syms[left], syms[right] = merged, ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                text = syms[before] + merged
                tid = t2i.get(text)
                if tid is not None and tid < n_vocab:
                    heapq.heappush(heap, (-scores[tid], before, left, len(text)))
                    rev_merge[text] = (before, left)
            if after >= 0:
                text = merged + syms[after]
                tid = t2i.get(text)
                if tid is not None and tid < n_vocab:
                    heapq.heappush(heap, (-scores[tid], left, after, len(text)))
                    rev_merge[text] = (left, after)

        i = 0
        while i != -1:
            self._resegment(syms[i], syms, rev_merge, out, 0)
            i = nxt[i]

    def _resegment(
        self, text: str, syms: list[str], rev_merge: dict[str, tuple[int, int]], out: list[int], depth: int
    ) -> None:
        tid = self._t2i.get(text)
        if tid is not None:
            out.append(tid)
            return
        pair = rev_merge.get(text)
        if pair is None or depth > 64:
            for byte in text.encode("utf-8", "surrogateescape"):
                out.append(self.byte_to_token(byte))
            return
        # Only reachable for texts that were merged yet are not tokens, which the
        # merge rule excludes; kept for parity with llama.cpp.
        self._resegment(syms[pair[0]], syms, rev_merge, out, depth + 1)
        self._resegment(syms[pair[1]], syms, rev_merge, out, depth + 1)


def _glue_chars(token_to_id: Mapping[str, int]) -> frozenset[str]:
    # Characters that directly precede a U+2581 inside some token (U+2581 itself always
    # counts: tokens hold runs of it).  Cutting before a U+2581 is safe after any other.
    glue = {"\u2581"}
    for text in token_to_id:
        j = text.find("\u2581", 1)
        while j > 0:
            glue.add(text[j - 1])
            j = text.find("\u2581", j + 1)
    return frozenset(glue)
