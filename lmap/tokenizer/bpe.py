"""Byte-level BPE (``tokenizer.ggml.model = "gpt2"``), with llama.cpp's results.

Two engines produce the same ids:

* :class:`PyBackend` is llama.cpp's ``llm_tokenizer_bpe_session`` in Python: regex
  split, byte-level encoding, merges lowest rank first (leftmost on ties).  It is
  built in ~10 ms (a dict from merge text to rank), so it tokenizes the texts of
  ordinary size: a prompt, a chat turn.  It also carries what ``tokenizers``
  cannot: a vocabulary whose merges name tokens that are not in it (``tokenizers``
  refuses to build), token texts that are not valid UTF-8, and input holding lone
  surrogates (which Rust strings cannot carry).
* :class:`HFBackend` hands the vocabulary, the merges and llama.cpp's pre-tokenizer
  regexes to Hugging Face ``tokenizers`` (Rust).  It matched llama.cpp's ids on every
  fixture string and on thousands of randomized strings (nine pre-tokenizer names),
  its merge loop is llama.cpp's and ``ignore_merges`` means the same.  Measured on
  SmolLM2 (49k tokens, 2 cores): 450-530k tokens/s on 100 kB of English or code,
  against 320-420k tokens/s for the Python engine with its word cache, but 53 ms to
  build (a tenth of the time to first token), so it is built when a long text first
  needs it (:data:`LONG_TEXT`).
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from ..errors import LmapError
from .pretokenize import BYTE_ENCODE_TABLE, BYTE_TO_UNICODE, PreTokenizer, onig_pattern, regex_module_pattern


def split_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    """Merges as pairs, as llama.cpp reads them: split at the first space after the first character."""
    pairs: list[tuple[str, str]] = []
    for m in merges:
        pos = m.find(" ", 1)
        pairs.append((m[:pos], m[pos + 1 :]) if pos >= 0 else ("", ""))
    return pairs


class HFBackend:
    """Encode with Hugging Face ``tokenizers`` configured as llama.cpp's BPE session."""

    def __init__(self, token_to_id: Mapping[str, int], pairs: Sequence[tuple[str, str]], pre: PreTokenizer) -> None:
        from tokenizers import Regex, models, pre_tokenizers
        from tokenizers import Tokenizer as _HFTokenizer

        # llama.cpp keeps the first rank of a repeated merge; tokenizers would keep the last.
        unique = list(dict.fromkeys(p for p in pairs if p[0] and p[1]))
        # Byte characters missing from the vocabulary (SmolLM2 lacks 21) stay symbols in
        # llama.cpp that merge with nothing and are dropped at the end; tokenizers would
        # drop them first and merge their neighbours.  Giving them ids past the vocabulary
        # keeps them in place; tokenize() filters those ids out.
        vocab = dict(token_to_id)
        self._limit = limit = max(vocab.values(), default=-1) + 1
        missing = [ch for ch in BYTE_TO_UNICODE if ch not in vocab]
        vocab.update((ch, limit + i) for i, ch in enumerate(missing))
        self._has_placeholders = bool(missing)
        model = models.BPE(vocab=vocab, merges=unique, ignore_merges=pre.ignore_merges)
        tok = _HFTokenizer(model)
        splits = [pre_tokenizers.Split(Regex(onig_pattern(p)), "isolated") for p in pre.regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)]
        )
        self._tok = tok

    def tokenize(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (no special-token handling) to ``out``."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self._has_placeholders and max(ids, default=-1) >= self._limit:
            ids = [i for i in ids if i < self._limit]
        out.extend(ids)


class PyBackend:
    """llama.cpp's BPE session in Python: regex split, byte-level encoding, ranked merges."""

    def __init__(self, token_to_id: Mapping[str, int], merges: Sequence[str], pre: PreTokenizer) -> None:
        try:
            import regex
        except ImportError as e:  # pragma: no cover - a dependency of lmap's
            raise LmapError(
                "this vocabulary needs lmap's pure-Python BPE, which needs the 'regex' package (pip install regex)"
            ) from e
        self._t2i = token_to_id
        # Ranked by the merge's own text: llama.cpp splits "a b" at its first space after the
        # first character, and the symbols of byte-level BPE never hold a raw space, so the pair
        # (a, b) is merge "a b" exactly. No split needed (14 ms for SmolLM2's 48k merges); the
        # first rank of a repeated merge wins, as in llama.cpp.
        self._ranks: dict[str, int] = dict(zip(reversed(merges), range(len(merges) - 1, -1, -1), strict=True))
        self._ignore_merges = pre.ignore_merges
        self._splitters = [regex.compile(regex_module_pattern(p), regex.V1) for p in pre.regexes]
        self._cache: dict[str, tuple[int, ...]] = {}

    def split(self, text: str) -> list[str]:
        """Pre-tokenize: each regex cuts every piece into matches and the gaps between them."""
        pieces = [text]
        for rx in self._splitters:
            cut: list[str] = []
            for piece in pieces:
                pos = 0
                for m in rx.finditer(piece):
                    s, e = m.span()
                    if s > pos:
                        cut.append(piece[pos:s])
                    if e > s:
                        cut.append(piece[s:e])
                    pos = e
                if pos < len(piece):
                    cut.append(piece[pos:])
            pieces = cut
        return pieces

    def tokenize(self, text: str, out: list[int]) -> None:
        """Append the ids of ``text`` (no special-token handling) to ``out``."""
        cache = self._cache
        for word in self.split(text):
            ids = cache.get(word)
            if ids is None:
                encoded = word.encode("utf-8", "surrogatepass").decode("latin-1").translate(BYTE_ENCODE_TABLE)
                ids = self._merge(encoded)
                if len(cache) < 65536:
                    cache[word] = ids
            out.extend(ids)

    def _merge(self, word: str) -> tuple[int, ...]:
        t2i = self._t2i
        if self._ignore_merges and word in t2i:
            return (t2i[word],)
        ranks = self._ranks
        syms = list(word)
        n = len(syms)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap: list[tuple[int, int, int, str]] = []
        for i in range(n - 1):
            r = ranks.get(syms[i] + " " + syms[i + 1])
            if r is not None:
                heap.append((r, i, i + 1, syms[i] + syms[i + 1]))
        heapq.heapify(heap)
        while heap:
            _, left, right, text = heapq.heappop(heap)
            a, b = syms[left], syms[right]
            if not a or not b or a + b != text:
                continue  # one side was merged since this pair was queued
            syms[left], syms[right] = text, ""
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prv[after] = left
            before = prv[left]
            if before >= 0:
                r = ranks.get(syms[before] + " " + text)
                if r is not None:
                    heapq.heappush(heap, (r, before, left, syms[before] + text))
            if after >= 0:
                r = ranks.get(text + " " + syms[after])
                if r is not None:
                    heapq.heappush(heap, (r, left, after, text + syms[after]))
        ids: list[int] = []
        for s in syms:
            if not s:
                continue
            tid = t2i.get(s)
            if tid is not None:
                ids.append(tid)
                continue
            # llama.cpp looks each byte of the symbol's UTF-8 up on its own and drops misses
            for byte in s.encode("utf-8"):
                tid = t2i.get(bytes((byte,)).decode("utf-8", "surrogateescape"))
                if tid is not None:
                    ids.append(tid)
        return tuple(ids)


LONG_TEXT = 1 << 16  # characters: a text this long is tokenized by HFBackend, built then


def check_engine(engine: str) -> None:
    if engine not in ("auto", "hf", "python"):
        raise ValueError(f"engine must be 'auto', 'hf' or 'python', not {engine!r}")
