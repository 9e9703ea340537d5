"""Constrained output: GBNF grammars (and JSON schemas compiled to them) as token-level acceptors.

The grammar language is llama.cpp's GBNF, parsed exactly as ``src/llama-grammar.cpp`` parses it (same
rule ids, same expansion of ``*`` ``+`` ``?`` ``{m,n}``, same limits and left-recursion check), so
:attr:`Grammar.rules` equals llama.cpp's ``llama_grammar_parser::rules`` element for element.  JSON
schemas go through :mod:`lmap.json_schema`, a port of llama.cpp's ``json-schema-to-grammar.cpp``.

Matching works like llama.cpp's pushdown stacks (``llama_grammar_advance_stack`` / ``accept``), with one
change of alphabet: character classes are compiled to their UTF-8 byte sequences, and the stacks
advance one *byte* at a time.  A token that ends in the middle of a character (byte-fallback tokens,
BPE pieces of emoji) simply leaves the stacks in the middle of that character's byte sequence, which
is llama.cpp's ``llama_partial_utf8`` made exact.  Only well-formed UTF-8 (no surrogates, overlong forms
or NUL) can match a character class; llama.cpp's decoder is more lenient with malformed pieces.

Speed.  A set of stacks (a *configuration*) is interned to a small integer the first time it is met,
and transitions ``(configuration, byte) -> configuration`` are memoized in a table, so after warm-up a
token check is a walk over its bytes in that table:

- :meth:`Matcher.allows` checks one sampled token (about a microsecond per token byte);
- :meth:`Matcher.mask` walks a trie of the whole vocabulary with a Numba kernel, pruning every subtree
  the grammar rejects at its first byte; transitions not yet in the table are computed in Python
  between passes.  Results are cached per configuration (the inside of a JSON string is one).

The cheap path is what the sampler uses (as llama.cpp's ``common_sampler_sample``): draw a token from
the unconstrained logits, keep it if :meth:`Matcher.allows` it, and only otherwise mask and redraw
(:func:`sample_with_grammar`).

Wiring into a generation loop::

    from lmap.grammar import Grammar, TokenVocab, sample_with_grammar

    vocab = TokenVocab.from_tokenizer(tokenizer)       # once per model (cached per tokenizer)
    g = Grammar.from_gbnf(text)                         # or Grammar.from_json_schema(schema),
                                                        # Grammar.json_object(),
                                                        # Grammar.from_response_format(body["response_format"])
    m = g.matcher(vocab)                                # one per generation (cheap; shares g's caches)
    while True:
        logits = ...                                    # n_vocab floats from the model
        tok = sample_with_grammar(lambda x: sampler.sample(x, history), logits, m)
        if tokenizer.is_eog(tok):
            break                                       # only offered when m.can_end
        m.accept(tok)
        emit(tok)
        if m.is_complete:                               # nothing but end-of-generation can follow
            break

The individual calls: ``m.allows(tok) -> bool``, ``m.mask(logits) -> n_allowed`` (in place, ``-inf`` for
rejected tokens), ``m.accept(tok)``, ``m.can_end``, ``m.is_complete``, ``m.reset()``, ``m.state`` /
``m.restore(state)``.  Errors are :class:`~lmap.errors.InvalidParameterError` (bad grammar text, with
line and column; a token the grammar does not allow passed to ``accept``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numba import njit

from .errors import InvalidParameterError, LmapError

log = logging.getLogger("lmap")

__all__ = [
    "ElementType",
    "Grammar",
    "Matcher",
    "ParsedGrammar",
    "TokenVocab",
    "parse_gbnf",
    "sample_with_grammar",
]


class ElementType(enum.IntEnum):
    """llama.cpp's ``llama_gretype``: the element kinds of a parsed rule."""

    END = 0
    ALT = 1
    RULE_REF = 2
    CHAR = 3
    CHAR_NOT = 4
    CHAR_RNG_UPPER = 5
    CHAR_ALT = 6
    CHAR_ANY = 7
    TOKEN = 8
    TOKEN_NOT = 9


_END, _ALT, _REF, _CHAR, _CHAR_NOT, _RNG, _CHAR_ALT, _ANY, _TOKEN, _TOKEN_NOT = range(10)
# byte-level programs add one terminal: a set of bytes (value = index of the set)
_BYTES = 10

# llama.cpp's MAX_REPETITION_THRESHOLD
MAX_REPETITION_THRESHOLD = 2000
_MAX_CP = 0x10FFFF
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_HEX = frozenset("0123456789abcdefABCDEF")

# transition table entries that are not configuration ids
_DEAD = -1
_UNKNOWN = -2
# soft limits on the memo tables: past them the configuration tables start over (matchers re-intern)
_MAX_CONFIGS = int(os.environ.get("LMAP_GRAMMAR_MAX_CONFIGS", "20000"))
# a single expansion touching more stacks than this cannot terminate (hidden left recursion)
_MAX_ADVANCE = 200_000
_MASK_CACHE = 16


# =============================================================================================== parsing


@dataclass(frozen=True)
class ParsedGrammar:
    """A GBNF text parsed as llama.cpp does.

    ``rules[i]`` is the flat element list of the rule whose symbol id is ``i`` (alternatives separated
    by ``ALT``, terminated by ``END``), as ``(ElementType, value)`` pairs.  ``<token text>`` elements
    carry ``-(k + 1)`` as value until a vocabulary resolves ``token_texts[k]`` to an id.
    """

    symbol_ids: dict[str, int]
    rules: list[list[tuple[int, int]]]
    token_texts: list[str]
    source: str

    def rule_name(self, rule_id: int) -> str:
        """The name of a symbol id (generated rules are named like llama.cpp's, ``root_3``)."""
        for name, i in self.symbol_ids.items():
            if i == rule_id:
                return name
        return f"#{rule_id}"


