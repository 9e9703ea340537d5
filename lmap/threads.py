"""One thread count for all of lmap's compute: Numba's kernels and NumPy's BLAS.

Decode runs in Numba (``prange`` over TBB); prefill's matrix products run in the BLAS
NumPy was built with, which keeps its own pool (all cores by default). llama.cpp's ``-t``
bounds both, so ``n_threads`` / ``-t`` here does too; threadpoolctl is the maintained way
to reach OpenBLAS / MKL / BLIS pools from Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numba
from threadpoolctl import ThreadpoolController, threadpool_info, threadpool_limits

__all__ = ["set_threads", "blas_threads", "blas_single", "decode_threads"]

# Decode's spinning team (kernels/team.py) is sized by this, process-wide: numba.get_num_threads()
# is per calling thread and costs ~2 µs, too much to ask at each of a token's ~150 products.
_decode_threads = int(numba.config.NUMBA_NUM_THREADS)


def set_threads(n: int, blas: bool = True) -> int:
    """Use ``n`` threads (clipped to Numba's pool size) for kernels and BLAS; returns the count used."""
    global _decode_threads
    n = max(1, min(int(n), int(numba.config.NUMBA_NUM_THREADS)))
    numba.set_num_threads(n)
    _decode_threads = n
    if blas:
        threadpool_limits(n, user_api="blas")
    return n


def decode_threads() -> int:
    """Threads of decode's team: the count last given to :func:`set_threads`."""
    return _decode_threads


def blas_threads() -> int | None:
    """Threads of the first BLAS pool NumPy loaded (None if none is found)."""
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return int(pool["num_threads"])
    return None


_blas_libs: list[Any] | None = None


@contextmanager
def blas_single() -> Iterator[None]:
    """BLAS on one thread inside the block, restored after (a ~1 us call per pool, not threadpoolctl's scan)."""
    global _blas_libs
    if _blas_libs is None:
        _blas_libs = ThreadpoolController().select(user_api="blas").lib_controllers
    before = [lib.num_threads for lib in _blas_libs]
    for lib in _blas_libs:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(_blas_libs, before, strict=True):
            lib.set_num_threads(n)
