"""StringArray (a long GGUF string array kept as bytes) and the compiled SPM merges over it.

Every test runs on both layouts: strings packed with a NUL between them (``from_strings``, gap 1)
and the GGUF layout itself, a u64 length before each string (gap 8), as ``GGUFFile`` leaves a
vocabulary in its map.

The SPM merges are checked end to end against llama.cpp's own ids in ``test_tokenizer.py``
(gemma3's fixtures); here a direct transcription of ``llm_tokenizer_spm_session`` checks the
compiled heap on random vocabularies, ties, byte fallback and text that is not UTF-8.
"""

from __future__ import annotations

import heapq
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmap.errors import LmapError
from lmap.string_array import StringArray
from lmap.tokenizer import spm as spm_module
from lmap.tokenizer.spm import SPMSession, _glue_chars

_ALPHABET = "ab\u2581\u00e9\0\udcff"  # \udcff: the byte 0xFF, not UTF-8 (surrogateescape)
_TEXTS = st.lists(
    st.one_of(st.text(alphabet=_ALPHABET, max_size=5), st.text(alphabet=_ALPHABET, min_size=6, max_size=30)),
    min_size=1,
    max_size=40,
)


def gguf_form(strings: list[str], pad: int = 3) -> StringArray:
    """``strings`` as a GGUF array leaves them (u64 length, bytes), indexed in place as GGUFFile does."""
    from lmap.kernels.strings import string_offsets

    raw = [s.encode("utf-8", "surrogateescape") for s in strings]
    records = b"".join(struct.pack("<Q", len(r)) + r for r in raw)
    buf = np.frombuffer(b"\xee" * pad + records + b"\xee" * pad, dtype=np.uint8)  # read-only, as a map
    offsets = np.empty(len(raw) + 1, dtype=np.int32)
    end = string_offsets(buf, pad, len(raw), offsets, 2**31 - 1)
    assert end == pad + len(records)
    return StringArray(buf[pad + 8 : end], offsets, gap=8)


def _forms(strings: list[str]) -> list[StringArray]:
    return [StringArray.from_strings(strings), gguf_form(strings)]


@given(strings=_TEXTS, probes=st.lists(st.text(alphabet=_ALPHABET, max_size=5), max_size=10))
@settings(max_examples=200, deadline=None)
def test_find_is_a_dict_lookup(strings: list[str], probes: list[str]) -> None:
    packed, in_place = arrays = _forms(strings)
    want = dict(zip(strings, range(len(strings)), strict=True))  # the last index of a repeated text
    for a in arrays:
        for text in strings + probes:
            assert a.find(text) == want.get(text, -1)
            assert (text in a) == (text in want)
        assert a == strings and list(a) == strings and a.tolist() == strings
        assert [a[i] for i in range(-len(strings), 0)] == strings
        assert a[1:3] == strings[1:3]
        assert [a.raw(i) for i in range(len(a))] == [s.encode("utf-8", "surrogateescape") for s in strings]
        assert a.lengths().tolist() == [len(s.encode("utf-8", "surrogateescape")) for s in strings]
    # the two layouts: equal as sequences and as arrays, the same hash tables (they hash the texts)
    assert packed == in_place and in_place == packed and packed.gap == 1 and in_place.gap == 8
    assert np.array_equal(packed.table, in_place.table) and np.array_equal(packed.first_table, in_place.first_table)
    if len(strings) > 1:
        assert in_place != gguf_form(strings[:-1]) and in_place != StringArray.from_strings(strings[::-1] + ["x"])


@pytest.mark.parametrize("gap", [1, 8])
def test_items_round_trip_bytes_that_are_not_utf8(gap: int) -> None:
    strings = ["\udcff\udcfe", "x\0y", ""]
    a = StringArray.from_strings(strings) if gap == 1 else gguf_form(strings)
    assert a.raw(0) == b"\xff\xfe" and a.raw(1) == b"x\0y" and a[2] == ""
    assert a.tolist() == ["\udcff\udcfe", "x\0y", ""]  # a NUL inside: item by item
    with pytest.raises(IndexError, match="string index 3 out of range for 3 strings"):
        a[3]
    assert a != ["\udcff\udcfe", "x\0y"] and a == StringArray.from_strings(a)
    assert "3 strings" in repr(a) and a.nbytes > 0


def _reference_spm(vocab: list[bytes], scores: list[float], text: bytes) -> list[int]:
    """llama.cpp's llm_tokenizer_spm_session::tokenize, transcribed over bytes."""
    t2i = dict(zip(vocab, range(len(vocab)), strict=True))
    syms: list[bytes] = []
    i = 0
    while i < len(text):
        ln = (1,) * 12 + (2, 2, 3, 4)
        j = min(len(text), i + ln[text[i] >> 4])
        syms.append(text[i:j])
        i = j
    n = len(syms)
    nxt = [*range(1, n), -1]
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, int, int]] = []

    def add(left: int, right: int) -> None:
        if left < 0 or right < 0:
            return
        t = t2i.get(syms[left] + syms[right])
        if t is not None:
            heapq.heappush(heap, (-scores[t], left, right, len(syms[left]) + len(syms[right])))

    for k in range(1, n):
        add(k - 1, k)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not syms[left] or not syms[right] or len(syms[left]) + len(syms[right]) != size:
            continue
        syms[left], syms[right] = syms[left] + syms[right], b""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        add(prv[left], left)
        add(left, nxt[left])
    out: list[int] = []
    k = 0 if n else -1
    while k != -1:
        t = t2i.get(syms[k])
        if t is not None:
            out.append(t)
        else:
            for b in syms[k]:
                byte = t2i.get(f"<0x{b:02X}>".encode(), t2i.get(bytes((b,))))
                if byte is None:
                    raise LmapError(f"no token for byte 0x{b:02X}")
                out.append(byte)
        k = nxt[k]
    return out