class _Parser:
    """A port of ``llama_grammar_parser`` that reports errors with line and column."""

    def __init__(self, src: str, name: str) -> None:
        self.src = src
        self.n = len(src)
        self.name = name
        self.symbol_ids: dict[str, int] = {}
        self.rules: list[list[tuple[int, int]]] = []
        self.first_use: dict[int, int] = {}
        self.token_texts: list[str] = []

    # --- errors

    def where(self, pos: int) -> str:
        line = self.src.count("\n", 0, pos) + 1
        col = pos - (self.src.rfind("\n", 0, pos) + 1) + 1
        return f"{self.name} line {line}, column {col}"

    def fail(self, pos: int, msg: str) -> InvalidParameterError:
        near = self.src[pos : pos + 24]
        at = f" (at {near!r})" if near else " (at the end of the text)"
        return InvalidParameterError(f"{self.where(pos)}: {msg}{at}")

    # --- lexical helpers

    def ch(self, pos: int) -> str:
        return self.src[pos] if pos < self.n else ""

    def parse_space(self, pos: int, newline_ok: bool) -> int:
        src, n = self.src, self.n
        while pos < n:
            c = src[pos]
            if c == " " or c == "\t" or (newline_ok and (c == "\r" or c == "\n")):
                pos += 1
            elif c == "#":
                while pos < n and src[pos] not in "\r\n":
                    pos += 1
            else:
                break
        return pos

    def parse_name(self, pos: int) -> int:
        end = pos
        while end < self.n and self.src[end] in _WORD_CHARS:
            end += 1
        if end == pos:
            raise self.fail(pos, "expecting a rule name (letters, digits and '-')")
        return end

    def parse_int(self, pos: int) -> int:
        end = pos
        while end < self.n and self.src[end].isdigit() and self.src[end].isascii():
            end += 1
        if end == pos:
            raise self.fail(pos, "expecting an integer")
        return end

    def parse_hex(self, pos: int, size: int, esc_at: int) -> tuple[int, int]:
        digits = self.src[pos : pos + size]
        if len(digits) != size or any(c not in _HEX for c in digits):
            raise self.fail(esc_at, f"expecting {size} hex digits after '{self.src[esc_at : esc_at + 2]}'")
        return int(digits, 16), pos + size

    def parse_char(self, pos: int) -> tuple[int, int]:
        c = self.ch(pos)
        if c == "\\":
            e = self.ch(pos + 1)
            if e == "x":
                return self.parse_hex(pos + 2, 2, pos)
            if e == "u":
                return self.parse_hex(pos + 2, 4, pos)
            if e == "U":
                return self.parse_hex(pos + 2, 8, pos)
            if e == "t":
                return 9, pos + 2
            if e == "r":
                return 13, pos + 2
            if e == "n":
                return 10, pos + 2
            if e and e in '\\"[]-':
                return ord(e), pos + 2
            raise self.fail(pos, f"unknown escape '\\{e}' (known: \\x \\u \\U \\t \\r \\n \\\\ \\\" \\[ \\] \\-)")
        if c:
            return ord(c), pos + 1
        raise self.fail(pos, "unexpected end of input")

    # --- symbols

    def get_symbol_id(self, name: str) -> int:
        return self.symbol_ids.setdefault(name, len(self.symbol_ids))

    def generate_symbol_id(self, base: str) -> int:
        next_id = len(self.symbol_ids)
        self.symbol_ids[f"{base}_{next_id}"] = next_id
        return next_id

    def add_rule(self, rule_id: int, rule: list[tuple[int, int]]) -> None:
        while len(self.rules) <= rule_id:
            self.rules.append([])
        self.rules[rule_id] = rule

    # --- grammar

    def parse_token(self, pos: int) -> tuple[int, int]:
        start = pos
        if self.ch(pos) != "<":
            raise self.fail(pos, "expecting '<'")
        pos += 1
        if self.ch(pos) == "[":
            pos += 1
            end = self.parse_int(pos)
            token_id = int(self.src[pos:end])
            if token_id > 0xFFFFFFFF:
                raise self.fail(pos, "token id is too big")
            if self.ch(end) != "]":
                raise self.fail(end, "expecting ']'")
            if self.ch(end + 1) != ">":
                raise self.fail(end + 1, "expecting '>'")
            return token_id, end + 2
        end = self.src.find(">", pos)
        if end < 0:
            raise self.fail(start, "expecting '>' to close the token")
        self.token_texts.append(self.src[start : end + 1])
        return -len(self.token_texts), end + 1

    def parse_sequence(self, pos: int, rule_name: str, rule: list[tuple[int, int]], is_nested: bool) -> int:
        last_sym_start = len(rule)
        n_prev_rules = 1
        src = self.src

        def handle_repetitions(min_times: int, max_times: int | None, at: int) -> None:
            # S{m,n} -> S..S (m times) S'(n-m), S'(x) ::= S S'(x-1) |  ...; S{m,} -> S..S S', S' ::= S S' |
            nonlocal n_prev_rules
            if last_sym_start == len(rule):
                raise self.fail(at, "expecting an item before the repetition operator")
            prev = rule[last_sym_start:]
            total = 1
            if max_times is not None and max_times > 0:
                total = max_times
            elif min_times > 0:
                total = min_times
            if n_prev_rules * total > MAX_REPETITION_THRESHOLD:
                raise self.fail(
                    at,
                    "number of rules that are going to be repeated multiplied by the new repetition exceeds "
                    f"{MAX_REPETITION_THRESHOLD}; reduce the number of repetitions or the rule's complexity",
                )
            if max_times is not None and max_times < min_times:
                raise self.fail(at, f"repetition {{{min_times},{max_times}}}: the maximum is below the minimum")
            if min_times == 0:
                del rule[last_sym_start:]
            else:
                for _ in range(1, min_times):
                    rule.extend(prev)
            last_rec = 0
            n_opt = 1 if max_times is None else max_times - min_times
            for i in range(n_opt):
                rec = list(prev)
                rec_id = self.generate_symbol_id(rule_name)
                if i > 0 or max_times is None:
                    rec.append((_REF, rec_id if max_times is None else last_rec))
                rec.append((_ALT, 0))
                rec.append((_END, 0))
                self.add_rule(rec_id, rec)
                last_rec = rec_id
            if n_opt > 0:
                rule.append((_REF, last_rec))
            n_prev_rules *= total

        while pos < self.n:
            c = src[pos]
            if c == '"':
                start = pos
                pos += 1
                last_sym_start = len(rule)
                n_prev_rules = 1
                while self.ch(pos) != '"':
                    if pos >= self.n:
                        raise self.fail(start, "unterminated string literal")
                    cp, pos = self.parse_char(pos)
                    rule.append((_CHAR, cp))
                pos = self.parse_space(pos + 1, is_nested)
            elif c == "[":
                start = pos
                pos += 1
                start_type = _CHAR
                if self.ch(pos) == "^":
                    pos += 1
                    start_type = _CHAR_NOT
                last_sym_start = len(rule)
                n_prev_rules = 1
                while self.ch(pos) != "]":
                    if pos >= self.n:
                        raise self.fail(start, "unterminated character class")
                    cp, pos = self.parse_char(pos)
                    rule.append((_CHAR_ALT if last_sym_start < len(rule) else start_type, cp))
                    if self.ch(pos) == "-" and self.ch(pos + 1) != "]":
                        if pos + 1 >= self.n:
                            raise self.fail(start, "unterminated character class")
                        cp, pos = self.parse_char(pos + 1)
                        rule.append((_RNG, cp))
                pos = self.parse_space(pos + 1, is_nested)
            elif c == "<" or c == "!":
                etype = _TOKEN
                if c == "!":
                    etype = _TOKEN_NOT
                    pos += 1
                value, pos = self.parse_token(pos)
                last_sym_start = len(rule)
                n_prev_rules = 1
                rule.append((etype, value))
                pos = self.parse_space(pos, is_nested)
            elif c in _WORD_CHARS:
                end = self.parse_name(pos)
                ref = self.get_symbol_id(src[pos:end])
                self.first_use.setdefault(ref, pos)
                pos = self.parse_space(end, is_nested)
                last_sym_start = len(rule)
                n_prev_rules = 1
                rule.append((_REF, ref))
            elif c == "(":
                open_at = pos
                pos = self.parse_space(pos + 1, True)
                n_before = len(self.symbol_ids)
                sub = self.generate_symbol_id(rule_name)
                pos = self.parse_alternates(pos, rule_name, sub, True)
                n_prev_rules = max(1, len(self.symbol_ids) - n_before)
                last_sym_start = len(rule)
                rule.append((_REF, sub))
                if self.ch(pos) != ")":
                    raise self.fail(pos, f"expecting ')' to close the group opened at {self.where(open_at)}")
                pos = self.parse_space(pos + 1, is_nested)
            elif c == ".":
                last_sym_start = len(rule)
                n_prev_rules = 1
                rule.append((_ANY, 0))
                pos = self.parse_space(pos + 1, is_nested)
            elif c == "*" or c == "+" or c == "?":
                at = pos
                pos = self.parse_space(pos + 1, is_nested)
                handle_repetitions(1 if c == "+" else 0, 1 if c == "?" else None, at)
            elif c == "{":
                at = pos
                pos = self.parse_space(pos + 1, is_nested)
                if not self.ch(pos).isdigit():
                    raise self.fail(pos, "expecting an integer after '{'")
                end = self.parse_int(pos)
                min_times = int(src[pos:end])
                pos = self.parse_space(end, is_nested)
                max_times: int | None = None
                if self.ch(pos) == "}":
                    max_times = min_times
                    pos = self.parse_space(pos + 1, is_nested)
                elif self.ch(pos) == ",":
                    pos = self.parse_space(pos + 1, is_nested)
                    if self.ch(pos).isdigit():
                        end = self.parse_int(pos)
                        max_times = int(src[pos:end])
                        pos = self.parse_space(end, is_nested)
                    if self.ch(pos) != "}":
                        raise self.fail(pos, "expecting '}'")
                    pos = self.parse_space(pos + 1, is_nested)
                else:
                    raise self.fail(pos, "expecting ',' or '}'")
                if min_times > MAX_REPETITION_THRESHOLD:
                    raise self.fail(at, f"number of repetitions exceeds {MAX_REPETITION_THRESHOLD}")
                if max_times is not None and max_times > MAX_REPETITION_THRESHOLD:
                    max_times = None  # as llama.cpp: a huge maximum means no maximum
                handle_repetitions(min_times, max_times, at)
            else:
                break
        return pos

    def parse_alternates(self, pos: int, rule_name: str, rule_id: int, is_nested: bool) -> int:
        rule: list[tuple[int, int]] = []
        pos = self.parse_sequence(pos, rule_name, rule, is_nested)
        while self.ch(pos) == "|":
            rule.append((_ALT, 0))
            pos = self.parse_space(pos + 1, True)
            pos = self.parse_sequence(pos, rule_name, rule, is_nested)
        rule.append((_END, 0))
        self.add_rule(rule_id, rule)
        return pos

    def parse_rule(self, pos: int) -> int:
        name_end = self.parse_name(pos)
        after = self.parse_space(name_end, False)
        name = self.src[pos:name_end]
        rule_id = self.get_symbol_id(name)
        if self.src[after : after + 3] != "::=":
            raise self.fail(after, f"expecting '::=' after the rule name '{name}'")
        pos = self.parse_space(after + 3, True)
        pos = self.parse_alternates(pos, name, rule_id, False)
        c = self.ch(pos)
        if c == "\r":
            pos += 2 if self.ch(pos + 1) == "\n" else 1
        elif c == "\n":
            pos += 1
        elif c:
            raise self.fail(pos, f"unexpected {c!r} in the definition of '{name}': expecting an item, '|' or a newline")
        return self.parse_space(pos, True)

    def parse(self) -> ParsedGrammar:
        pos = self.parse_space(0, True)
        while pos < self.n:
            pos = self.parse_rule(pos)
        names = {i: name for name, i in self.symbol_ids.items()}
        for rid in range(len(self.symbol_ids)):
            if rid >= len(self.rules) or not self.rules[rid]:
                name = names[rid]
                at = self.first_use.get(rid, 0)
                raise InvalidParameterError(
                    f"{self.where(at)}: undefined rule '{name}' (used but never defined with '{name} ::= ...')"
                )
        return ParsedGrammar(dict(self.symbol_ids), self.rules, self.token_texts, self.src)


