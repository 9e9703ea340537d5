"""The special tokens matched literally in text (lmap.tokenizer.specials), kept as ids, not objects.

``SpecialMatcher.present`` finds the tokens that occur in a text with one compiled pass over
their texts sorted by bytes; here it is checked against the plain definition (each active token
tested with ``in``, in llama.cpp's order) on random vocabularies, over both layouts of a
:class:`~lmap.string_array.StringArray`; the end-to-end ids are llama.cpp's fixtures in
``test_tokenizer.py``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_string_array import gguf_form

from lmap.gguf import GGUFFile
from lmap.string_array import StringArray
from lmap.tokenizer import Tokenizer
from lmap.tokenizer.specials import LSTRIP, PARSE_ONLY, RSTRIP, SpecialMatcher, partition

_ALPHABET = "<>|a\n é\u2581\udcff"  # \udcff: a token byte that is not UTF-8


@given(
    specials=st.lists(
        st.tuples(st.text(alphabet=_ALPHABET, min_size=1, max_size=6), st.integers(0, 7)), min_size=1, max_size=30
    ),
    texts=st.lists(st.text(alphabet=_ALPHABET.replace("\udcff", ""), max_size=40), min_size=1, max_size=4),
    raw=st.binary(max_size=20),
)
@settings(max_examples=300, deadline=None)
def test_present_is_every_active_special_that_occurs(
    specials: list[tuple[str, int]], texts: list[str], raw: bytes
) -> None:
    vocab = ["x", "y"] + [t for t, _ in specials]
    ids = list(range(2, len(vocab)))
    ids.sort(key=lambda t: -len(vocab[t].encode("utf-8", "surrogateescape")))  # llama.cpp's order
    flags = [specials[t - 2][1] for t in ids]
    for tokens in (StringArray.from_strings(vocab), gguf_form(vocab)):
        m = SpecialMatcher(tokens, ids, flags)
        for parse_special in (False, True):
            active = m.active(parse_special)
            assert [sp.id for sp in active] == [
                t for t, f in zip(ids, flags, strict=True) if parse_special or not f & 1
            ]
            for sp in active:
                f = flags[ids.index(sp.id)]
                assert (sp.parse_only, sp.lstrip, sp.rstrip) == (
                    bool(f & PARSE_ONLY),
                    bool(f & LSTRIP),
                    bool(f & RSTRIP),
                )
                assert sp.text == vocab[sp.id] and sp.bytes_ == sp.text.encode("utf-8", "surrogateescape")
            for text in texts:
                want = [sp.id for sp in active if sp.text in text]
                assert [sp.id for sp in m.present(text, parse_special)] == want
                assert [sp.id for sp in m.present(text.encode(), parse_special)] == want
                assert partition(text, m.present(text, parse_special), parse_special) == partition(
                    text, active, parse_special
                )
            data = raw + b"".join(vocab[t].encode("utf-8", "surrogateescape") for t in ids[:3])
            assert [sp.id for sp in m.present(data, parse_special)] == [sp.id for sp in active if sp.bytes_ in data]
            text = "a\ud800<"  # a lone surrogate: matched as str
            assert [sp.id for sp in m.present(text, parse_special)] == [sp.id for sp in active if sp.text in text]


def test_a_vocabulary_keeps_its_specials_as_ids(gemma3_path: Path) -> None:
    tok = Tokenizer.from_metadata(GGUFFile(gemma3_path).metadata)
    m = tok._matcher
    assert m.ids.dtype == np.int32 and m.ids.shape[0] > 6000  # <unusedN>, <start_of_turn>, whitespace runs ...
    lengths = tok.tokens.lengths()[m.ids]
    assert np.all(np.diff(lengths) <= 0)  # longest first
    assert not m._objects  # no Special made at load
    turn = "<start_of_turn>user\nhi<end_of_turn>\n"
    assert tok.encode(turn, add_special=False, parse_special=True)[0] == 105
    assert sorted(sp.text for sp in m._objects.values()) == ["\n", "<end_of_turn>", "<start_of_turn>"]


@pytest.mark.parametrize("engine", ["auto", "hf"])
def test_no_specials_matcher_on_an_empty_list(engine: str) -> None:
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"], "tokenizer.ggml.merges": ["a b"]}
    if engine == "hf":
        pytest.importorskip("tokenizers")
    tok = Tokenizer.from_metadata(md, engine=engine)
    assert tok._matcher.ids.shape == (0,) and tok.encode("abab", parse_special=True) == [2, 2]
