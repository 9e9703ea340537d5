"""lmap.tokenizer against llama.cpp: reference fixtures, streaming decode, round trips, Hugging Face.

The reference ids come from ``tests/fixtures/tokenizer_*.json`` (llama.cpp's own
``llama_tokenize`` / ``llama_token_to_piece`` / ``llama_detokenize``, see the
files' ``generator`` block).  Model files come from the ``smollm2_path`` and
``gemma3_path`` fixtures in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmap.errors import InvalidParameterError, UnsupportedModelError
from lmap.gguf import GGUFFile
from lmap.tokenizer import Tokenizer, TokenType
from lmap.tokenizer.pretokenize import BYTE_TO_UNICODE

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = ("smollm2", "gemma3")


def _fixture(model: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"tokenizer_{model}.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smollm2_md(smollm2_path: Path) -> dict[str, Any]:
    return GGUFFile(smollm2_path).metadata


@pytest.fixture(scope="module")
def gemma3_md(gemma3_path: Path) -> dict[str, Any]:
    return GGUFFile(gemma3_path).metadata


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_md: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(smollm2_md)


@pytest.fixture(scope="module")
def gemma3_tok(gemma3_md: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(gemma3_md)


@pytest.fixture(scope="module")
def smollm2_py(smollm2_md: dict[str, Any]) -> Tokenizer:
    pytest.importorskip("regex")  # the pure-Python engine's only extra dependency
    return Tokenizer.from_metadata(smollm2_md, engine="python")


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_md: dict[str, Any]) -> Tokenizer:
    return Tokenizer.from_metadata(smollm2_md, engine="hf")


@pytest.fixture
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tok")


# --- llama.cpp fixtures -------------------------------------------------------------


def _check_against_fixture(tok: Tokenizer, model: str) -> None:
    data = _fixture(model)
    failures: list[str] = []
    n = 0
    for case in data["cases"]:
        text = case["text"]
        for mode in ("plain", "special"):
            ref = case[mode]
            n += 1
            ids = tok.encode(text, add_special=case["add_special"], parse_special=ref["parse_special"])
            if ids != ref["ids"]:
                failures.append(f"{text!r} parse_special={ref['parse_special']}: ids {ids} != {ref['ids']}")
                continue
            pieces = [tok.token_to_piece(i, special=True) for i in ids]
            if [p.hex() for p in pieces] != ref["pieces_hex"]:
                failures.append(f"{text!r}: pieces differ")
            if b"".join(pieces).decode("utf-8", "replace") != ref["detok"]:
                failures.append(f"{text!r}: concatenated pieces differ")
            if tok.decode(ids, special=True).hex() != ref["llama_detokenize_hex"]:
                failures.append(f"{text!r}: llama_detokenize differs")
    assert not failures, f"{len(failures)} of {n} fixture checks failed:\n" + "\n".join(failures[:20])


@pytest.mark.parametrize("tok", MODELS, indirect=True)
def test_fixture_ids_pieces_and_detokenize(tok: Tokenizer, request: pytest.FixtureRequest) -> None:
    _check_against_fixture(tok, request.node.callspec.params["tok"])


def test_fixture_with_pure_python_bpe(smollm2_py: Tokenizer) -> None:
    assert "PyBackend" in repr(smollm2_py)
    _check_against_fixture(smollm2_py, "smollm2")


def test_fixture_with_hugging_face_bpe(smollm2_hf: Tokenizer) -> None:
    assert repr(smollm2_hf).endswith("engine=HFBackend)")
    _check_against_fixture(smollm2_hf, "smollm2")


def test_long_text_agrees_with_hugging_face(smollm2_md: dict[str, Any], smollm2_hf: Tokenizer) -> None:
    # lmap's engine serves every text (it is faster than tokenizers' once compiled); Hugging Face's
    # is an independent check
    auto = Tokenizer.from_metadata(smollm2_md)
    long = (FIXTURES / "pydoc_topics_100k.txt").read_text(encoding="utf-8")
    assert auto.encode(long) == smollm2_hf.encode(long)
    assert auto._hf is None and repr(auto).endswith("engine=PyBackend)")


@pytest.mark.parametrize("tok", MODELS, indirect=True)
def test_decode_round_trips_where_llama_cpp_does(tok: Tokenizer, request: pytest.FixtureRequest) -> None:
    model = request.node.callspec.params["tok"]
    data = _fixture(model)
    bos_text = tok.tokens[tok.bos_id] if data["model"]["add_bos"] and tok.bos_id is not None else ""
    checked = 0
    for case in data["cases"]:
        ref = case["plain"]
        if ref["detok"] != bos_text + case["text"]:
            continue  # llama.cpp itself does not give the text back
        checked += 1
        assert tok.decode(ref["ids"]) == case["text"].encode("utf-8"), case["text"]
        assert tok.decode(ref["ids"], remove_special=True) == case["text"].encode("utf-8"), case["text"]
    assert checked >= len(data["cases"]) - 2


@pytest.mark.parametrize("tok", MODELS, indirect=True)
def test_special_ids_match_llama_cpp(tok: Tokenizer, request: pytest.FixtureRequest) -> None:
    ref = _fixture(request.node.callspec.params["tok"])["model"]
    assert tok.n_vocab == ref["n_vocab"]
    assert (tok.bos_id, tok.eos_id) == (ref["bos_id"], ref["eos_id"])
    assert (tok.add_bos, tok.add_eos) == (ref["add_bos"], ref["add_eos"])
    # llama.cpp keeps the first EOT candidate it meets in a hash map; SmolLM2 has two
    # (<|endoftext|> and <|im_end|>) and lmap picks by llama.cpp's candidate order.
    assert ref["eot_id"] in tok.eog_ids and tok.eot_id in tok.eog_ids


def test_end_of_generation_sets(smollm2_tok: Tokenizer, gemma3_tok: Tokenizer) -> None:
    # llama_vocab_is_eog over the whole vocabulary, same llama.cpp build as the fixtures
    assert smollm2_tok.eog_ids == {0, 2, 4}  # <|endoftext|>, <|im_end|>, <reponame> (FIM repo)
    assert gemma3_tok.eog_ids == {1, 106, 212}  # <eos>, <end_of_turn>, </s>
    assert smollm2_tok.eot_id == 2 and smollm2_tok.tokens[2] == "<|im_end|>"
    assert gemma3_tok.eot_id == 106 and gemma3_tok.tokens[106] == "<end_of_turn>"
    assert gemma3_tok.is_eog(1) and not gemma3_tok.is_eog(2)


def test_token_types_and_control_rendering(smollm2_tok: Tokenizer, gemma3_tok: Tokenizer) -> None:
    assert smollm2_tok.token_type(1) is TokenType.CONTROL and smollm2_tok.is_control(1)
    assert smollm2_tok.token_to_piece(1) == b""
    assert smollm2_tok.token_to_piece(1, special=True) == b"<|im_start|>"
    assert gemma3_tok.token_type(107) is TokenType.USER_DEFINED and not gemma3_tok.is_control(107)
    assert gemma3_tok.token_to_piece(107) == b"\n"  # user-defined tokens always render
    assert gemma3_tok.token_type(236743) is TokenType.NORMAL
    assert gemma3_tok.token_to_piece(gemma3_tok.tokens.index("<0xF0>")) == b"\xf0"
    assert len(smollm2_tok.tokens) == smollm2_tok.n_vocab == 49152
    with pytest.raises(InvalidParameterError):
        smollm2_tok.token_to_piece(49152)


def test_parse_special(smollm2_tok: Tokenizer, gemma3_tok: Tokenizer) -> None:
    chat = "<|im_start|>user\nhi<|im_end|>"
    assert smollm2_tok.encode(chat, parse_special=True) == [1, 4093, 198, 6004, 2]
    assert 1 not in smollm2_tok.encode(chat)  # as text, the markers become ordinary tokens
    turn = "<start_of_turn>user\nhi<end_of_turn>"
    assert gemma3_tok.encode(turn, parse_special=True)[:2] == [2, 105]
    assert 105 not in gemma3_tok.encode(turn)
    assert gemma3_tok.encode(turn, add_special=False, parse_special=True)[0] == 105


# llama_tokenize(add_special=False, parse_special=True) on bytes that are not UTF-8,
# from the llama.cpp build that made the fixtures (called through ctypes).
_INVALID_UTF8 = [
    (b"ab\xffcd", [369, 24211, 13133], [596, 493, 337, 338]),
    (b"\xe6\x97", [24211, 24211], [468, 389]),
    (b"caf\xc3", [83, 1939, 24211], [123125, 433]),
    (b"\xc0\xbc|im_end|>", [44, 108, 306, 79, 486, 108, 46], [430, 426, 236909, 548, 236779, 643, 111038]),
    (b"x\xed\xa0\x80y", [104, 184, 250, 218, 105], [236781, 475, 398, 366, 236762]),
    (b"<|im_end|>\xff", [2, 24211], [236820, 236909, 548, 236779, 643, 111038, 493]),
]


@pytest.mark.parametrize(("data", "smollm2_ids", "gemma3_ids"), _INVALID_UTF8)
def test_invalid_utf8_like_llama_cpp(
    smollm2_tok: Tokenizer, gemma3_tok: Tokenizer, data: bytes, smollm2_ids: list[int], gemma3_ids: list[int]
) -> None:
    assert smollm2_tok.encode(data, add_special=False, parse_special=True) == smollm2_ids
    assert gemma3_tok.encode(data, add_special=False, parse_special=True) == gemma3_ids


def test_bytes_and_str_agree(smollm2_tok: Tokenizer, gemma3_tok: Tokenizer) -> None:
    text = "Grüße, 世界 🦙 <|im_end|>"
    for tok in (smollm2_tok, gemma3_tok):
        for ps in (False, True):
            assert tok.encode(text.encode(), parse_special=ps) == tok.encode(text, parse_special=ps)


def test_bytes_missing_from_vocabulary_are_dropped(smollm2_tok: Tokenizer, smollm2_py: Tokenizer) -> None:
    # SmolLM2 has no token for byte 0x04: llama.cpp keeps it as a symbol that merges with
    # nothing and drops it at the end, so "!" and "!" must not merge across it.
    assert smollm2_tok.encode("!\x04!") == smollm2_py.encode("!\x04!") == [17, 17]
    assert smollm2_tok.encode("!!") != [17, 17]


# --- streaming decode -----------------------------------------------------------------

_STREAM_TEXTS = [
    "I love 🦙 and 🤗!",
    "龘 ꙮ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "👨\u200d👩\u200d👧\u200d👦 family 🇫🇷",
    "naïve café 你好，世界！",
    "𒀀🫠",
]


@pytest.mark.parametrize("tok", MODELS, indirect=True)
@pytest.mark.parametrize("text", _STREAM_TEXTS)
def test_incremental_decoder_never_splits_a_character(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    dec = tok.incremental_decoder()
    outputs = [dec.feed(i) for i in ids]
    outputs.append(dec.flush())
    full = tok.decode(ids).decode("utf-8", "replace")
    assert full == text
    assert "".join(outputs) == full
    assert not any("\ufffd" in o for o in outputs)


@pytest.mark.parametrize("tok", MODELS, indirect=True)
def test_stream_texts_really_split_characters(tok: Tokenizer) -> None:
    # otherwise the test above would prove nothing
    pieces = [tok.token_to_piece(i) for t in _STREAM_TEXTS for i in tok.encode(t)]
    assert sum(1 for p in pieces if _incomplete_utf8(p)) >= 3


def _incomplete_utf8(piece: bytes) -> bool:
    try:
        piece.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_incremental_decoder_flush_and_special(smollm2_tok: Tokenizer) -> None:
    first_byte_of_llama = smollm2_tok.encode("🦙")[0]
    dec = smollm2_tok.incremental_decoder()
    assert dec.feed(first_byte_of_llama) == ""
    assert dec.flush() == "\ufffd"
    dec = smollm2_tok.incremental_decoder(special=True)
    assert dec.feed(2) == "<|im_end|>"


# --- properties -----------------------------------------------------------------------

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=60)


def _representable(tok: Tokenizer) -> set[int]:
    vocab = set(tok.tokens)
    return {b for b, ch in enumerate(BYTE_TO_UNICODE) if ch in vocab}


@settings(max_examples=150, deadline=None)
@given(text=_TEXT)
def test_round_trip_smollm2(smollm2_tok: Tokenizer, text: str) -> None:
    # bytes the vocabulary has no token for (control characters such as U+0004) are
    # dropped by llama.cpp, so text holding them cannot come back
    ok = _representable(smollm2_tok)
    text = "".join(c for c in text if all(b in ok for b in c.encode()))
    assert smollm2_tok.decode(smollm2_tok.encode(text)) == text.encode()


@settings(max_examples=150, deadline=None)
@given(text=_TEXT)
def test_round_trip_gemma3(gemma3_tok: Tokenizer, text: str) -> None:
    # U+2581 is SentencePiece's space: it comes back as " ", as in llama.cpp
    text = text.replace("\u2581", "")
    assert gemma3_tok.decode(gemma3_tok.encode(text)) == text.encode()


@settings(max_examples=300, deadline=None)
@given(text=st.text(st.characters(exclude_categories=("Cs",)), max_size=80), parse_special=st.booleans())
def test_fast_and_python_engines_agree(
    smollm2_hf: Tokenizer, smollm2_py: Tokenizer, text: str, parse_special: bool
) -> None:
    fast = smollm2_hf.encode(text, parse_special=parse_special)
    assert fast == smollm2_py.encode(text, parse_special=parse_special)


# --- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("tokenizer.ggml.model", "bert"),
        ("tokenizer.ggml.pre", "tekken"),
        ("tokenizer.ggml.pre", "gpt2"),  # llama.cpp spells it "gpt-2" and rejects "gpt2"
    ],
)
def test_unsupported_tokenizer_names_key_and_value(smollm2_md: dict[str, Any], key: str, value: str) -> None:
    md = dict(smollm2_md)
    md[key] = value
    with pytest.raises(UnsupportedModelError, match=f"{key}.*{value}"):
        Tokenizer.from_metadata(md)


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "qwen2", "default", "smollm", "starcoder"])
def test_other_pre_tokenizers_build_and_agree(smollm2_md: dict[str, Any], pre: str) -> None:
    pytest.importorskip("regex")
    md = dict(smollm2_md)
    md["tokenizer.ggml.pre"] = pre
    fast, slow = Tokenizer.from_metadata(md, engine="hf"), Tokenizer.from_metadata(md, engine="python")
    text = "I'M here  \n\n  it's 12345 dollars!!! ¿Qué? 日本語 🎉"
    assert fast.encode(text) == slow.encode(text)
    assert fast.decode(fast.encode(text)).decode() in (text, text.replace(" !", "!"))


def test_load_builds_no_hugging_face_engine(smollm2_md: dict[str, Any]) -> None:
    # what makes loading cheap, checked without timing it: tokenizers' engine is not built
    tok = Tokenizer.from_metadata(smollm2_md)
    assert tok._hf is None and tok._py_bpe is not None
    tok.encode("a prompt of ordinary length " * 5000)
    assert tok._hf is None


@pytest.mark.parametrize("use_mmap", [True, False])
def test_vocabulary_stays_in_the_file(gemma3_path: Path, smollm2_path: Path, use_mmap: bool) -> None:
    # texts, scores and types are read where the file has them: file-backed pages under mmap, no copies
    g = GGUFFile(gemma3_path, use_mmap=use_mmap)
    v = Tokenizer.from_metadata(g.metadata)._v
    for arr in (v.tokens.data, v.scores, v.types):
        assert np.shares_memory(arr, g.data) and not arr.flags.writeable
    assert v.tokens.gap == 8 and v.tokens is g.metadata["tokenizer.ggml.tokens"]
    s = GGUFFile(smollm2_path, use_mmap=use_mmap)
    bpe = Tokenizer.from_metadata(s.metadata)
    assert np.shares_memory(bpe._v.tokens.data, s.data) and np.shares_memory(bpe._merges.data, s.data)


# --- Hugging Face transformers, loaded from the same GGUF -------------------------------

_HF_STRINGS = [
    "Hello world",
    " Hello world",
    "I'M sure they're here",
    "日本語 🎉 café",
    "  two  spaces\n\nnew",
    "The year 2024 had 366 days.",
    "def f(x):\n    return x + 1\n",
    "Привет, мир!",
    "what's up? don't!",
]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_matches_transformers_gguf_tokenizer(model: str, request: pytest.FixtureRequest) -> None:
    transformers = pytest.importorskip("transformers")
    path: Path = request.getfixturevalue(f"{model}_path")
    tok: Tokenizer = request.getfixturevalue(f"{model}_tok")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # pragma: no cover - depends on the installed transformers
        pytest.skip(f"transformers cannot load {path.name}: {e}")
    for text in _HF_STRINGS:
        assert tok.encode(text, add_special=False) == hf.encode(text, add_special_tokens=False), text
    ids = tok.encode("naïve 日本語 🎉", add_special=False)
    assert tok.decode(ids).decode() == hf.decode(ids)