def parse_gbnf(text: str, *, name: str = "grammar") -> ParsedGrammar:
    """Parse GBNF ``text`` into llama.cpp's rule elements; errors name the line and column."""
    if not isinstance(text, str):
        raise InvalidParameterError(f"{name}: a GBNF grammar must be a string, got {type(text).__name__}")
    parsed = _Parser(text, name).parse()
    if not parsed.rules:
        raise InvalidParameterError(f"{name}: the grammar is empty (expected at least 'root ::= ...')")
    return parsed


def _is_end(rule: list[tuple[int, int]], i: int) -> bool:
    return rule[i][0] in (_END, _ALT)


def _left_recursion(parsed: ParsedGrammar) -> list[int] | None:
    """llama.cpp's ``llama_grammar_detect_left_recursion``: a cycle of rule ids, or None.

    Like llama.cpp, a rule counts as possibly empty only when one of its alternatives is literally
    empty, so the same grammars are accepted (expansions that still fail to terminate are stopped in
    :meth:`_Automaton.advance`).  Iterative, since repetition expansions make long rule chains.
    """
    rules = parsed.rules
    n = len(rules)
    may_be_empty = [False] * n
    for i, rule in enumerate(rules):
        at_start = True
        for k in range(len(rule)):
            if _is_end(rule, k):
                if at_start:
                    may_be_empty[i] = True
                    break
                at_start = True
            else:
                at_start = False

    def left_refs(i: int) -> list[int]:
        out: list[int] = []
        rule = rules[i]
        recurse = True
        for k, (t, v) in enumerate(rule):
            if t == _REF and recurse:
                out.append(v)
                if not may_be_empty[v]:
                    recurse = False
            elif _is_end(rule, k):
                recurse = True
            else:
                recurse = False
        return out

    state = [0] * n  # 0 new, 1 on the current path, 2 done
    for s in range(n):
        if state[s]:
            continue
        path = [s]
        iters = [iter(left_refs(s))]
        state[s] = 1
        while path:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state[nxt] == 1:
                return path[path.index(nxt) :] + [nxt]
            elif state[nxt] == 0:
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(left_refs(nxt)))
    return None


