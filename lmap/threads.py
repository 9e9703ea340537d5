"""One thread count for all of lmap's compute: Numba's kernels and NumPy's BLAS.

Decode runs in Numba (``prange`` over TBB); prefill's matrix products run in the BLAS
NumPy was built with, which keeps its own pool (all cores by default). llama.cpp's ``-t``
bounds both, so ``n_threads`` / ``-t`` here does too; threadpoolctl is the maintained way
to reach OpenBLAS / MKL / BLIS pools from Python.
"""

from __future__ import annotations

import numba
from threadpoolctl import threadpool_info, threadpool_limits

__all__ = ["set_threads", "blas_threads"]


def set_threads(n: int) -> int:
    """Use ``n`` threads (clipped to Numba's pool size) for kernels and BLAS; returns the count used."""
    n = max(1, min(int(n), int(numba.config.NUMBA_NUM_THREADS)))
    numba.set_num_threads(n)
    threadpool_limits(n, user_api="blas")
    return n


def blas_threads() -> int | None:
    """Threads of the first BLAS pool NumPy loaded (None if none is found)."""
    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return int(pool["num_threads"])
    return None