_PIECES = ("a", "b", "\u2581", "\u00e9", "\u2581a", "ab", "ba", "\u2581\u2581", "a\u2581", "\u00e9b", "abab")


@given(
    pieces=st.lists(st.sampled_from(_PIECES), min_size=1, max_size=12),
    score_seed=st.integers(0, 2**32 - 1),
    text=st.lists(
        st.sampled_from([b"a", b"b", b"ab", "\u2581".encode(), "\u00e9".encode(), b"\xff", b"\xe2"]),
        max_size=40,
    ),
)
@settings(max_examples=300, deadline=None)
def test_compiled_merges_follow_llama_cpp(pieces: list[str], score_seed: int, text: list[bytes]) -> None:
    # byte tokens for every byte, single characters, then the sampled pieces (repeats included)
    vocab = [f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "\u2581", "\u00e9"] + pieces
    rng = np.random.default_rng(score_seed)
    scores = rng.integers(0, 2, len(vocab)).astype(np.float32)  # two values: many ties
    data = b"".join(text)
    want = _reference_spm([v.encode() for v in vocab], scores.tolist(), data)
    for texts in _forms(vocab):
        got: list[int] = []
        SPMSession(texts, scores).tokenize(data, got)
        assert got == want


@pytest.mark.parametrize("gap", [1, 8])
def test_missing_byte_token_is_named(gap: int) -> None:
    vocab = ["a", "<0x62>"]
    session = SPMSession(StringArray.from_strings(vocab) if gap == 1 else gguf_form(vocab), np.zeros(2, np.float32))
    out: list[int] = []
    session.tokenize(b"ab", out)
    assert out == [0, 1]
    with pytest.raises(LmapError, match="no token for byte 0x63"):
        session.tokenize(b"c", out)


def test_long_text_is_cut_where_no_merge_crosses(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = [f"<0x{b:02X}>" for b in range(256)] + ["a", "b", "\u2581", "\u2581a", "b\u2581", "ab\u2581a", "ba"]
    scores = np.arange(len(vocab), dtype=np.float32)
    rng = np.random.default_rng(7)
    text = b"".join(rng.choice([b"a", b"b", "\u2581".encode(), b"ba"], 3000).tolist())
    whole: list[int] = []
    SPMSession(StringArray.from_strings(vocab), scores).tokenize(text, whole)
    monkeypatch.setattr(spm_module, "CHUNK", 64)
    for texts in _forms(vocab):
        session = SPMSession(texts, scores)
        assert len(session._chunks(text)) > 10  # really cut
        cut: list[int] = []
        session.tokenize(text, cut)
        assert cut == whole == _reference_spm([v.encode() for v in vocab], scores.tolist(), text)


@given(strings=_TEXTS)
@settings(max_examples=100, deadline=None)
def test_glue_characters_are_read_within_tokens(strings: list[str]) -> None:
    # the characters some token holds right before a U+2581 (never across two tokens)
    want = {b"\xe2\x96\x81"}
    for s in strings:
        raw = s.encode("utf-8", "surrogateescape")
        j = raw.find(b"\xe2\x96\x81", 1)
        while j > 0:
            c = j - 1
            while c > 0 and raw[c] & 0xC0 == 0x80:
                c -= 1
            want.add(raw[c:j])
            j = raw.find(b"\xe2\x96\x81", j + 1)
    assert [_glue_chars(a) for a in _forms(strings)] == [want, want]


def _bpe(tokens: list[str], merges: list[str]) -> list[int]:
    from lmap.tokenizer import Tokenizer

    got = []
    for t, m in ((tokens, merges), (gguf_form(tokens), gguf_form(merges))):
        md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": t, "tokenizer.ggml.merges": m}
        got.append(Tokenizer.from_metadata(md, engine="python").encode("abcz", add_special=False))
    assert got[0] == got[1]  # lists (packed with NULs) and the GGUF layout
    return got[0]


def test_bpe_merges_rank_a_repeated_merge_first_and_spell_unknown_symbols_by_bytes() -> None:
    tokens = ["a", "b", "c", "ab", "bc", "z"]
    # "b c" first: abc -> a + bc; were the repeat's rank (2) used, "a b" (1) would win: ab + c
    assert _bpe(tokens, ["b c", "a b", "b c"]) == [0, 4, 5]
    assert _bpe(tokens, ["a b", "b c"]) == [3, 2, 5]
    # a merge whose result is not a token: its symbol is spelled by its bytes' tokens
    assert _bpe(["a", "b", "c", "z"], ["a b"]) == [0, 1, 2, 3]


@given(
    merges=st.lists(st.tuples(st.sampled_from("abc"), st.sampled_from(["a", "b", "c", "ab", "bc", "ca"])), max_size=12),
    text=st.text(alphabet="abc", max_size=30),
)
@settings(max_examples=100, deadline=None)
def test_bpe_merges_are_the_same_over_both_layouts(merges: list[tuple[str, str]], text: str) -> None:
    from lmap.tokenizer import Tokenizer

    tokens = ["a", "b", "c", "ab", "bc", "ca", *dict.fromkeys(x + y for x, y in merges)]
    ms = [f"{x} {y}" for x, y in merges]
    got = []
    for t, m in ((tokens, ms), (gguf_form(tokens), gguf_form(ms, pad=0))):
        md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": t, "tokenizer.ggml.merges": m}
        got.append(Tokenizer.from_metadata(md, engine="python").encode(text, add_special=False))
    assert got[0] == got[1]