# ======================================================================================= byte programs


def _utf8_sequences(lo: int, hi: int) -> list[list[tuple[int, int]]]:
    """The byte-range sequences whose concatenations are exactly the UTF-8 encodings of ``[lo, hi]``.

    Surrogates are left out.  Sequences come in code point order; the first ranges of any two are
    equal or disjoint, which keeps the compiled alternatives deterministic.
    """
    out: list[list[tuple[int, int]]] = []
    todo = [(lo, hi)]
    while todo:
        lo, hi = todo.pop()
        if lo > hi:
            continue
        if lo <= 0xDFFF and hi >= 0xD800:
            todo.append((0xE000, hi))
            todo.append((lo, 0xD7FF))
            continue
        split = False
        for b in (0x7F, 0x7FF, 0xFFFF):
            if lo <= b < hi:
                todo.append((b + 1, hi))
                todo.append((lo, b))
                split = True
                break
        if split:
            continue
        if hi <= 0x7F:
            out.append([(lo, hi)])
            continue
        n = 2 if hi <= 0x7FF else 3 if hi <= 0xFFFF else 4
        for i in range(1, n):
            m = (1 << (6 * i)) - 1
            if lo & ~m != hi & ~m:
                if lo & m:
                    todo.append(((lo | m) + 1, hi))
                    todo.append((lo, lo | m))
                    split = True
                    break
                if hi & m != m:
                    todo.append((hi & ~m, hi))
                    todo.append((lo, (hi & ~m) - 1))
                    split = True
                    break
        if split:
            continue
        a, b = chr(lo).encode(), chr(hi).encode()
        out.append(list(zip(a, b, strict=True)))
    return out


