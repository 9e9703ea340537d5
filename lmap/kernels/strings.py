"""GGUF string arrays (a vocabulary, its merges) gathered in two compiled passes.

Each string is a u64 byte length then the bytes, so finding the n-th needs the n-1 before it:
a sequential scan, 0.5 µs a string in Python (40 ms for SmolLM2's 98k vocabulary and merges,
130 ms for gemma3's 262k tokens). Compiled, the scan copies the strings out NUL-separated in a
few milliseconds, and one decode and one ``str.split`` (both C loops) make the Python strings.
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
def join_strings(buf: np.ndarray, pos: int, n: int, out: np.ndarray) -> bool:  # pragma: no cover - compiled
    """Copy the records :func:`measure_strings` measured into ``out``, NUL-separated; False when a
    string holds a NUL byte itself (the join would be ambiguous)."""
    p = pos
    o = 0
    for i in range(n):
        ln = _length(buf, p)
        p += 8
        if i > 0:
            out[o] = 0
            o += 1
        for k in range(ln):
            b = buf[p + k]
            if b == 0:
                return False
            out[o + k] = b
        o += ln
        p += ln
    return True
