"""Cutting special tokens out of text before tokenization (llama.cpp's ``tokenizer_st_partition``).

llama.cpp takes the special tokens longest first and, for each, carves every
occurrence out of the text fragments that are still raw.  The order matters: a
longer token wins over a shorter one that starts earlier and overlaps it, which a
single leftmost-longest regex alternation would get wrong.  Control and unknown
tokens are matched only with ``parse_special``; user-defined tokens always are.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

T = TypeVar("T", str, bytes)

# C isspace() in the "C" locale, which is what llama.cpp's lstrip/rstrip use
_C_SPACE_STR = " \t\n\v\f\r"
_C_SPACE_BYTES = frozenset(b" \t\n\v\f\r")


class Special:
    """One token that is matched literally in text."""

    __slots__ = ("bytes_", "id", "lstrip", "parse_only", "rstrip", "text")

    def __init__(self, token_id: int, text: str, *, parse_only: bool, lstrip: bool, rstrip: bool) -> None:
        self.id = token_id
        self.text = text
        self.bytes_ = text.encode("utf-8", "surrogateescape")
        self.parse_only = parse_only  # control/unknown: only with parse_special
        self.lstrip = lstrip
        self.rstrip = rstrip


class SpecialMatcher:
    """The special tokens of a vocabulary in llama.cpp's order, with a fast test for which occur in a text."""

    # Below this many candidates, testing each with ``in`` is cheaper than the trie walk.
    _TRIE_MIN = 48

    def __init__(self, specials: Sequence[Special]) -> None:
        self.specials = list(specials)
        self._modes: dict[bool, tuple[list[Special], Any]] = {}

    def active(self, parse_special: bool) -> list[Special]:
        """The specials matched under ``parse_special``, longest first."""
        return self._mode(parse_special)[0]

    def present(self, text: str | bytes, parse_special: bool) -> list[Special]:
        """The active specials that occur in ``text``, in llama.cpp's order."""
        active, finder = self._mode(parse_special)
        if finder is None or isinstance(text, bytes):
            return [sp for sp in active if (sp.bytes_ if isinstance(text, bytes) else sp.text) in text]
        trie, starts, max_len = finder
        found: set[int] = set()
        seen: set[str] = set()
        for m in starts.finditer(text):
            p = m.start()
            window = text[p : p + max_len]
            if window in seen:  # runs (e.g. of spaces) repeat the same walk
                continue
            seen.add(window)
            node = trie
            for ch in window:
                node = node.get(ch)
                if node is None:
                    break
                idx = node.get("")
                if idx is not None:
                    found.add(idx)
        return [active[i] for i in sorted(found)]

    def _mode(self, parse_special: bool) -> tuple[list[Special], Any]:
        mode = self._modes.get(parse_special)
        if mode is None:
            active = [sp for sp in self.specials if parse_special or not sp.parse_only]
            finder = None
            if len(active) >= self._TRIE_MIN:
                # A trie over the texts finds every special starting at a position in one
                # walk; only positions holding a possible first character are visited.
                trie: dict[str, Any] = {}
                for i, sp in enumerate(active):
                    node = trie
                    for ch in sp.text:
                        node = node.setdefault(ch, {})
                    node[""] = i
                firsts = sorted({sp.text[0] for sp in active})
                starts = re.compile("[" + "".join(re.escape(c) for c in firsts) + "]")
                finder = (trie, starts, max(len(sp.text) for sp in active))
            mode = self._modes[parse_special] = (active, finder)
        return mode


def partition(text: T, specials: Sequence[Special], parse_special: bool) -> list[T | int]:
    """Split ``text`` into raw pieces and special-token ids, in order.

    ``specials`` must be in llama.cpp's order (longest text first).  Works on ``str``
    and on ``bytes`` alike; the two agree whenever the bytes are valid UTF-8.
    """
    if not text:
        return []
    is_bytes = isinstance(text, bytes)
    # A fragment is (start, end) of raw text or an int token id.
    frags: list[tuple[int, int] | int] = [(0, len(text))]
    for sp in specials:
        if sp.parse_only and not parse_special:
            continue
        needle = sp.bytes_ if is_bytes else sp.text
        if needle not in text:  # cheap filter: most specials never occur
            continue
        out: list[tuple[int, int] | int] = []
        for frag in frags:
            if isinstance(frag, int):
                out.append(frag)
                continue
            start, end = frag
            while True:
                match = text.find(needle, start, end)  # type: ignore[arg-type]
                if match < 0:
                    out.append((start, end))
                    break
                left_end = match
                if sp.lstrip:
                    while left_end > start and _is_c_space(text, left_end - 1, is_bytes):
                        left_end -= 1
                if left_end > start:
                    out.append((start, left_end))
                out.append(sp.id)
                start = match + len(needle)
                if sp.rstrip:
                    while start < end and _is_c_space(text, start, is_bytes):
                        start += 1
                if start >= end:
                    break
        frags = out
    return [f if isinstance(f, int) else text[f[0] : f[1]] for f in frags]


def _is_c_space(text: str | bytes, i: int, is_bytes: bool) -> bool:
    if is_bytes:
        return text[i] in _C_SPACE_BYTES  # type: ignore[operator]
    return text[i] in _C_SPACE_STR  # type: ignore[operator]
