"""GGUF string arrays (a vocabulary, its merges) gathered in two compiled passes.

Each string is a u64 byte length then the bytes, so finding the n-th needs the n-1 before it:
a sequential scan, 0.5 µs a string in Python (40 ms for SmolLM2's 98k vocabulary and merges,
130 ms for gemma3's 262k tokens). Compiled, the scan copies the strings out NUL-separated in a
few milliseconds; a long array stays as those bytes (``lmap.string_array.StringArray``), and
one decode and one ``str.split`` (both C loops) make the Python strings where a list is wanted.
The caller allocates the output: a kernel that returns a new array loads Numba's array module
with it (17 ms of imports at start-up).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, inline="always")
def _length(buf: np.ndarray, p: int) -> int:  # pragma: no cover - compiled
    ln = np.int64(0)
    for k in range(8):
        ln |= np.int64(buf[p + k]) << (8 * k)
    return ln


@njit(cache=True, nogil=True)
def measure_strings(buf: np.ndarray, pos: int, n: int) -> tuple[int, int]:  # pragma: no cover - compiled
    """(bytes of the ``n`` (u64 length, bytes) records of ``buf`` from ``pos`` joined by NULs,
    offset after the last); the offset is -1 - i when record i runs past the buffer."""
    size = buf.shape[0]
    p = pos
    total = 0
    for i in range(n):
        if p + 8 > size:
            return 0, -1 - i
        ln = _length(buf, p)
        p += 8
        if ln < 0 or ln > size - p:
            return 0, -1 - i
        total += ln
        p += ln
    return total + max(n - 1, 0), p


@njit(cache=True, nogil=True)
def gather_strings(buf: np.ndarray, pos: int, n: int, out: np.ndarray, offsets: np.ndarray) -> bool:  # pragma: no cover
    """Copy the records :func:`measure_strings` measured into ``out``, NUL-separated, string ``i``
    at ``out[offsets[i] : offsets[i + 1] - 1]``; False when a string holds a NUL byte itself (one
    decode and one split of ``out`` would then cut it)."""
    p = pos
    o = 0
    clean = True
    for i in range(n):
        ln = _length(buf, p)
        p += 8
        offsets[i] = o
        for k in range(ln):
            b = buf[p + k]
            clean &= b != 0
            out[o + k] = b
        o += ln
        if i + 1 < n:
            out[o] = 0
        o += 1
        p += ln
    offsets[n] = o
    return clean


# --- a hash table over such strings: text -> index, as a dict, in a few MiB instead of ~35 -------
# FNV-1a over the bytes, open addressing with linear probing, -1 for an empty slot.


@njit(cache=True, nogil=True, inline="always")
def _hash(data: np.ndarray, start: int, end: int) -> int:  # pragma: no cover - compiled
    h = np.uint64(14695981039346656037)
    for k in range(start, end):
        h = (h ^ np.uint64(data[k])) * np.uint64(1099511628211)
    return h


@njit(cache=True, nogil=True, inline="always")
def _same(
    data: np.ndarray, offsets: np.ndarray, i: int, key: np.ndarray, start: int, end: int
) -> bool:  # pragma: no cover - compiled
    s = offsets[i]
    if offsets[i + 1] - 1 - s != end - start:
        return False
    for k in range(end - start):  # noqa: SIM110 - a loop Numba compiles, not a generator
        if data[s + k] != key[start + k]:
            return False
    return True


@njit(cache=True, nogil=True, inline="always")
def lookup(
    data: np.ndarray, offsets: np.ndarray, table: np.ndarray, key: np.ndarray, start: int, end: int
) -> int:  # pragma: no cover - compiled
    """The index of the string ``key[start:end]``, -1 when absent."""
    mask = table.shape[0] - 1
    slot = np.int64(_hash(key, start, end) & np.uint64(mask))
    while True:
        i = table[slot]
        if i < 0:
            return -1
        if _same(data, offsets, i, key, start, end):
            return i
        slot = (slot + 1) & mask


@njit(cache=True, nogil=True)
def find_string(data: np.ndarray, offsets: np.ndarray, table: np.ndarray, key: np.ndarray) -> int:  # pragma: no cover
    """:func:`lookup` of the whole of ``key``."""
    return lookup(data, offsets, table, key, 0, key.shape[0])


@njit(cache=True, nogil=True, inline="always")
def lookup_pair(
    data: np.ndarray, offsets: np.ndarray, table: np.ndarray, key: np.ndarray, s1: int, e1: int, s2: int, e2: int
) -> int:  # pragma: no cover - compiled
    """The index of the string ``key[s1:e1] + " " + key[s2:e2]`` (a BPE merge), -1 when absent."""
    h = np.uint64(14695981039346656037)
    prime = np.uint64(1099511628211)
    for k in range(s1, e1):
        h = (h ^ np.uint64(key[k])) * prime
    h = (h ^ np.uint64(32)) * prime
    for k in range(s2, e2):
        h = (h ^ np.uint64(key[k])) * prime
    mask = table.shape[0] - 1
    slot = np.int64(h & np.uint64(mask))
    n1 = e1 - s1
    n = n1 + 1 + e2 - s2
    while True:
        i = table[slot]
        if i < 0:
            return -1
        s = offsets[i]
        if offsets[i + 1] - 1 - s == n and data[s + n1] == 32:
            same = True
            for k in range(n1):
                if data[s + k] != key[s1 + k]:
                    same = False
                    break
            if same:
                for k in range(e2 - s2):
                    if data[s + n1 + 1 + k] != key[s2 + k]:
                        same = False
                        break
            if same:
                return i
        slot = (slot + 1) & mask


@njit(cache=True, nogil=True)
def fill_table(data: np.ndarray, offsets: np.ndarray, table: np.ndarray, first: bool) -> None:  # pragma: no cover
    """Index every string into ``table`` (all -1, a power of two longer than the strings). A text
    that occurs twice maps to its last index, as ``dict(zip(strings, range(n)))`` (llama.cpp's
    ``token_to_id``), or with ``first`` to its first (llama.cpp's BPE merge ranks)."""
    mask = table.shape[0] - 1
    for i in range(offsets.shape[0] - 1):
        s = offsets[i]
        e = offsets[i + 1] - 1
        slot = np.int64(_hash(data, s, e) & np.uint64(mask))
        while True:
            j = table[slot]
            if j < 0:
                table[slot] = i
                break
            if _same(data, offsets, j, data, s, e):
                if not first:
                    table[slot] = i
                break
            slot = (slot + 1) & mask
