"""Byte-level BPE (``tokenizer.ggml.model = "gpt2"``), with llama.cpp's results.

Two engines produce the same ids:

* :class:`PyBackend` (``engine="python"``, the default) is llama.cpp's
  ``llm_tokenizer_bpe_session``: regex split and byte-level encoding in Python, merges
  lowest rank first (leftmost on ties) compiled (``lmap.kernels.bpe``).  Built in ~1 ms
  over the packed vocabulary and merges.  Measured on SmolLM2 (2 cores, a fresh engine):
  520-720k tokens/s on 100-170 kB of English or code.  It also carries what
  ``tokenizers`` cannot: a vocabulary whose merges name tokens that are not in it
  (``tokenizers`` refuses to build), token texts that are not valid UTF-8, and input
  holding lone surrogates (which Rust strings cannot carry).
* :class:`HFBackend` (``engine="hf"``) hands the vocabulary, the merges and llama.cpp's
  pre-tokenizer regexes to Hugging Face ``tokenizers`` (Rust).  It matched llama.cpp's
  ids on every fixture string and on thousands of randomized strings (nine
  pre-tokenizer names); its merge loop is llama.cpp's and ``ignore_merges`` means the
  same.  430-500k tokens/s on the same texts, 53 ms and ~22 MiB to build: kept as an
  independent check of the default engine, and for users who want it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import LmapError
from ..string_array import StringArray
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
    """llama.cpp's BPE session: regex split and byte-level encoding in Python, merges compiled.

    Vocabulary and merges stay packed (:class:`~lmap.string_array.StringArray` with hash
    tables), so building this engine makes no Python object per token or merge (SmolLM2: ~1 ms
    and ~2 MiB, where a text -> rank dict took 14 ms and ~9 MiB).
    """

    def __init__(self, tokens: StringArray, merges: StringArray, pre: PreTokenizer) -> None:
        try:
            import regex
        except ImportError as e:  # pragma: no cover - a dependency of lmap's
            raise LmapError(
                "this vocabulary needs lmap's own BPE engine, which needs the 'regex' package (pip install regex)"
            ) from e
        self._tokens = tokens
        self._merges = merges
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
        words = self.split(text)
        cache = self._cache
        new = [w for w in dict.fromkeys(words) if w not in cache]
        fresh = self._merge_words(new) if new else {}
        if len(cache) + len(fresh) <= 65536:
            cache.update(fresh)
        for word in words:
            ids = cache.get(word)
            out.extend(fresh[word] if ids is None else ids)

    def _merge_words(self, words: list[str]) -> dict[str, tuple[int, ...]]:
        """Merge all ``words`` in one compiled call."""
        from ..kernels.bpe import bpe_merge_words

        encoded = [
            w.encode("utf-8", "surrogatepass").decode("latin-1").translate(BYTE_ENCODE_TABLE).encode() for w in words
        ]
        lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        m = max(int(lengths.max()), 1)
        t, g = self._tokens, self._merges
        ids = np.empty(int(offsets[-1]), dtype=np.int32)
        counts = np.empty(len(words), dtype=np.int32)
        bpe_merge_words(
            np.frombuffer(b"".join(encoded), dtype=np.uint8),
            offsets,
            t.data,
            t.offsets,
            t.gap,
            t.table,
            g.data,
            g.offsets,
            g.gap,
            g.first_table,
            self._ignore_merges,
            np.empty(13 * m, dtype=np.int64),
            np.empty(3 * m, dtype=np.float64),
            ids,
            counts,
        )
        flat = ids.tolist()
        out: dict[str, tuple[int, ...]] = {}
        k = 0
        for word, c in zip(words, counts.tolist(), strict=True):
            out[word] = tuple(flat[k : k + c])
            k += c
        return out


def check_engine(engine: str) -> None:
    if engine not in ("auto", "hf", "python"):
        raise ValueError(f"engine must be 'auto', 'hf' or 'python', not {engine!r}")
