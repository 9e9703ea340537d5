"""Cutting special tokens out of text before tokenization (llama.cpp's ``tokenizer_st_partition``).

llama.cpp takes the special tokens longest first and, for each, carves every
occurrence out of the text fragments that are still raw.  The order matters: a
longer token wins over a shorter one that starts earlier and overlaps it, which a
single leftmost-longest regex alternation would get wrong.  Control and unknown
tokens are matched only with ``parse_special``; user-defined tokens always are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from ..string_array import StringArray

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


PARSE_ONLY, LSTRIP, RSTRIP = 1, 2, 4  # bits of SpecialMatcher's flags


class SpecialMatcher:
    """The special tokens of a vocabulary in llama.cpp's order, with a fast test for which occur in a text.

    Kept as token ids and flag bits, not as objects: gemma3 has 6 414 such tokens (6 250 of them
    ``<unusedN>`` control tokens) and a :class:`Special` each took 1.1 MiB, a dict trie over
    their texts 2.6 MiB more. Each mode (``parse_special`` or not) keeps its tokens' texts sorted
    by their bytes (a :class:`~lmap.string_array.StringArray`, ~100 kB for gemma3), and one
    compiled pass (``lmap.kernels.strings.mark_occurring``) finds the ones that occur in a text;
    only those become :class:`Special` objects.
    """

    def __init__(self, tokens: StringArray, ids: Sequence[int], flags: Sequence[int]) -> None:
        #: int32 [k]: the special token ids, longest text first (ties by id)
        self.ids = np.asarray(ids, dtype=np.int32)
        #: uint8 [k]: PARSE_ONLY | LSTRIP | RSTRIP per id
        self.flags = np.asarray(flags, dtype=np.uint8)
        self._tokens = tokens
        self._objects: dict[int, Special] = {}  # index in ``ids`` -> its Special, made once needed
        self._modes: dict[bool, tuple[np.ndarray, StringArray, np.ndarray, np.ndarray]] = {}

    def special(self, k: int) -> Special:
        """The :class:`Special` of ``ids[k]``."""
        sp = self._objects.get(k)
        if sp is None:
            f = int(self.flags[k])
            tid = int(self.ids[k])
            sp = Special(
                tid,
                self._tokens[tid],
                parse_only=bool(f & PARSE_ONLY),
                lstrip=bool(f & LSTRIP),
                rstrip=bool(f & RSTRIP),
            )
            self._objects[k] = sp
        return sp

    def active(self, parse_special: bool) -> list[Special]:
        """The specials matched under ``parse_special``, longest first."""
        return [self.special(k) for k in self._mode(parse_special)[0].tolist()]

    def present(self, text: str | bytes, parse_special: bool) -> list[Special]:
        """The active specials that occur in ``text``, in llama.cpp's order."""
        from ..kernels.strings import mark_occurring

        active, texts, order, firsts = self._mode(parse_special)
        if not active.shape[0] or not text:
            return []
        if isinstance(text, str):
            try:
                data = text.encode("utf-8")  # a UTF-8 match starts and ends on characters: a str match
            except UnicodeEncodeError:  # lone surrogates: as str
                return [sp for sp in self.active(parse_special) if sp.text in text]
        else:
            data = text
        found = np.zeros(active.shape[0], dtype=np.bool_)
        mark_occurring(np.frombuffer(data, dtype=np.uint8), texts.data, texts.offsets, texts.gap, firsts, found)
        return [self.special(k) for k in np.sort(order[found]).tolist()]

    def _mode(self, parse_special: bool) -> tuple[np.ndarray, StringArray, np.ndarray, np.ndarray]:
        mode = self._modes.get(parse_special)
        if mode is None:
            # the indices (in ``ids``) of the active specials; their texts sorted by bytes, each
            # one's index in ``ids``, and the bytes that start one
            active = np.arange(self.ids.shape[0]) if parse_special else np.flatnonzero(self.flags & PARSE_ONLY == 0)
            raw = [self._tokens.raw(t) for t in self.ids[active].tolist()]
            by_bytes = sorted(range(len(raw)), key=raw.__getitem__)
            data = np.frombuffer(b"\0".join([raw[j] for j in by_bytes]), dtype=np.uint8)
            offsets = np.zeros(len(raw) + 1, dtype=np.int64)
            np.cumsum([len(raw[j]) + 1 for j in by_bytes], out=offsets[1:])
            firsts = np.zeros(256, dtype=np.bool_)
            firsts[[r[0] for r in raw if r]] = True
            order = active[np.asarray(by_bytes, dtype=np.int64)]
            mode = self._modes[parse_special] = (active, StringArray(data, offsets), order, firsts)
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