def _class_intervals(elems: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Code point intervals matched by one character class (llama.cpp's ``llama_grammar_match_char``)."""
    first = elems[0][0]
    if first == _ANY:
        spans = [(1, _MAX_CP)]
    else:
        raw: list[tuple[int, int]] = []
        i = 0
        while i < len(elems):
            v = elems[i][1]
            if i + 1 < len(elems) and elems[i + 1][0] == _RNG:
                if v <= elems[i + 1][1]:
                    raw.append((v, elems[i + 1][1]))
                i += 2
            else:
                raw.append((v, v))
                i += 1
        raw.sort()
        merged: list[tuple[int, int]] = []
        for a, b in raw:
            if merged and a <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        if first == _CHAR_NOT:
            comp: list[tuple[int, int]] = []
            nxt = 0
            for a, b in merged:
                if a > nxt:
                    comp.append((nxt, a - 1))
                nxt = max(nxt, b + 1)
            if nxt <= _MAX_CP:
                comp.append((nxt, _MAX_CP))
            merged = comp
        spans = merged
    # NUL never matches: llama.cpp stops decoding a piece at its first zero byte
    out = []
    for a, b in spans:
        a = max(a, 1)
        b = min(b, _MAX_CP)
        if a <= b:
            out.append((a, b))
    return out


_Sym = tuple[int, int]


class _Program:
    """A grammar compiled to byte terminals, flattened like llama.cpp's rules for the stack machine."""

    def __init__(self, parsed: ParsedGrammar, root_id: int, token_ids: Sequence[int]) -> None:
        self.byte_sets: list[bytes] = []
        self._set_ids: dict[bytes, int] = {}
        self._class_syms: dict[tuple[int, tuple[tuple[int, int], ...]], list[_Sym]] = {}
        self._tail_rules: dict[Any, int] = {}
        self.rules: list[list[list[_Sym]]] = [[] for _ in parsed.rules]
        for rid, rule in enumerate(parsed.rules):
            self.rules[rid] = self._compile_rule(rule, token_ids)
        self.rule_names = [parsed.rule_name(i) for i in range(len(parsed.rules))]
        et: list[int] = []
        ev: list[int] = []
        self.rule_alts: list[list[int]] = []
        for alts in self.rules:
            starts = []
            for k, alt in enumerate(alts):
                starts.append(len(et))
                for t, v in alt:
                    et.append(t)
                    ev.append(v)
                et.append(_ALT if k < len(alts) - 1 else _END)
                ev.append(0)
            self.rule_alts.append(starts)
        self.etype = et
        self.evalue = ev
        self.is_end = [t in (_END, _ALT) for t in et]
        self.root_id = root_id

    def _set_id(self, table: bytes) -> int:
        sid = self._set_ids.get(table)
        if sid is None:
            sid = self._set_ids[table] = len(self.byte_sets)
            self.byte_sets.append(table)
        return sid

    def _range_set(self, ranges: Iterable[tuple[int, int]]) -> int:
        t = bytearray(256)
        for a, b in ranges:
            t[a : b + 1] = b"\x01" * (b - a + 1)
        t[0] = 0
        return self._set_id(bytes(t))

    def _compile_rule(self, rule: list[tuple[int, int]], token_ids: Sequence[int]) -> list[list[_Sym]]:
        alts: list[list[_Sym]] = []
        cur: list[_Sym] = []
        i = 0
        while i < len(rule):
            t, v = rule[i]
            if t in (_END, _ALT):
                alts.append(cur)
                cur = []
                i += 1
            elif t == _REF:
                cur.append((_REF, v))
                i += 1
            elif t in (_TOKEN, _TOKEN_NOT):
                if v < 0:
                    v = token_ids[-v - 1] if -v - 1 < len(token_ids) else -1
                cur.append((t, v))
                i += 1
            else:
                j = i + 1
                while j < len(rule) and rule[j][0] in (_RNG, _CHAR_ALT):
                    j += 1
                cur.extend(self._class(rule[i:j]))
                i = j
        return alts

    def _class(self, elems: list[tuple[int, int]]) -> list[_Sym]:
        spans = tuple(_class_intervals(elems))
        key = (0, spans)
        syms = self._class_syms.get(key)
        if syms is None:
            seqs = [s for a, b in spans for s in _utf8_sequences(a, b)]
            if not seqs:
                syms = [(_BYTES, self._range_set(()))]
            else:
                alts = self._alternatives(seqs)
                syms = alts[0] if len(alts) == 1 else [(_REF, self._rule_for(alts))]
            self._class_syms[key] = syms
        return syms

    def _alternatives(self, seqs: list[list[tuple[int, int]]]) -> list[list[_Sym]]:
        # group by first byte range, compile each group's tails, then merge first ranges with equal tails
        groups: OrderedDict[tuple[int, int], list[list[tuple[int, int]]]] = OrderedDict()
        for s in seqs:
            groups.setdefault(s[0], []).append(s[1:])
        by_tail: OrderedDict[tuple[_Sym, ...], list[tuple[int, int]]] = OrderedDict()
        for first, tails in groups.items():
            tails = [t for t in tails if t] if any(tails) else []
            if not tails:
                tail: tuple[_Sym, ...] = ()
            elif len(tails) == 1:
                tail = tuple((_BYTES, self._range_set([r])) for r in tails[0])
            else:
                sub = self._alternatives(tails)
                tail = tuple(sub[0]) if len(sub) == 1 else ((_REF, self._rule_for(sub)),)
            by_tail.setdefault(tail, []).append(first)
        return [[(_BYTES, self._range_set(firsts)), *tail] for tail, firsts in by_tail.items()]

    def _rule_for(self, alts: list[list[_Sym]]) -> int:
        key = tuple(tuple(a) for a in alts)
        rid = self._tail_rules.get(key)
        if rid is None:
            rid = self._tail_rules[key] = len(self.rules)
            self.rules.append(alts)
        return rid


# ============================================================================================ automaton


class _Automaton:
    """Interned stacks, interned configurations (sets of stacks) and the memoized transitions.

    A stack is a linked list of element positions: node ``(pos, parent)``; node 0 is the empty stack
    (the grammar is complete).  A *normalized* node has a terminal (a byte set or a token) on top, as
    llama.cpp's stacks after ``llama_grammar_advance_stack``.
    """

    def __init__(self, prog: _Program) -> None:
        self.prog = prog
        self.node_pos: list[int] = [-1]
        self.node_par: list[int] = [0]
        self._node_ids: dict[tuple[int, int], int] = {}
        self._adv: dict[int, tuple[int, ...]] = {}
        self._after: dict[int, tuple[int, ...]] = {}
        self.generation = 0
        self._reset_configs()
        starts = []
        for pos in prog.rule_alts[prog.root_id]:
            node = 0 if prog.is_end[pos] else self.node(pos, 0)
            starts.extend(self.advance(node))
        self.init_nodes: tuple[int, ...] = tuple(sorted(set(starts)))

    # --- configurations

    def _reset_configs(self) -> None:
        self.generation += 1
        self.cfg_nodes: list[tuple[int, ...]] = []
        self.cfg_bytes: list[tuple[int, ...]] = []
        self.cfg_tok: list[tuple[int, ...]] = []
        self.cfg_accept: list[bool] = []
        self._cfg_ids: dict[tuple[int, ...], int] = {}
        self.trans: list[list[int]] = []
        self.trans_np = np.full((256, 256), _UNKNOWN, dtype=np.int32)

    def maybe_reset(self) -> None:
        """Start the configuration tables over when they grew past the soft limit (matchers re-intern)."""
        if len(self.cfg_nodes) > _MAX_CONFIGS:
            log.debug("grammar: %d configurations memoized, starting the tables over", len(self.cfg_nodes))
            self._reset_configs()

    def config(self, nodes: Iterable[int]) -> int:
        key = tuple(sorted(set(nodes)))
        c = self._cfg_ids.get(key)
        if c is not None:
            return c
        c = len(self.cfg_nodes)
        self._cfg_ids[key] = c
        et, npos = self.prog.etype, self.node_pos
        self.cfg_nodes.append(key)
        self.cfg_bytes.append(tuple(n for n in key if n and et[npos[n]] == _BYTES))
        self.cfg_tok.append(tuple(n for n in key if n and et[npos[n]] in (_TOKEN, _TOKEN_NOT)))
        self.cfg_accept.append(bool(key) and key[0] == 0)
        self.trans.append([_UNKNOWN] * 256)
        if c >= self.trans_np.shape[0]:
            grown = np.full((2 * self.trans_np.shape[0], 256), _UNKNOWN, dtype=np.int32)
            grown[: self.trans_np.shape[0]] = self.trans_np
            self.trans_np = grown
        return c

    # --- stacks

    def node(self, pos: int, parent: int) -> int:
        key = (pos, parent)
        n = self._node_ids.get(key)
        if n is None:
            n = self._node_ids[key] = len(self.node_pos)
            self.node_pos.append(pos)
            self.node_par.append(parent)
        return n

    def advance(self, node: int) -> tuple[int, ...]:
        """``llama_grammar_advance_stack``: expand rule references until every stack has a terminal on top."""
        r = self._adv.get(node)
        if r is not None:
            return r
        prog = self.prog
        et, ev, is_end, alts = prog.etype, prog.evalue, prog.is_end, prog.rule_alts
        npos, npar = self.node_pos, self.node_par
        todo = [node]
        seen: set[int] = set()
        out: set[int] = set()
        steps = 0
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            steps += 1
            if steps > _MAX_ADVANCE:
                raise InvalidParameterError(
                    "grammar expansion does not terminate: a rule refers to itself on the left through rules "
                    "that can match the empty string; rewrite that recursion with a repetition (* or +)"
                )
            if n == 0:
                out.add(0)
                continue
            pos = npos[n]
            if et[pos] != _REF:
                out.add(n)
                continue
            parent = npar[n]
            base = parent if is_end[pos + 1] else self.node(pos + 1, parent)
            for s in alts[ev[pos]]:
                todo.append(base if is_end[s] else self.node(s, base))
        r = self._adv[node] = tuple(sorted(out))
        return r

    def after(self, node: int) -> tuple[int, ...]:
        """The normalized stacks once the terminal on top of ``node`` has been matched."""
        r = self._after.get(node)
        if r is None:
            pos, parent = self.node_pos[node], self.node_par[node]
            base = parent if self.prog.is_end[pos + 1] else self.node(pos + 1, parent)
            r = self._after[node] = self.advance(base)
        return r

    # --- transitions

    def transition(self, c: int, b: int) -> int:
        """Compute (and memoize) the configuration after byte ``b`` in configuration ``c``."""
        sets, ev, npos = self.prog.byte_sets, self.prog.evalue, self.node_pos
        out: set[int] = set()
        for n in self.cfg_bytes[c]:
            if sets[ev[npos[n]]][b]:
                out.update(self.after(n))
        d = self.config(out) if out else _DEAD
        self.trans[c][b] = d
        self.trans_np[c, b] = d
        return d

    def walk(self, c: int, data: bytes) -> int:
        """The configuration after ``data`` from ``c``, or ``_DEAD``."""
        trans = self.trans
        for b in data:
            d = trans[c][b]
            if d < 0:
                if d == _DEAD:
                    return _DEAD
                d = self.transition(c, b)
                if d == _DEAD:
                    return _DEAD
            c = d
        return c

    def token_step(self, c: int, token: int) -> tuple[int, ...]:
        """Stacks after matching ``token`` against the token elements (``<[id]>``, ``!<[id]>``) on top."""
        out: list[int] = []
        et, ev, npos = self.prog.etype, self.prog.evalue, self.node_pos
        for n in self.cfg_tok[c]:
            pos = npos[n]
            if (et[pos] == _TOKEN) == (ev[pos] == token):
                out.extend(self.after(n))
        return tuple(out)


# =========================================================================================== vocabulary


@njit(cache=True)
def _build_trie(
    blob: np.ndarray, offs: np.ndarray, order: np.ndarray, max_len: int
) -> tuple[np.ndarray, ...]:  # pragma: no cover
    """Preorder trie of the pieces ``blob[offs[t]:offs[t+1]]`` for ``t`` in ``order`` (sorted by bytes).

    Returns per node its byte, its depth and the end of its subtree, and per piece its node.  In sorted
    order a piece ends either at a new node or (equal pieces) at the previous piece's node, so the
    nodes of the pieces never decrease.
    """
    n = order.shape[0]
    total = 0
    for k in range(n):
        total += offs[order[k] + 1] - offs[order[k]]
    t_byte = np.empty(total, np.uint8)
    t_depth = np.empty(total, np.int32)
    t_skip = np.empty(total, np.int32)
    tok_node = np.empty(n, np.int32)
    path = np.empty(max_len + 1, np.int64)
    plen = 0
    nn = 0
    prev = 0
    for k in range(n):
        s = offs[order[k]]
        ln = offs[order[k] + 1] - s
        lcp = 0
        while lcp < plen and lcp < ln and blob[prev + lcp] == blob[s + lcp]:
            lcp += 1
        for j in range(lcp, plen):
            t_skip[path[j]] = nn
        for j in range(lcp, ln):
            t_byte[nn] = blob[s + j]
            t_depth[nn] = j + 1
            path[j] = nn
            nn += 1
        plen = ln
        prev = s
        tok_node[k] = path[ln - 1]
    for j in range(plen):
        t_skip[path[j]] = nn
    return t_byte[:nn].copy(), t_depth[:nn].copy(), t_skip[:nn].copy(), tok_node


@njit(cache=True, boundscheck=False)
def _walk_trie(
    start: int,
    trans: np.ndarray,
    t_byte: np.ndarray,
    t_depth: np.ndarray,
    t_skip: np.ndarray,
    t_tok: np.ndarray,
    out: np.ndarray,
    miss: np.ndarray,
    cfg_stack: np.ndarray,
) -> int:  # pragma: no cover
    """Mark in ``out`` every token whose bytes lead from ``start`` to a live configuration.

    A subtree is skipped as soon as its first byte is rejected; a transition not yet computed is
    recorded in ``miss`` (as ``config * 256 + byte``) and its subtree skipped for this pass.  Nodes
    where no token ends point at the spare last slot of ``out``, so the store needs no branch (a
    branch per node here costs more than the table walk itself).
    """
    n = t_byte.shape[0]
    cap = miss.shape[0]
    n_miss = 0
    cfg_stack[0] = start
    i = 0
    while i < n:
        d = t_depth[i]
        p = cfg_stack[d - 1]
        b = t_byte[i]
        c = trans[p, b]
        if c < 0:
            if c == -2 and n_miss < cap:
                miss[n_miss] = p * 256 + b
                n_miss += 1
            i = t_skip[i]
            continue
        cfg_stack[d] = c
        out[t_tok[i]] = 1
        i += 1
    return n_miss


@njit(cache=True, boundscheck=False)
def _apply_mask(logits: np.ndarray, allowed: np.ndarray) -> int:  # pragma: no cover
    n_allowed = 0
    m = allowed.shape[0]
    for i in range(logits.shape[0]):
        if i < m and allowed[i]:
            n_allowed += 1
        else:
            logits[i] = -np.inf
    return n_allowed


_VOCAB_CACHE: weakref.WeakKeyDictionary[Any, TokenVocab] = weakref.WeakKeyDictionary()


class TokenVocab:
    """The vocabulary as the grammar sees it: each token's bytes, the end-of-generation ids, a byte trie.

    ``pieces[i]`` are the bytes token ``i`` adds to the text; llama.cpp uses
    ``token_to_piece(id, special=True)``, so control tokens count with their text.  Tokens with no
    bytes (or starting with a NUL byte) never match; end-of-generation tokens are allowed exactly
    when the grammar can end.  Building the trie takes ~0.1 s for 49k tokens.
    """

    def __init__(self, pieces: Sequence[bytes | None], eog_ids: Iterable[int] = ()) -> None:
        self.pieces: list[bytes] = [bytes(p) if p else b"" for p in pieces]
        n = self.n_vocab = len(self.pieces)
        self.eog_ids: frozenset[int] = frozenset(int(t) for t in eog_ids if 0 <= int(t) < n)
        lens = np.fromiter(map(len, self.pieces), dtype=np.int64, count=n)
        offs = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offs[1:])
        blob = np.frombuffer(b"".join(self.pieces), dtype=np.uint8)
        nonempty = lens > 0
        first = np.zeros(n, dtype=np.uint8)
        first[nonempty] = blob[offs[:-1][nonempty]]
        valid = nonempty & (first != 0)
        if self.eog_ids:
            valid[list(self.eog_ids)] = False
        self.valid = valid  # may match text or a token element
        self.eog_array = np.array(sorted(self.eog_ids), dtype=np.int64)
        # a NUL byte never matches, so pieces holding one stay out of the trie
        in_trie = valid.copy()
        in_trie[np.searchsorted(offs, np.flatnonzero(blob == 0), side="right") - 1] = False
        ordered = np.array(sorted(np.flatnonzero(in_trie).tolist(), key=self.pieces.__getitem__), dtype=np.int64)
        self.max_len = int(lens[ordered].max()) if ordered.size else 0
        if ordered.size:
            t_byte, t_depth, t_skip, tok_node = _build_trie(blob, offs, ordered, self.max_len)
        else:
            t_byte = np.zeros(0, np.uint8)
            t_depth = t_skip = tok_node = np.zeros(0, np.int32)
        self.t_byte, self.t_depth, self.t_skip = t_byte, t_depth, t_skip
        # one token per node in t_tok (n_vocab where none ends); tokens with equal pieces copy the first's verdict
        is_first = np.ones(ordered.size, dtype=np.bool_)
        is_first[1:] = tok_node[1:] != tok_node[:-1]
        self.t_tok = np.full(t_byte.shape[0], n, dtype=np.int32)
        self.t_tok[tok_node[is_first]] = ordered[is_first]
        self.dup_ids = ordered[~is_first]
        self.dup_primary = self.t_tok[tok_node[~is_first]].astype(np.int64)
        self._by_piece: dict[bytes, int] | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> TokenVocab:
        """Build from an :class:`lmap.tokenizer.Tokenizer` (cached per tokenizer object)."""
        try:
            cached = _VOCAB_CACHE.get(tokenizer)
        except TypeError:
            cached = None
        if cached is not None:
            return cached
        pieces = [tokenizer.token_to_piece(i, special=True) for i in range(tokenizer.n_vocab)]
        vocab = cls(pieces, tokenizer.eog_ids)
        with contextlib.suppress(TypeError):  # objects that cannot be weakly referenced go uncached
            _VOCAB_CACHE[tokenizer] = vocab
        return vocab

    @property
    def n_trie_nodes(self) -> int:
        """Number of nodes in the byte trie (what a full :meth:`Matcher.mask` visits at most)."""
        return int(self.t_byte.shape[0])

    def token_id(self, text: str) -> int:
        """The id whose piece is exactly ``text`` (for ``<text>`` grammar tokens); -1 if none."""
        if self._by_piece is None:
            self._by_piece = {}
            for i, p in enumerate(self.pieces):
                self._by_piece.setdefault(p, i)
        return self._by_piece.get(text.encode("utf-8", "surrogatepass"), -1)


# ============================================================================================== matcher


@dataclass
class MatcherStats:
    """Counters for measuring what the grammar costs during a generation."""

    checks: int = 0  # allows() calls
    rejected: int = 0  # allows() said no
    masks: int = 0  # mask() calls
    mask_cache_hits: int = 0
    mask_passes: int = 0  # trie walks (more than one when transitions had to be computed first)


class Matcher:
    """The state of one constrained generation over one vocabulary (see the module docstring).

    Cheap to create; many matchers of one grammar share its memo tables (single-threaded use).
    """

    def __init__(self, automaton: _Automaton, vocab: TokenVocab) -> None:
        self._a = automaton
        self._v = vocab
        self.stats = MatcherStats()
        self._miss = np.empty(1 << 16, dtype=np.int64)
        self._cfg_stack = np.empty(vocab.max_len + 1, dtype=np.int32)
        self._masks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._buf: np.ndarray | None = None
        self.reset()

    # --- state

    def reset(self) -> None:
        """Back to the start of the grammar."""
        a = self._a
        self._nodes = a.init_nodes
        self._gen = a.generation
        self._cfg = a.config(self._nodes)

    @property
    def state(self) -> tuple[int, ...]:
        """An opaque snapshot of the position in the grammar, for :meth:`restore`."""
        return self._nodes

    def restore(self, state: tuple[int, ...]) -> None:
        """Go back to a position saved with :attr:`state` (speculative decoding, retries)."""
        self._nodes = state
        self._gen = self._a.generation
        self._cfg = self._a.config(state)

    def _sync(self) -> int:
        a = self._a
        if self._gen != a.generation:
            self._gen = a.generation
            self._cfg = a.config(self._nodes)
        return self._cfg

    def _set(self, c: int) -> None:
        self._cfg = c
        self._nodes = self._a.cfg_nodes[c]

    @property
    def can_end(self) -> bool:
        """Whether the text so far is a complete match (end-of-generation tokens are allowed now)."""
        return self._a.cfg_accept[self._sync()]

    @property
    def is_complete(self) -> bool:
        """Whether the match is complete and nothing else can follow (only end-of-generation)."""
        c = self._sync()
        return self._a.cfg_nodes[c] == (0,)

    # --- single tokens

    def allows(self, token: int) -> bool:
        """Whether ``token`` may come next (the cheap check of a sampled token)."""
        self.stats.checks += 1
        a, v = self._a, self._v
        c = self._sync()
        token = int(token)
        if token in v.eog_ids:
            ok = a.cfg_accept[c]
        elif not 0 <= token < v.n_vocab or not v.valid[token]:
            ok = False
        else:
            ok = a.walk(c, v.pieces[token]) >= 0 or (bool(a.cfg_tok[c]) and bool(a.token_step(c, token)))
        if not ok:
            self.stats.rejected += 1
        return ok

    def accept(self, token: int) -> None:
        """Advance past ``token``; raises :class:`InvalidParameterError` if the grammar does not allow it.

        An end-of-generation token is accepted (without moving) only where :attr:`can_end`.
        """
        a, v = self._a, self._v
        a.maybe_reset()
        c = self._sync()
        token = int(token)
        if token in v.eog_ids:
            if not a.cfg_accept[c]:
                raise InvalidParameterError(f"end-of-generation token {token} before the grammar is complete")
            return
        piece = v.pieces[token] if 0 <= token < v.n_vocab else b""
        d = a.walk(c, piece) if 0 <= token < v.n_vocab and v.valid[token] else _DEAD
        if a.cfg_tok[c] and 0 <= token < v.n_vocab and v.valid[token]:
            extra = a.token_step(c, token)
            if extra:
                d = a.config((*(a.cfg_nodes[d] if d >= 0 else ()), *extra))
        if d < 0:
            raise InvalidParameterError(f"token {token} ({piece!r}) is not allowed by the grammar at this point")
        self._set(d)

    def accept_bytes(self, data: bytes | str) -> bool:
        """Advance past raw text if the grammar allows it (returns False and stays put otherwise)."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        self._a.maybe_reset()
        d = self._a.walk(self._sync(), data)
        if d < 0:
            return False
        self._set(d)
        return True

    # --- the whole vocabulary

    def allowed(self) -> np.ndarray:
        """A uint8 array over the vocabulary: 1 where the token may come next (do not modify)."""
        a, v = self._a, self._v
        c = self._sync()
        key = (a.generation, c)
        hit = self._masks.get(key)
        if hit is not None:
            self._masks.move_to_end(key)
            self.stats.mask_cache_hits += 1
            return hit
        full = np.zeros(v.n_vocab + 1, dtype=np.uint8)
        while True:
            self.stats.mask_passes += 1
            n_miss = _walk_trie(
                c, a.trans_np, v.t_byte, v.t_depth, v.t_skip, v.t_tok, full, self._miss, self._cfg_stack
            )
            if n_miss == 0:
                break
            for key_cb in np.unique(self._miss[:n_miss]).tolist():
                cfg, b = divmod(key_cb, 256)
                if a.trans[cfg][b] == _UNKNOWN:
                    a.transition(cfg, b)
        out = full[: v.n_vocab]
        if v.dup_ids.size:
            out[v.dup_ids] = out[v.dup_primary]
        et, ev, npos = a.prog.etype, a.prog.evalue, a.node_pos
        for n in a.cfg_tok[c]:
            pos = npos[n]
            tok = ev[pos]
            if et[pos] == _TOKEN:
                if 0 <= tok < v.n_vocab and v.valid[tok]:
                    out[tok] = 1
            else:
                keep = out[tok] if 0 <= tok < v.n_vocab else 0
                out |= v.valid.view(np.uint8)
                if 0 <= tok < v.n_vocab:
                    out[tok] = keep
        if v.eog_array.size:
            out[v.eog_array] = 1 if a.cfg_accept[c] else 0
        if self._gen == a.generation:
            self._masks[key] = out
            if len(self._masks) > _MASK_CACHE:
                self._masks.popitem(last=False)
        return out

    def mask(self, logits: np.ndarray) -> int:
        """Set ``logits`` (float32, n_vocab; in place) to -inf for every token the grammar rejects now.

        Returns the number of tokens left; logits past the vocabulary (padded output rows) are masked.
        """
        self.stats.masks += 1
        self._a.maybe_reset()
        return int(_apply_mask(logits, self.allowed()))

    def masked(self, logits: np.ndarray) -> np.ndarray:
        """A masked float32 copy of ``logits`` in a buffer owned by the matcher (reused across calls)."""
        if self._buf is None or self._buf.shape[0] != logits.shape[0]:
            self._buf = np.empty(logits.shape[0], dtype=np.float32)
        np.copyto(self._buf, logits)
        if self.mask(self._buf) == 0:
            raise LmapError("the grammar allows no token of the vocabulary at this point (the text cannot go on)")
        return self._buf


def sample_with_grammar(sample: Callable[[np.ndarray], int], logits: np.ndarray, matcher: Matcher) -> int:
    """Draw with ``sample(logits)``; keep the token if the grammar allows it, else mask and draw again.

    As llama.cpp's ``common_sampler_sample``: the full-vocabulary mask is paid only when the
    unconstrained choice breaks the grammar.  ``logits`` is not modified.  Does not call ``accept``.
    """
    tok = int(sample(logits))
    if matcher.allows(tok):
        return tok
    return int(sample(matcher.masked(logits)))


# ============================================================================================== grammar


class Grammar:
    """A compiled grammar: build with :meth:`from_gbnf`, :meth:`from_json_schema`, :meth:`json_object`."""

    def __init__(self, parsed: ParsedGrammar, root: str = "root", *, name: str = "grammar") -> None:
        if root not in parsed.symbol_ids:
            raise InvalidParameterError(f"{name}: no rule named '{root}' (the start rule): define '{root} ::= ...'")
        cycle = _left_recursion(parsed)
        if cycle is not None:
            chain = " -> ".join(parsed.rule_name(i) for i in cycle)
            raise InvalidParameterError(
                f"{name}: left recursion is not supported: rule '{parsed.rule_name(cycle[0])}' can begin with "
                f"itself ({chain}); rewrite it with a repetition, e.g. 'list ::= item (\",\" item)*'"
            )
        self.parsed = parsed
        self.root = root
        self.name = name
        self._root_id = parsed.symbol_ids[root]
        self._automata: dict[tuple[int, ...], _Automaton] = {}
        self._text_automaton()  # compile now so that errors surface here

    # --- construction

    @classmethod
    def from_gbnf(cls, text: str, root: str = "root", *, name: str = "grammar") -> Grammar:
        """Parse GBNF text (llama.cpp's ``grammar=``); errors name ``name``, the line and the column."""
        return cls(parse_gbnf(text, name=name), root, name=name)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], root: str = "root") -> Grammar:
        """Read a ``.gbnf`` file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise InvalidParameterError(f"cannot read grammar file {p}: {e.strerror}") from e
        return cls.from_gbnf(text, root, name=str(p))

    @classmethod
    def from_json_schema(cls, schema: Mapping[str, Any] | str | bool) -> Grammar:
        """Compile a JSON schema (dict or JSON text) as llama.cpp's ``json_schema_to_grammar``."""
        from .json_schema import json_schema_to_gbnf

        return cls.from_gbnf(json_schema_to_gbnf(schema), name="grammar from JSON schema")

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (``response_format: {"type": "json_object"}``)."""
        return cls.from_json_schema({"type": "object"})

    @classmethod
    def from_response_format(cls, response_format: Mapping[str, Any] | None) -> Grammar | None:
        """The grammar for an OpenAI ``response_format`` (None for ``text`` or no format), as llama.cpp's server.

        ``{"type": "json_object"}`` (optionally with ``"schema"``) and
        ``{"type": "json_schema", "json_schema": {"schema": {...}}}``; an empty schema means any object.
        """
        if response_format is None:
            return None
        if not isinstance(response_format, Mapping):
            raise InvalidParameterError("response_format must be an object like {'type': 'json_object'}")
        kind = response_format.get("type", "")
        if kind in ("", "text"):
            return None
        if kind == "json_object":
            schema: Any = response_format.get("schema") or {}
        elif kind == "json_schema":
            wrapper = response_format.get("json_schema") or {}
            if not isinstance(wrapper, Mapping):
                raise InvalidParameterError("response_format.json_schema must be an object with a 'schema'")
            schema = wrapper.get("schema") or {}
        else:
            raise InvalidParameterError(
                f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}"
            )
        if isinstance(schema, Mapping) and not schema:
            schema = {"type": "object"}
        return cls.from_json_schema(schema)

    # --- inspection

    @property
    def symbol_ids(self) -> dict[str, int]:
        """Rule name -> id, as llama.cpp's ``llama_grammar_parser::symbol_ids``."""
        return self.parsed.symbol_ids

    @property
    def rules(self) -> list[list[tuple[int, int]]]:
        """llama.cpp's parsed rules: lists of ``(ElementType, value)``."""
        return self.parsed.rules

    @property
    def source(self) -> str:
        """The GBNF text."""
        return self.parsed.source

    def __repr__(self) -> str:
        return f"Grammar({self.name!r}, root={self.root!r}, rules={len(self.parsed.rules)})"

    # --- matching

    def _automaton(self, token_ids: tuple[int, ...]) -> _Automaton:
        a = self._automata.get(token_ids)
        if a is None:
            a = self._automata[token_ids] = _Automaton(_Program(self.parsed, self._root_id, token_ids))
        return a

    def _text_automaton(self) -> _Automaton:
        return self._automaton(tuple(-1 for _ in self.parsed.token_texts))

    def matcher(self, vocab: TokenVocab | Sequence[bytes], eog_ids: Iterable[int] = ()) -> Matcher:
        """A fresh matcher over ``vocab`` (a :class:`TokenVocab`, or token pieces plus ``eog_ids``)."""
        if not isinstance(vocab, TokenVocab):
            vocab = TokenVocab(vocab, eog_ids)
        ids = []
        for text in self.parsed.token_texts:
            tid = vocab.token_id(text)
            if tid < 0:
                raise InvalidParameterError(f"{self.name}: token {text} is not a single token of the vocabulary")
            ids.append(tid)
        return Matcher(self._automaton(tuple(ids)), vocab)

    def matches(self, text: str | bytes) -> bool:
        """Whether the whole ``text`` is in the grammar's language (no tokenizer involved)."""
        data = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
        a = self._text_automaton()
        a.maybe_reset()
        c = a.walk(a.config(a.init_nodes), data)
        return c >= 0 and a.cfg_accept[c]
