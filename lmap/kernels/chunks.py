"""Each format's chunk kernel (simd_multi.py) as a C callable, compiled (or loaded) on first use.

The team's loop (team.py) calls a job's kernel through its address, so it is compiled
once and knows no format. Compiling all twelve formats' kernels into it took ~10 s on a
first run; this way a model pays only for the formats it holds. Each function is top
level so that Numba's cache can find it again (closures are not cached).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

from numba import cfunc

from . import simd_multi as M


def _q8_0(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q8_0(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q4_0(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q4_0(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q4_1(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q4_1(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q5_0(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q5_0(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q5_1(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q5_1(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _iq4_nl(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_iq4_nl(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q2_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q2_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q3_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q3_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q4_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q4_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q5_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q5_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _q6_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_q6_k(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


def _iq4_xs(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    M.chunk_iq4_xs(w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


# format -> (its chunk function, whether its activations are Q8_K: super-blocks of 256)
CHUNKS = {
    "Q8_0": (_q8_0, False),
    "Q4_0": (_q4_0, False),
    "Q4_1": (_q4_1, False),
    "Q5_0": (_q5_0, False),
    "Q5_1": (_q5_1, False),
    "IQ4_NL": (_iq4_nl, False),
    "Q2_K": (_q2_k, True),
    "Q3_K": (_q3_k, True),
    "Q4_K": (_q4_k, True),
    "Q5_K": (_q5_k, True),
    "Q6_K": (_q6_k, True),
    "IQ4_XS": (_iq4_xs, True),
}


class CfuncTable:
    """Compiled C callables of one signature, made (or loaded from Numba's cache) on first use.

    The compiled loops that call them take an address, so they are compiled once and know no
    format; the table keeps each cfunc (and so its code) alive.
    """

    def __init__(self, sig: object, funcs: Mapping[Any, Callable[..., None]]) -> None:
        self._sig = sig
        self._funcs = funcs
        self._compiled: dict[Any, object] = {}
        self._addresses: dict[Any, int] = {}
        self._lock = threading.Lock()

    def address(self, key: Any) -> int:
        a = self._addresses.get(key)
        if a is None:
            with self._lock:
                a = self._addresses.get(key)
                if a is None:
                    f = cfunc(self._sig, cache=True)(self._funcs[key])
                    self._compiled[key] = f
                    a = self._addresses[key] = f.address
        return a


_CHUNKS = CfuncTable(M.SIG, {fmt: f for fmt, (f, _) in CHUNKS.items()})


def address(fmt: str) -> int:
    """The native address of ``fmt``'s chunk kernel (void(int64 x 13)), compiling it on first use."""
    return _CHUNKS.address(fmt)
