"""Element formats: F32, F16 and BF16 rows (views typed float32 / uint16 / uint16)."""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..kernels.half import bf16_to_float, half_to_float


@njit(cache=True, fastmath=True)
def dequantize_rows_f32(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    for r in range(r0, r1):
        for j in range(w.shape[1]):
            out[r - r0, j] = w[r, j]


@njit(cache=True, fastmath=True, parallel=True)
def matvec_f32(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += w[r, j] * x[j]
        out[r] = acc


@njit(cache=True, fastmath=True)
def dequantize_rows_f16(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    for r in range(r0, r1):
        for j in range(w.shape[1]):
            out[r - r0, j] = half_to_float(w[r, j])


@njit(cache=True, fastmath=True, parallel=True)
def matvec_f16(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += half_to_float(w[r, j]) * x[j]
        out[r] = acc


@njit(cache=True, fastmath=True)
def dequantize_rows_bf16(w: np.ndarray, r0: int, r1: int, out: np.ndarray) -> None:
    for r in range(r0, r1):
        for j in range(w.shape[1]):
            out[r - r0, j] = bf16_to_float(w[r, j])


@njit(cache=True, fastmath=True, parallel=True)
def matvec_bf16(w: np.ndarray, x: np.ndarray, out: np.ndarray) -> None:
    for r in prange(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += bf16_to_float(w[r, j]) * x[j]
        out[r] = acc
