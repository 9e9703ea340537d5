"""A long GGUF string array (a vocabulary, its merges) kept as its UTF-8 bytes.

As Python objects, gemma3's 262 144 tokens take ~20 MiB of ``str`` and ~15 more for the
text -> id dict a tokenizer needs; as bytes, offsets and a compiled hash table they take 3 MiB
of anonymous memory (int32 offsets 1 MiB, the table 2 MiB: the 2.5 MiB of texts stay in the
GGUF file's map, where the file has them), and building them is a few milliseconds of compiled
code instead of ~60 ms of object creation.
Items are decoded on access (``surrogateescape``: bytes that are not UTF-8 come back as the
surrogates ``GGUFFile`` has always used for them, and encode back to the same bytes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import overload

import numpy as np


def offset_dtype(end: int) -> type[np.signedinteger]:
    """int32 offsets (half the memory of int64: 1 MiB for gemma3's vocabulary) while they fit."""
    return np.int32 if end < 2**31 else np.int64


class StringArray(Sequence[str]):
    """Read-only strings over one byte buffer: string ``i`` is ``data[offsets[i] : offsets[i + 1] - gap]``.

    ``gap`` is the bytes between one string's end and the next one's start: 1 for strings packed
    with a NUL between them (:meth:`from_strings`), 8 for a GGUF string array, where the next
    string's u64 length sits there, so that ``data`` can be the file's own bytes (``GGUFFile``
    leaves them in its map: file-backed pages, not anonymous memory, and no copy to make).

    A ``Sequence[str]`` (indexing, slicing to a list, ``len``, iteration, ``==`` with any sequence),
    plus :meth:`find`, a hash lookup of a text's index. ``list(a)`` or :meth:`tolist` gives a list.
    """

    __slots__ = ("data", "offsets", "gap", "_clean", "_table", "_first_table")

    def __init__(self, data: np.ndarray, offsets: np.ndarray, *, gap: int = 1, clean: bool | None = None) -> None:
        #: uint8 [offsets[-1] - gap]: the strings, ``gap`` bytes between one and the next
        self.data = data
        #: int32 [n + 1] (int64 past 2 GiB): where each string starts; offsets[n] = len(data) + gap
        self.offsets = offsets
        #: bytes between two strings: 1 (a NUL) or 8 (a GGUF length)
        self.gap = gap
        self._clean = clean  # no string holds a NUL (one decode and one split give them all); None: not known yet
        self._table: np.ndarray | None = None
        self._first_table: np.ndarray | None = None

    @classmethod
    def from_strings(cls, strings: Iterable[str]) -> StringArray:
        """Pack Python strings (encoded with ``surrogateescape``, as ``GGUFFile`` decodes them)."""
        raw = [s.encode("utf-8", "surrogateescape") for s in strings]
        offsets = np.zeros(len(raw) + 1, dtype=offset_dtype(sum(map(len, raw)) + len(raw)))
        np.cumsum([len(r) + 1 for r in raw], out=offsets[1:])
        data = np.frombuffer(b"\0".join(raw), dtype=np.uint8)
        return cls(data, offsets, clean=not any(b"\0" in r for r in raw))

    def __len__(self) -> int:
        return self.offsets.shape[0] - 1

    @overload
    def __getitem__(self, i: int) -> str: ...
    @overload
    def __getitem__(self, i: slice) -> list[str]: ...
    def __getitem__(self, i: int | slice) -> str | list[str]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.raw(i).decode("utf-8", "surrogateescape")

    def raw(self, i: int) -> bytes:
        """String ``i`` as its bytes."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"string index {i} out of range for {n} strings")
        i %= n
        o = self.offsets
        return self.data[o[i] : o[i + 1] - self.gap].tobytes()

    def lengths(self) -> np.ndarray:
        """Each string's length in bytes."""
        return np.diff(self.offsets) - self.gap

    def __iter__(self) -> Iterator[str]:
        return iter(self.tolist())

    def tolist(self) -> list[str]:
        """Every string, as a list (one decode and one split when no string holds a NUL)."""
        if not len(self):
            return []
        packed, clean = self._packed()
        if clean:
            return str(memoryview(packed), "utf-8", "surrogateescape").split("\0")
        return [self[i] for i in range(len(self))]

    def _packed(self) -> tuple[np.ndarray, bool]:
        """The strings joined by NULs (``data`` itself when ``gap`` is 1), and whether none holds a NUL."""
        if self.gap == 1 and self._clean is not None:
            return self.data, self._clean
        from .kernels.strings import pack_strings

        n = len(self)
        out = np.empty(int(self.offsets[-1]) - self.gap * n + max(n - 1, 0), dtype=np.uint8)
        self._clean = bool(pack_strings(self.data, self.offsets, self.gap, out))
        return out, self._clean

    @property
    def table(self) -> np.ndarray:
        """int32 hash table of the strings' indices, a repeated text at its last index (as a dict
        built from the strings; see ``lmap.kernels.strings``), built on first use."""
        if self._table is None:
            self._table = self._build_table(first=False)
        return self._table

    @property
    def first_table(self) -> np.ndarray:
        """:attr:`table` with a repeated text at its first index (llama.cpp's BPE merge ranks)."""
        if self._first_table is None:
            self._first_table = self._build_table(first=True)
        return self._first_table

    def _build_table(self, *, first: bool) -> np.ndarray:
        from .kernels.strings import fill_table

        size = 1 << max(4, (2 * len(self) - 1).bit_length())  # at most half full
        table = np.full(size, -1, dtype=np.int32)
        fill_table(self.data, self.offsets, self.gap, table, first)
        return table

    def find(self, text: str) -> int:
        """The index of ``text``, -1 when absent; a text held twice gives its last index, as a
        dict built from the strings would (llama.cpp's ``token_to_id``)."""
        from .kernels.strings import find_string

        key = np.frombuffer(text.encode("utf-8", "surrogateescape"), dtype=np.uint8)
        return int(find_string(self.data, self.offsets, self.gap, self.table, key))

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and self.find(text) >= 0

    @property
    def nbytes(self) -> int:
        """Bytes spanned: the strings (with what lies between them), their offsets and the hash
        tables once built. ``data`` may be a view of a file's map (``GGUFFile``)."""
        tables = sum(t.nbytes for t in (self._table, self._first_table) if t is not None)
        return self.data.nbytes + self.offsets.nbytes + tables

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StringArray):
            if len(other) != len(self):
                return False
            if other.gap == self.gap:  # what lies between the strings follows from their lengths
                return np.array_equal(self.offsets, other.offsets) and np.array_equal(self.data, other.data)
            return np.array_equal(self.lengths(), other.lengths()) and np.array_equal(
                self._packed()[0], other._packed()[0]
            )
        if isinstance(other, Sequence) and not isinstance(other, str | bytes):
            return len(other) == len(self) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        n = len(self)
        head = ", ".join(repr(self[i]) for i in range(min(n, 3)))
        return f"StringArray([{head}{', ...' if n > 3 else ''}], {n} strings)"
