"""GGUF string arrays (a vocabulary, its merges) indexed in place by one compiled pass.

Each string is a u64 byte length then the bytes, so finding the n-th needs the n-1 before it:
a sequential scan, 0.5 µs a string in Python (40 ms for SmolLM2's 98k vocabulary and merges,
130 ms for gemma3's 262k tokens). Compiled, the scan only records where each string starts, in
a few milliseconds; the bytes stay where they are, in the file's map (``lmap.string_array.
StringArray`` with ``gap`` 8: the length of the next string sits between two strings), and
:func:`pack_strings` joins them with NULs, for one decode and one ``str.split`` (both C loops),
where a list of Python strings is wanted. Every kernel here takes a ``gap``: string ``i`` is
``data[offsets[i] : offsets[i + 1] - gap]`` (1 for NUL-separated strings, 8 for a GGUF array).
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
def string_offsets(buf: np.ndarray, pos: int, n: int, offsets: np.ndarray, limit: int) -> int:  # pragma: no cover
    """Where each of the ``n`` (u64 length, bytes) records of ``buf`` from ``pos`` starts, counted
    from ``pos``, in ``offsets[:n]``, and where the last one ends in ``offsets[n]``: with
    ``data = buf[pos + 8 : end]``, string ``i`` is ``data[offsets[i] : offsets[i + 1] - 8]``.
    Returns ``end`` (the offset in ``buf`` after the last record); ``-1 - i`` when record ``i``
    runs past the buffer; ``-2 - n`` when an offset would exceed ``limit`` (the largest value
    ``offsets`` holds) first."""
    size = buf.shape[0]
    p = pos
    for i in range(n):
        if p + 8 > size:
            return -1 - i
        ln = _length(buf, p)
        if p - pos > limit:
            return -2 - n
        offsets[i] = p - pos
        p += 8
        if ln < 0 or ln > size - p:
            return -1 - i
        p += ln
    if p - pos > limit:
        return -2 - n
    offsets[n] = p - pos
    return p


@njit(cache=True, nogil=True)
def pack_strings(data: np.ndarray, offsets: np.ndarray, gap: int, out: np.ndarray) -> bool:  # pragma: no cover
    """Copy the strings of ``data`` to ``out`` (their bytes and one less than their count),
    NUL-separated; False when a string holds a NUL byte itself (one decode and one split of
    ``out`` would then cut it)."""
    n = offsets.shape[0] - 1
    size = data.shape[0]
    cap = out.shape[0]
    o = 0
    for i in range(n):
        s = offsets[i]
        ln = offsets[i + 1] - gap - s
        k = 0
        while k < ln:  # 8 bytes at a time (a third faster on tokens of ~10 bytes), past the end
            if s + k + 8 <= size and o + k + 8 <= cap:  # where the next strings overwrite them
                for j in range(8):
                    out[o + k + j] = data[s + k + j]
                k += 8
            else:
                out[o + k] = data[s + k]
                k += 1
        o += ln
        if i + 1 < n:
            out[o] = 0
            o += 1
    nuls = 0
    for k in range(o):
        nuls += out[k] == 0
    return nuls == max(n - 1, 0)


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
    data: np.ndarray, offsets: np.ndarray, gap: int, i: int, key: np.ndarray, start: int, end: int
) -> bool:  # pragma: no cover - compiled
    s = offsets[i]
    if offsets[i + 1] - gap - s != end - start:
        return False
    for k in range(end - start):  # noqa: SIM110 - a loop Numba compiles, not a generator
        if data[s + k] != key[start + k]:
            return False
    return True


@njit(cache=True, nogil=True, inline="always")
def lookup(
    data: np.ndarray, offsets: np.ndarray, gap: int, table: np.ndarray, key: np.ndarray, start: int, end: int
) -> int:  # pragma: no cover - compiled
    """The index of the string ``key[start:end]``, -1 when absent."""
    mask = table.shape[0] - 1
    slot = np.int64(_hash(key, start, end) & np.uint64(mask))
    while True:
        i = table[slot]
        if i < 0:
            return -1
        if _same(data, offsets, gap, i, key, start, end):
            return i
        slot = (slot + 1) & mask


@njit(cache=True, nogil=True)
def find_string(
    data: np.ndarray, offsets: np.ndarray, gap: int, table: np.ndarray, key: np.ndarray
) -> int:  # pragma: no cover - compiled
    """:func:`lookup` of the whole of ``key``."""
    return lookup(data, offsets, gap, table, key, 0, key.shape[0])


@njit(cache=True, nogil=True, inline="always")
def lookup_pair(
    data: np.ndarray,
    offsets: np.ndarray,
    gap: int,
    table: np.ndarray,
    key: np.ndarray,
    s1: int,
    e1: int,
    s2: int,
    e2: int,
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
        if offsets[i + 1] - gap - s == n and data[s + n1] == 32:
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
def fill_table(
    data: np.ndarray, offsets: np.ndarray, gap: int, table: np.ndarray, first: bool
) -> None:  # pragma: no cover - compiled
    """Index every string into ``table`` (all -1, a power of two longer than the strings). A text
    that occurs twice maps to its last index, as ``dict(zip(strings, range(n)))`` (llama.cpp's
    ``token_to_id``), or with ``first`` to its first (llama.cpp's BPE merge ranks)."""
    mask = table.shape[0] - 1
    for i in range(offsets.shape[0] - 1):
        s = offsets[i]
        e = offsets[i + 1] - gap
        slot = np.int64(_hash(data, s, e) & np.uint64(mask))
        while True:
            j = table[slot]
            if j < 0:
                table[slot] = i
                break
            if _same(data, offsets, gap, j, data, s, e):
                if not first:
                    table[slot] = i
                break
            slot = (slot + 1) & mask


# --- which of many strings occur in a text: the special tokens matched literally ----------------


@njit(cache=True, nogil=True, inline="always")
def _bound(
    data: np.ndarray, offsets: np.ndarray, lo: int, hi: int, d: int, c: int, upper: bool
) -> int:  # pragma: no cover
    """First ``k`` in ``[lo, hi)`` whose byte ``d`` is ``>= c`` (``> c`` with ``upper``)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        b = data[offsets[mid] + d]
        if b < c or (upper and b == c):
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def mark_occurring(
    text: np.ndarray, data: np.ndarray, offsets: np.ndarray, gap: int, firsts: np.ndarray, found: np.ndarray
) -> None:  # pragma: no cover - compiled
    """Set ``found[k]`` for every string ``k`` that occurs in ``text`` (uint8). The strings must be
    sorted by their bytes and not empty; ``firsts`` (bool [256]) marks their first bytes.

    From each position that holds a first byte, the strings that match the text so far are a
    range of the sorted strings, narrowed byte by byte with two binary searches (a trie walk
    over the sorted array: a few bytes of memory per string, no node objects); a string as long
    as the match is at the range's front (a prefix sorts before its extensions)."""
    m = text.shape[0]
    n = offsets.shape[0] - 1
    for p in range(m):
        if not firsts[text[p]]:
            continue
        lo = 0
        hi = n
        d = 0
        while lo < hi:
            while lo < hi and offsets[lo + 1] - gap - offsets[lo] == d:
                found[lo] = True
                lo += 1
            if lo >= hi or p + d >= m:
                break
            c = text[p + d]
            lo2 = _bound(data, offsets, lo, hi, d, c, False)
            hi = _bound(data, offsets, lo2, hi, d, c, True)
            lo = lo2
            d += 1
