"""lmap.grammar: GBNF parsing as llama.cpp, matching, token masks with real tokenizers.

References:
- ``tests/fixtures/grammars/llama_parser_cases.json`` / ``llama_integration_cases.json``: llama.cpp's own
  test-grammar-parser.cpp and test-grammar-integration.cpp cases (extract_llama_cases.py regenerates them);
- ``tests/fixtures/grammars/*.gbnf``: llama.cpp's example grammars;
- :class:`LlamaStacks` below: a direct, slow port of llama.cpp's code-point stack matcher
  (``decode_utf8``, ``llama_grammar_match_char`` / ``match_partial_char``, ``advance_stack``), used as
  an independent oracle for the byte-level matcher and its vocabulary-wide mask.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmap import grammar as G
from lmap.errors import InvalidParameterError, LmapError
from lmap.gguf import GGUFFile
from lmap.grammar import ElementType, Grammar, TokenVocab, parse_gbnf, sample_with_grammar
from lmap.tokenizer import Tokenizer

FIX = Path(__file__).parent / "fixtures" / "grammars"


def _load(name: str) -> Any:
    return json.loads((FIX / name).read_text())


def _gbnf(name: str) -> str:
    return (FIX / name).read_text()


# ============================================================================ llama.cpp's parser tests


@pytest.mark.parametrize("case", _load("llama_parser_cases.json")["parsing"], ids=lambda c: c["grammar"].strip()[:40])
def test_parser_matches_llama_cpp_elements(case: dict[str, Any]) -> None:
    pg = parse_gbnf(case["grammar"])
    assert sorted(pg.symbol_ids.items()) == [tuple(s) for s in case["symbols"]]
    got = [(ElementType(t).name, v) for rule in pg.rules for t, v in rule]
    assert got == [tuple(e) for e in case["elements"]]


@pytest.mark.parametrize("text", _load("llama_parser_cases.json")["failures"])
def test_parser_rejects_what_llama_cpp_rejects(text: str) -> None:
    with pytest.raises(InvalidParameterError, match=r"grammar line \d+, column \d+"):
        parse_gbnf(text)


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ('root ::= "a"\nfoo ::= "b" bar\n', "line 2, column 13", "undefined rule 'bar'"),
        ('root ::= "abc', "line 1, column 10", "unterminated string literal"),
        ("root ::= [a-z", "line 1, column 10", "unterminated character class"),
        ('root ::= ("a" | "b"', "line 1, column 20", "expecting ')'"),
        ('\n\nroot = "a"', "line 3, column 6", "expecting '::='"),
        ('root ::= "\\q"', "line 1, column 11", "unknown escape"),
        ('root ::= "\\x4"', "line 1, column 11", "expecting 2 hex digits"),
        ('root ::= * "a"', "line 1, column 10", "expecting an item before the repetition"),
        ('root ::= "a"{2,1}', "line 1, column 13", "maximum is below the minimum"),
        ('root ::= "a" )', "line 1, column 14", "unexpected ')'"),
        ('root ::= "a"{3', "line 1, column 15", "expecting ',' or '}'"),
        ("root ::= <[12>", "line 1, column 14", "expecting ']'"),
    ],
)
def test_parse_errors_name_line_and_column(text: str, where: str, what: str) -> None:
    with pytest.raises(InvalidParameterError) as e:
        Grammar.from_gbnf(text)
    assert where in str(e.value) and what in str(e.value), str(e.value)


def test_grammar_level_errors() -> None:
    with pytest.raises(InvalidParameterError, match="empty"):
        Grammar.from_gbnf("  # nothing\n")
    with pytest.raises(InvalidParameterError, match="no rule named 'root'"):
        Grammar.from_gbnf('rot ::= "a"')
    assert Grammar.from_gbnf('foobar ::= "foobar"', root="foobar").matches("foobar")
    with pytest.raises(InvalidParameterError, match=r"left recursion .* \(expr -> term -> expr\)"):
        Grammar.from_gbnf('root ::= expr\nexpr ::= term "+" | "x"\nterm ::= expr "*"')
    with pytest.raises(InvalidParameterError, match="cannot read grammar file"):
        Grammar.from_file("/nonexistent/x.gbnf")


def test_hidden_left_recursion_is_stopped() -> None:
    # llama.cpp's check only sees literally empty alternatives; the expansion guard catches the rest
    text = 'root ::= e root "x" | "y"\ne ::= f\nf ::= | "z"'
    with pytest.raises(InvalidParameterError, match="does not terminate"):
        Grammar.from_gbnf(text)


# ========================================================================= llama.cpp's integration tests


def _integration_vocab() -> tuple[TokenVocab, dict[str, int]]:
    """Ids 0..99 are marker tokens (piece ``<tN>``); every character of the test strings is a token too."""
    cases = _load("llama_integration_cases.json")
    chars: set[str] = set()
    for c in cases:
        for s in c["passing"] + c["failing"]:
            for part in s if isinstance(s, list) else [s]:
                if isinstance(part, str):
                    chars.update(part)
    ordered = sorted(chars)
    pieces = [f"<t{i}>".encode() for i in range(100)] + [b""] * 900 + [ch.encode() for ch in ordered]
    return TokenVocab(pieces, eog_ids=[99]), {ch: 1000 + i for i, ch in enumerate(ordered)}


def _as_tokens(s: str | list[Any], char_ids: dict[str, int]) -> list[int]:
    out: list[int] = []
    for part in s if isinstance(s, list) else [s]:
        if isinstance(part, dict):
            out.append(part["token"])
        else:
            out.extend(char_ids[ch] for ch in part)
    return out


def _accepts_tokens(g: Grammar, vocab: TokenVocab, toks: list[int]) -> bool:
    m = g.matcher(vocab)
    for t in toks:
        if not m.allows(t):
            with pytest.raises(InvalidParameterError):
                m.accept(t)
            return False
        m.accept(t)
    return m.can_end


_INTEGRATION = [c for c in _load("llama_integration_cases.json") if c["kind"] != "grammar_source"]


@pytest.mark.parametrize("case", _INTEGRATION, ids=lambda c: f"{c['kind']}:{c['desc'][:40]}")
def test_llama_cpp_integration_cases(case: dict[str, Any]) -> None:
    vocab, char_ids = _integration_vocab()
    g = Grammar.from_json_schema(case["source"]) if case["kind"] == "schema" else Grammar.from_gbnf(case["source"])
    for s in case["passing"]:
        assert _accepts_tokens(g, vocab, _as_tokens(s, char_ids)), s
        if isinstance(s, str):
            assert g.matches(s), s
    for s in case["failing"]:
        assert not _accepts_tokens(g, vocab, _as_tokens(s, char_ids)), s
        if isinstance(s, str):
            assert not g.matches(s), s


def test_llama_cpp_failure_sources() -> None:
    src = {c["desc"]: c["source"] for c in _load("llama_integration_cases.json") if c["kind"] == "grammar_source"}
    with pytest.raises(InvalidParameterError, match="no rule named 'root'"):
        Grammar.from_gbnf(src["test_failure_missing_root: grammar_str"])
    with pytest.raises(InvalidParameterError, match="undefined rule 'numero'"):
        Grammar.from_gbnf(src["test_failure_missing_reference: grammar_str"])
    for key in ("simple_str", "medium_str", "hard_str", "hardest_str"):
        with pytest.raises(InvalidParameterError, match="left recursion"):
            Grammar.from_gbnf(src[f"test_failure_left_recursion: {key}"])
    with pytest.raises(InvalidParameterError, match="no rule named 'nonexistent'"):
        Grammar.from_gbnf(src["test_failure_missing_root_symbol: grammar_str"], root="nonexistent")
    text = src["test_custom_root_symbol_check: custom_root_grammar_str"]
    with pytest.raises(InvalidParameterError):
        Grammar.from_gbnf(text)
    assert Grammar.from_gbnf(text, root="foobar").matches("foobar")


# ============================================================================ llama.cpp's example grammars

_EXAMPLES: dict[str, tuple[list[str], list[str]]] = {
    "json.gbnf": (
        ['{"a": 1}', '{"a": [1, 2.5, -3e12, true, false, null], "b": {"c": "d\\n\\u00e9"}}', "{}", '{"é😀": ""}'],
        ["[]", '{"a": 01}', "{'a': 1}", '{"a": 1,}', '{"a": "\\x"}', '{"a": "\x01"}', '{"a"}'],
    ),
    "json_arr.gbnf": (
        ["[\n]", '[\n{"a": 1},\n{"b": [2]}]', '[\n {"k": "v"}]'],
        ["[]", "{}", '[{"a": 1}]', '[\n{"a": 1},]'],
    ),
    "arithmetic.gbnf": (
        ["1+2=3\n", "(a+b)*c = d\n", "x=1\ny = (2 *z3)\n"],
        ["1+2=3", "=3\n", "A=1\n", "1+=2\n"],
    ),
    "list.gbnf": (["- one\n- two\n", "- é😀\n"], ["", "- \n", "one\n", "- a\u2028b\n", "- x"]),
    "chess.gbnf": (
        ["1. e4 e5\n2. Nf3 Nc6\n", "1. d4 Nf6\n2. c4 e6\n3. Nc3 Bb4+\n", "1. e4 e5\n2. O-O O-O-O\n"],
        ["1. e4 e5\n", "1. e9 e5\n2. d4 d5\n", "e4 e5\n2. d4 d5\n", "1. e4 e5 2. d4 d5\n"],
    ),
    "c.gbnf": (
        ["int main(){return 0;}", "int f(int x){int y = x*2;if(y>3){y = y-1;}return y+1;}", ""],
        ["main(){}", "int main(){return 0}", "int main( {}", "int main() {return 0;}"],
    ),
    "english.gbnf": (["Hello, world. How are you?", "Hello\tworld"], ["Hello  world", "日本語", ""]),
    "japanese.gbnf": (["こんにちは、世界。", "カタカナ 漢字"], ["hello", "こんにちは!"]),
}


@pytest.mark.parametrize("name", sorted(_EXAMPLES))
def test_example_grammars(name: str) -> None:
    g = Grammar.from_file(FIX / name)
    good, bad = _EXAMPLES[name]
    for s in good:
        assert g.matches(s), (name, s)
    for s in bad:
        assert not g.matches(s), (name, s)


def test_every_example_grammar_parses() -> None:
    names = sorted(p.name for p in FIX.glob("*.gbnf"))
    assert set(names) == set(_EXAMPLES)
    for name in names:
        assert len(Grammar.from_file(FIX / name).rules) > 1


# ============================================================================ UTF-8 and character classes


@settings(max_examples=300, deadline=None)
@given(lo=st.integers(0, 0x10FFFF), span=st.integers(0, 0x3000), probes=st.lists(st.integers(0, 0x10FFFF), max_size=40))
def test_utf8_sequences_cover_exactly_the_range(lo: int, span: int, probes: list[int]) -> None:
    hi = min(lo + span, 0x10FFFF)
    seqs = G._utf8_sequences(lo, hi)
    for a in seqs[:-1]:
        assert len(a) >= 1

    def covered(data: bytes) -> bool:
        return any(len(s) == len(data) and all(x <= b <= y for b, (x, y) in zip(data, s, strict=True)) for s in seqs)

    for cp in [
        lo,
        hi,
        (lo + hi) // 2,
        lo - 1,
        hi + 1,
        0xD7FF,
        0xE000,
        0x7F,
        0x80,
        0x7FF,
        0x800,
        0xFFFF,
        0x10000,
        *probes,
    ]:
        if not 0 <= cp <= 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            continue
        assert covered(chr(cp).encode()) == (lo <= cp <= hi), hex(cp)
    # surrogate encodings and overlong forms are never produced
    assert not covered(b"\xed\xa0\x80") and not covered(b"\xc0\x80") and not covered(b"\xe0\x80\x80")


_POOL = 'aZ09 _-"\\]^\t\né\u00ff\u0100ē\u07ff\u0800中\uffef\U0001f600\U0010ffff'


def _class_text(items: list[tuple[str, str | None]], negate: bool) -> tuple[str, str]:
    """GBNF and Python-regex spellings of one character class."""

    def esc(c: str) -> str:
        return f"\\U{ord(c):08X}"

    gb = "".join(esc(a) + (f"-{esc(b)}" if b else "") for a, b in items)
    py = "".join(re.escape(a) + (f"-{re.escape(b)}" if b else "") for a, b in items)
    caret = "^" if negate else ""
    return f"[{caret}{gb}]", f"[{caret}{py}]"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=st.lists(
        st.tuples(st.sampled_from(_POOL), st.one_of(st.none(), st.sampled_from(_POOL))).map(
            lambda t: (t[0], t[1]) if t[1] is None or t[1] >= t[0] else (t[1], t[0])
        ),
        min_size=1,
        max_size=4,
    ),
    negate=st.booleans(),
    texts=st.lists(st.text(alphabet=_POOL, max_size=4), min_size=1, max_size=12),
)
def test_char_classes_agree_with_python_regex(
    items: list[tuple[str, str | None]], negate: bool, texts: list[str]
) -> None:
    gb, py = _class_text(items, negate)
    g = Grammar.from_gbnf(f'root ::= {gb}* "!"')
    rx = re.compile(f"(?:{py})*!")
    for t in texts:
        s = t + "!"
        expect = rx.fullmatch(s) is not None and "\x00" not in s
        assert g.matches(s) == expect, (gb, s)


def test_partial_utf8_tokens_and_invalid_bytes() -> None:
    # every byte its own token: characters arrive split across tokens
    pieces = [bytes([b]) for b in range(256)]
    vocab = TokenVocab(pieces)
    g = Grammar.from_gbnf('root ::= "é" [ぁ-ゟ] . "!"')
    m = g.matcher(vocab)
    text = "éぁ😀!".encode()
    for i, b in enumerate(text):
        allowed = np.flatnonzero(m.allowed())
        assert b in allowed, (i, hex(b))
        if i == 0:
            assert allowed.tolist() == [0xC3]  # the lead byte of é, nothing else
        if i == 1:
            assert allowed.tolist() == [0xA9]
        m.accept(b)
        assert m.can_end == (i == len(text) - 1)
    assert m.is_complete
    # '.' matches any well-formed character, never a stray continuation byte or a non-UTF-8 lead byte
    m2 = Grammar.from_gbnf("root ::= .").matcher(vocab)
    allowed = set(np.flatnonzero(m2.allowed()).tolist())
    assert allowed == set(range(1, 0x80)) | set(range(0xC2, 0xF5))
    for bad in (b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf5\x80\x80\x80", b"\xff", b"\x00"):
        assert not Grammar.from_gbnf("root ::= .").matches(bad), bad


def test_multibyte_token_pieces() -> None:
    pieces = ["é".encode(), "😀".encode(), b"\xf0\x9f", b"\x98\x80", b"ab", b"a", b"b", b"\xe3\x81", b"\x81"]
    vocab = TokenVocab(pieces)
    g = Grammar.from_gbnf('root ::= ("é" | "😀" | "ぁ" | "a" | "b")+')
    m = g.matcher(vocab)
    assert set(np.flatnonzero(m.allowed()).tolist()) == {0, 1, 2, 4, 5, 6, 7}
    m.accept(2)  # first half of 😀
    assert set(np.flatnonzero(m.allowed()).tolist()) == {3}
    m.accept(3)
    m.accept(7)
    assert set(np.flatnonzero(m.allowed()).tolist()) == {8}
    m.accept(8)
    assert m.can_end


# ================================================================================ tokens and end-of-generation


def test_token_elements_and_eog() -> None:
    pieces = [b"<s>", b"</s>", b"<think>", b"</think>", b"a", b"b", b""]
    vocab = TokenVocab(pieces, eog_ids=[1])
    g = Grammar.from_gbnf('root ::= <think> (!<[3]>)* <[3]> "a"+')
    m = g.matcher(vocab)
    assert np.flatnonzero(m.allowed()).tolist() == [2]
    m.accept(2)
    # any token but </think>; an empty piece never; EOG not before the end
    assert np.flatnonzero(m.allowed()).tolist() == [0, 2, 3, 4, 5]
    for t in (0, 4, 5, 2):
        m.accept(t)
    assert not m.allows(1) and not m.allows(6)
    m.accept(3)
    assert np.flatnonzero(m.allowed()).tolist() == [4]
    m.accept(4)
    assert m.can_end and not m.is_complete and m.allows(1) and m.allows(4)
    m.accept(1)  # EOG where the grammar can end: accepted, no move
    with pytest.raises(InvalidParameterError, match="not a single token"):
        Grammar.from_gbnf("root ::= <nope>").matcher(vocab)
    m2 = Grammar.from_gbnf('root ::= "a"').matcher(vocab)
    with pytest.raises(InvalidParameterError, match="end-of-generation"):
        m2.accept(1)
    with pytest.raises(InvalidParameterError, match="not allowed"):
        m2.accept(5)
    m2.accept(4)
    assert m2.is_complete


def test_state_restore_reset_and_table_restart(monkeypatch: pytest.MonkeyPatch) -> None:
    vocab = TokenVocab([bytes([b]) for b in range(128)])
    g = Grammar.from_gbnf(_gbnf("json.gbnf"))
    m = g.matcher(vocab)
    assert m.accept_bytes('{"a": [1, ')
    saved = m.state
    assert m.accept_bytes("2]}") and m.can_end
    m.restore(saved)
    assert not m.accept_bytes("}") and m.accept_bytes('"x"]}') and m.can_end
    m.reset()
    assert not m.can_end and m.accept_bytes("{}")
    # force the configuration tables to start over after every step: results must not change
    monkeypatch.setattr(G, "_MAX_CONFIGS", 2)
    m.reset()
    doc = '{"k": [true, {"x": null}], "s": "\\u00e9"}'
    for ch in doc:
        before = m.allowed().copy()
        assert before[ord(ch)], ch
        m.accept(ord(ch))
    assert m.can_end and g.matches(doc)


def test_mask_padded_logits_and_sample_with_grammar() -> None:
    vocab = TokenVocab([b"a", b"b", b"c", b"ab", b""], eog_ids=[4])
    g = Grammar.from_gbnf('root ::= "a" "b"? "c"')
    m = g.matcher(vocab)
    logits = np.arange(8, dtype=np.float32)  # 3 padded rows past the vocabulary
    assert m.mask(logits) == 2
    assert np.isneginf(logits).tolist() == [False, True, True, False, True, True, True, True]

    def argmax(x: np.ndarray) -> int:
        return int(np.argmax(x))

    raw = np.array([0, 0, 9, 0, 0], dtype=np.float32)  # the model wants "c"; the grammar needs "a" first
    tok = sample_with_grammar(argmax, raw, m)
    assert tok in (0, 3) and raw[2] == 9 and m.stats.rejected == 1 and m.stats.masks == 2
    m.accept(tok)
    assert sample_with_grammar(argmax, raw, m) == 2  # "c" allowed now: no mask needed
    assert m.stats.masks == 2
    m.accept(2)
    assert m.is_complete and sample_with_grammar(argmax, raw, m) == 4  # only EOG is left
    dead = Grammar.from_gbnf('root ::= "z"').matcher(vocab)
    with pytest.raises(LmapError, match="allows no token"):
        sample_with_grammar(argmax, raw, dead)


def test_response_format() -> None:
    assert Grammar.from_response_format(None) is None
    assert Grammar.from_response_format({"type": "text"}) is None
    for rf in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"schema": {}}}):
        g = Grammar.from_response_format(rf)
        assert g is not None and g.matches('{"a": [1]}') and not g.matches("[1]")
    g = Grammar.from_response_format(
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "items": {"type": "integer"}}}}
    )
    assert g is not None and g.matches("[1, 2]") and not g.matches('{"a": 1}')
    with pytest.raises(InvalidParameterError, match="response_format.type"):
        Grammar.from_response_format({"type": "xml"})


# ============================================================ llama.cpp's code-point stacks, as an oracle


class LlamaStacks:
    """A literal port of llama.cpp's grammar matcher (code points, lenient UTF-8 decoding).

    Positions are ``(rule_id, index)``; a stack is a tuple of positions, top last.
    """

    def __init__(self, pg: Any, root: str = "root") -> None:
        self.rules = pg.rules
        self.stacks: set[tuple[tuple[int, int], ...]] = set()
        rid = pg.symbol_ids[root]
        for start in self._alt_starts(rid):
            self.stacks |= self.advance(((rid, start),) if not self._end(rid, start) else ())
        self.partial = (0, 0)  # (value, n_remain)

    def _end(self, r: int, i: int) -> bool:
        return self.rules[r][i][0] in (0, 1)

    def _alt_starts(self, r: int) -> Iterator[int]:
        yield 0
        for i, (t, _) in enumerate(self.rules[r]):
            if t == 1:
                yield i + 1

    def advance(self, stack: tuple[tuple[int, int], ...]) -> set[tuple[tuple[int, int], ...]]:
        out: set[tuple[tuple[int, int], ...]] = set()
        todo, seen = [stack], set()
        while todo:
            s = todo.pop()
            if s in seen:
                continue
            seen.add(s)
            if not s:
                out.add(s)
                continue
            r, i = s[-1]
            t, v = self.rules[r][i]
            if t == 2:
                for sub in self._alt_starts(v):
                    nxt = s[:-1] + (((r, i + 1),) if not self._end(r, i + 1) else ())
                    if not self._end(v, sub):
                        nxt += ((v, sub),)
                    todo.append(nxt)
            else:
                out.add(s)
        return out

    def match_char(self, r: int, i: int, c: int) -> tuple[bool, int]:
        rule = self.rules[r]
        positive = rule[i][0] in (3, 7)
        found = False
        while True:
            if i + 1 < len(rule) and rule[i + 1][0] == 5:
                found = found or rule[i][1] <= c <= rule[i + 1][1]
                i += 2
            elif rule[i][0] == 7:
                found = True
                i += 1
            else:
                found = found or rule[i][1] == c
                i += 1
            if rule[i][0] != 6:
                break
        return found == positive, i

    def match_partial(self, r: int, i: int, partial: tuple[int, int]) -> bool:
        rule = self.rules[r]
        positive = rule[i][0] in (3, 7)
        value, n_remain = partial
        if n_remain < 0 or (n_remain == 1 and value < 2):
            return False
        low = value << (n_remain * 6)
        high = low | ((1 << (n_remain * 6)) - 1)
        if low == 0:
            low = {2: 1 << 11, 3: 1 << 16}.get(n_remain, low)
        while True:
            if i + 1 < len(rule) and rule[i + 1][0] == 5:
                if rule[i][1] <= high and low <= rule[i + 1][1]:
                    return positive
                i += 2
            elif rule[i][0] == 7:
                return True
            else:
                if low <= rule[i][1] <= high:
                    return positive
                i += 1
            if rule[i][0] != 6:
                break
        return not positive

    @staticmethod
    def decode(data: bytes, partial: tuple[int, int]) -> tuple[list[int], tuple[int, int]]:
        lookup = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 2, 2, 3, 4]
        value, n_remain = partial
        cps: list[int] = []
        pos = 0
        while pos < len(data) and data[pos] and n_remain > 0:
            if data[pos] >> 6 != 2:
                return [0], (0, -1)
            value = (value << 6) + (data[pos] & 0x3F)
            pos += 1
            n_remain -= 1
        if partial[1] > 0 and n_remain == 0:
            cps.append(value)
        while pos < len(data) and data[pos]:
            n_remain = lookup[data[pos] >> 4] - 1
            if n_remain < 0:
                return [0], (0, n_remain)
            value = data[pos] & ((1 << (7 - n_remain)) - 1)
            pos += 1
            while pos < len(data) and data[pos] and n_remain > 0:
                value = (value << 6) + (data[pos] & 0x3F)
                pos += 1
                n_remain -= 1
            if n_remain == 0:
                cps.append(value)
        return cps, (value, n_remain)

    def _after_chars(self, cps: list[int]) -> set[tuple[tuple[int, int], ...]]:
        stacks = {s for s in self.stacks if s and self.rules[s[-1][0]][s[-1][1]][0] not in (8, 9)}
        for c in cps:
            nxt: set[tuple[tuple[int, int], ...]] = set()
            for s in stacks:
                if not s or self.rules[s[-1][0]][s[-1][1]][0] in (8, 9):
                    continue
                ok, j = self.match_char(*s[-1], c)
                if ok:
                    nxt |= self.advance(s[:-1] + (((s[-1][0], j),) if not self._end(s[-1][0], j) else ()))
            stacks = nxt
            if not stacks:
                break
        return stacks

    def allows_piece(self, piece: bytes) -> bool:
        """llama_grammar_reject_candidates for one text token (no token elements involved)."""
        if not piece or piece[0] == 0:
            return False
        cps, partial = self.decode(piece, self.partial)
        if cps == [0]:
            return False
        stacks = self._after_chars(cps)
        if partial[1] == 0:
            return bool(stacks)
        return any(s and self.match_partial(*s[-1], partial) for s in stacks)

    def accept_piece(self, piece: bytes) -> None:
        cps, partial = self.decode(piece, self.partial)
        self.stacks = self._after_chars(cps)
        self.partial = partial
        assert self.stacks


def _wellformed_after(pending: bytes, piece: bytes) -> bool:
    """Whether ``pending + piece`` is UTF-8 that is valid, or valid up to a truncated last character."""
    data = pending + piece
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data" and e.end == len(data)


@pytest.fixture(scope="module")
def smollm2_tok(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(smollm2_path).metadata)


@pytest.fixture(scope="module")
def gemma3_tok(gemma3_path: Path) -> Tokenizer:
    return Tokenizer.from_metadata(GGUFFile(gemma3_path).metadata)


@pytest.fixture(params=["smollm2", "gemma3"])
def tok(request: pytest.FixtureRequest) -> Tokenizer:
    return request.getfixturevalue(f"{request.param}_tok")


_STATES = ["", '{"', '{"na', '{"name": "Ada', '{"a": [1, 2.', '{"a": tr', '{"a": {"b": null}, "c": "\\u00', '{"é": "😀']


def test_mask_equals_per_token_checks_and_llama_cpp_oracle(tok: Tokenizer) -> None:
    vocab = TokenVocab.from_tokenizer(tok)
    pg = parse_gbnf(_gbnf("json.gbnf"))
    g = Grammar.from_gbnf(_gbnf("json.gbnf"))
    rng = np.random.default_rng(0)
    subset = rng.choice(vocab.n_vocab, size=1500, replace=False).tolist()
    for state in _STATES:
        m = g.matcher(vocab)
        assert m.accept_bytes(state)
        allowed = m.allowed().astype(bool)
        # the vocabulary-wide mask equals one allows() per token
        per_token = np.array([m.allows(t) for t in range(vocab.n_vocab)])
        assert (allowed == per_token).all(), state
        assert not allowed[list(vocab.eog_ids)].any()
        # and, on well-formed pieces, llama.cpp's own algorithm
        oracle = LlamaStacks(pg)
        oracle.accept_piece(state.encode())
        for t in subset:
            piece = vocab.pieces[t]
            if t in vocab.eog_ids or not _wellformed_after(b"", piece):
                continue
            assert bool(allowed[t]) == oracle.allows_piece(piece), (state, t, piece)


def test_mask_after_a_partial_character_token(tok: Tokenizer) -> None:
    vocab = TokenVocab.from_tokenizer(tok)
    g = Grammar.from_gbnf(_gbnf("json.gbnf"))
    # a token that is only the first byte(s) of an emoji
    emoji = "😀".encode()
    lead = next(t for t, p in enumerate(vocab.pieces) if p and len(p) < 4 and emoji.startswith(p))
    m = g.matcher(vocab)
    assert m.accept_bytes('{"k": "')
    m.accept(lead)
    allowed = m.allowed().astype(bool)
    pending = vocab.pieces[lead]
    for t in np.flatnonzero(allowed).tolist():
        assert _wellformed_after(pending, vocab.pieces[t]), vocab.pieces[t]
    # the rest of the emoji (whatever token carries it) is allowed
    rest = emoji[len(pending) :]
    assert any(allowed[t] and rest.startswith(vocab.pieces[t]) for t in range(vocab.n_vocab))
    assert not any(allowed[t] and not _wellformed_after(pending, vocab.pieces[t]) for t in range(vocab.n_vocab))


_DOCS = [
    {"name": "Ada Lovelace", "age": 36, "tags": ["math", "poetry"], "alive": False, "spouse": None},
    {"text": 'Grüße, 世界! 😀 "quoted" \\ back\nslash\ttab', "n": [-1.5e3, 0.25, 1.25e37]},
    [{"id": 1, "ok": True}, {"id": 2, "ok": False, "nested": {"deep": [[[]]]}}],
]


@pytest.mark.parametrize("doc", _DOCS, ids=["person", "unicode", "array"])
def test_tokenized_json_is_accepted_token_by_token(tok: Tokenizer, doc: Any) -> None:
    vocab = TokenVocab.from_tokenizer(tok)
    g = Grammar.from_json_schema({}) if isinstance(doc, list) else Grammar.from_gbnf(_gbnf("json.gbnf"))
    for text in (json.dumps(doc), json.dumps(doc, ensure_ascii=False), json.dumps(doc, indent=2, ensure_ascii=False)):
        m = g.matcher(vocab)
        ids = tok.encode(text, add_special=False)
        assert tok.decode(ids).decode() == text
        for i in ids:
            assert m.allows(i), (text, tok.token_to_piece(i, special=True))
            m.accept(i)
        assert m.can_end
        assert all(m.allows(e) for e in vocab.eog_ids)
        # a broken document is caught at the token that breaks it
        m.reset()
        bad = tok.encode(text[:-1] + "]" if text.endswith("}") else text[:-1] + "}", add_special=False)
        ok = True
        for i in bad:
            if not m.allows(i):
                ok = False
                break
            m.accept(i)
        assert not (ok and m.can_end)


def test_special_token_text_in_grammar(smollm2_tok: Tokenizer) -> None:
    vocab = TokenVocab.from_tokenizer(smollm2_tok)
    im_start = smollm2_tok.encode("<|im_start|>", add_special=False, parse_special=True)
    assert len(im_start) == 1
    g = Grammar.from_gbnf('root ::= <|im_start|> "assistant" !<|im_start|>*')
    m = g.matcher(vocab)
    assert np.flatnonzero(m.allowed()).tolist() == im_start
    m.accept(im_start[0])
    for t in smollm2_tok.encode("assistant", add_special=False):
        m.accept(t)
    assert m.can_end and not m.allows(im_start[0]) and m.allows(smollm2_tok.encode("x", add_special=False)[0])


def test_vocab_trie_layout(smollm2_tok: Tokenizer) -> None:
    vocab = TokenVocab.from_tokenizer(smollm2_tok)
    assert TokenVocab.from_tokenizer(smollm2_tok) is vocab  # cached per tokenizer
    # every trie node's bytes from the root spell a prefix; each token's node spells exactly its piece
    n = vocab.n_trie_nodes
    prefix: list[bytes] = [b""] * (vocab.max_len + 1)
    spelled = []
    for i in range(n):
        d = int(vocab.t_depth[i])
        prefix[d] = prefix[d - 1] + bytes([int(vocab.t_byte[i])])
        spelled.append(prefix[d])
        assert i < vocab.t_skip[i] <= n
    for i in range(n):
        t = int(vocab.t_tok[i])
        if t < vocab.n_vocab:
            assert vocab.pieces[t] == spelled[i]
    in_trie = {int(t) for t in vocab.t_tok if t < vocab.n_vocab} | set(vocab.dup_ids.tolist())
    expect = {t for t in range(vocab.n_vocab) if vocab.valid[t] and b"\x00" not in vocab.pieces[t]}
    assert in_trie == expect
