"""Argument checks shared by the kernels that walk rows through raw addresses."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def check_rows(w: np.ndarray, x: np.ndarray) -> None:
    # the vector-IR row dots read w's rows and x through bare addresses: both must be dense
    if w.strides[1] != 1 or x.strides[0] != x.itemsize:
        raise ValueError("matvec needs rows of contiguous bytes and a contiguous x")
