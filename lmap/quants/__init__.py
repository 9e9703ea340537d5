"""Block formats and their kernels: one table from GGML type name to the code that reads it.

A new format drops in by adding a module with ``dequantize_rows`` and ``matvec``
and one line in ``KERNELS``. Everything above this package works on
:class:`QMatrix` and never looks at block layouts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numba
import numpy as np

from .. import kernels as _kernels  # noqa: F401  (threading layer set-up before numba compiles)
from ..errors import UnsupportedModelError
from ..kernels import ops
from . import floats, iq4, panels, q2_k, q3_k, q4_0, q4_1, q4_k, q5_0, q5_1, q5_k, q6_k, q8_0
from .formats import FORMATS, FORMATS_BY_NAME, BlockFormat
from .q8_k import quantize_q8_k, round_q8_k

if TYPE_CHECKING:
    from ..gguf import TensorInfo

__all__ = ["KERNELS", "ActScratch", "QMatrix", "BlockFormat", "FORMATS", "FORMATS_BY_NAME"]


class ActScratch:
    """Buffers for activations rounded or quantized the way llama.cpp does before a quantized product.

    f32 holds rounded floats for the BLAS path (prefill) or, in the same memory, the int8
    activations and scales of the integer panel GEMM (:meth:`int8`); q int8 [max_cols], d and s
    float32 [max_cols / 32] hold one quantized vector for the integer decode path.

    ``float_rows``: how many rows of rounded floats f32 must hold at once (default n_batch). A
    model whose every prompt product is integer (``needs_tile`` false) passes 0: f32 is then
    sized for the int8 activations (1.5 bytes per value at most instead of 4: gemma3 at n_batch
    512 takes 1.5 MiB, not 4) and a float product that still comes (an F16 matrix met by a
    caller outside the forward pass) runs its rows in chunks of what fits.
    """

    def __init__(self, n_batch: int, max_cols: int, float_rows: int | None = None) -> None:
        float_rows = n_batch if float_rows is None else float_rows
        self.f32 = np.zeros(max(float_rows * max_cols, self.int8_floats(n_batch, max_cols), max_cols), np.float32)
        self.q = np.zeros(max_cols, np.int8)
        self.d = np.zeros(max(max_cols // 32, 1), np.float32)
        self.s = np.zeros(max(max_cols // 32, 1), np.float32)
        # the integer prompt GEMM (panels.py): one weight panel per thread, where the CPU runs it
        self.panels = (
            np.zeros((numba.config.NUMBA_NUM_THREADS, panels.panel_bytes(max_cols)), np.uint8)
            if panels.VNNI512
            else None
        )
        self.counter = np.zeros(1, np.int64)

    @staticmethod
    def int8_floats(n: int, k: int) -> int:
        """float32 elements :meth:`int8` needs for [n, k] activations in its smallest blocks (16)."""
        return -(-(-(-n * k // 4) * 4 + 8 * n * (k // 16)) // 4)

    def rounded(self, x: np.ndarray, activation: Callable[..., None]) -> Iterator[tuple[int, np.ndarray]]:
        """(r0, x[r0 : r0 + m] rounded by ``activation`` into f32) for consecutive chunks of rows:
        one chunk (the whole batch) unless f32 was sized for int8 activations only."""
        step = max(1, self.f32.size // x.shape[1])
        for r0 in range(0, x.shape[0], step):
            xs = x[r0 : r0 + step]
            xr = self.f32[: xs.size].reshape(xs.shape)
            activation(xs, xr)
            yield r0, xr

    @property
    def nbytes(self) -> int:
        extra = self.panels.nbytes + self.counter.nbytes if self.panels is not None else 0
        return self.f32.nbytes + self.q.nbytes + self.d.nbytes + self.s.nbytes + extra

    def int8(self, n: int, k: int, sub: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Views (xq int8 [n, k], dx, xs float32 [n, k / sub]) for the integer prompt GEMM.

        They share ``f32``'s memory (1.5 bytes per activation of its 4), which the integer path
        does not otherwise use, so the plan has no buffer for them.
        """
        raw = self.f32.view(np.uint8)
        ns = k // sub
        xq = raw[: n * k].view(np.int8).reshape(n, k)
        at = -(-n * k // 4) * 4
        dx = raw[at : at + 4 * n * ns].view(np.float32).reshape(n, ns)
        xs = raw[at + 4 * n * ns : at + 8 * n * ns].view(np.float32).reshape(n, ns)
        return xq, dx, xs


@dataclass(frozen=True)
class Kernels:
    view_dtype: type  # dtype of the array the kernels take: uint8 bytes for block formats
    dequantize_rows: Callable[..., None]  # (w, r0, r1, out[r1 - r0, n]) -> None
    matvec: Callable[..., None]  # (w, x[n], out[rows]) -> None
    # llama.cpp's vec_dot_type: how it rounds activations before multiplying them by this format
    activation: Callable[..., None] | None = None  # (x[n, k], out[n, k]) -> None
    # integer product with activations quantized by ``quantize``: (w, xq, xd, xs, out[rows]) -> None
    matvec_q8: Callable[..., None] | None = None
    # (x[k], xq int8[k], xd, xs) -> None: Q8_0 blocks of 32 or Q8_K blocks of 256, as llama.cpp pairs them
    quantize: Callable[..., None] = ops.quantize_q8


KERNELS: dict[str, Kernels] = {
    "F32": Kernels(np.float32, floats.dequantize_rows_f32, floats.matvec_f32),
    "F16": Kernels(np.uint16, floats.dequantize_rows_f16, floats.matvec_f16, ops.round_f16),
    "BF16": Kernels(np.uint16, floats.dequantize_rows_bf16, floats.matvec_bf16),
    "Q8_0": Kernels(np.uint8, q8_0.dequantize_rows, q8_0.matvec, ops.round_q8, q8_0.matvec_q8),
    "Q4_0": Kernels(np.uint8, q4_0.dequantize_rows, q4_0.matvec, ops.round_q8, q4_0.matvec_q8),
    "Q4_1": Kernels(np.uint8, q4_1.dequantize_rows, q4_1.matvec, ops.round_q8, q4_1.matvec_q8),
    "Q5_0": Kernels(np.uint8, q5_0.dequantize_rows, q5_0.matvec, ops.round_q8, q5_0.matvec_q8),
    "Q5_1": Kernels(np.uint8, q5_1.dequantize_rows, q5_1.matvec, ops.round_q8, q5_1.matvec_q8),
    # K-quants and IQ4_XS meet activations quantized to Q8_K (256-blocks, float32 scale) in llama.cpp
    "Q2_K": Kernels(np.uint8, q2_k.dequantize_rows, q2_k.matvec, round_q8_k, q2_k.matvec_q8k, quantize_q8_k),
    "Q3_K": Kernels(np.uint8, q3_k.dequantize_rows, q3_k.matvec, round_q8_k, q3_k.matvec_q8k, quantize_q8_k),
    "Q4_K": Kernels(np.uint8, q4_k.dequantize_rows, q4_k.matvec, round_q8_k, q4_k.matvec_q8k, quantize_q8_k),
    "Q5_K": Kernels(np.uint8, q5_k.dequantize_rows, q5_k.matvec, round_q8_k, q5_k.matvec_q8k, quantize_q8_k),
    "Q6_K": Kernels(np.uint8, q6_k.dequantize_rows, q6_k.matvec, round_q8_k, q6_k.matvec_q8k, quantize_q8_k),
    "IQ4_NL": Kernels(np.uint8, iq4.dequantize_rows_nl, iq4.matvec_nl, ops.round_q8, iq4.matvec_q8_nl),
    "IQ4_XS": Kernels(np.uint8, iq4.dequantize_rows_xs, iq4.matvec_xs, round_q8_k, iq4.matvec_q8k_xs, quantize_q8_k),
}


class QMatrix:
    """A 2-D weight ``[rows, cols]`` kept in its file format (``W x`` computes ``rows`` outputs).

    ``data`` is the zero-copy view of the mapped bytes; nothing is dequantized
    except rows gathered on demand and tiles during prefill.
    """

    __slots__ = ("name", "format", "rows", "cols", "data", "k", "fid")

    def __init__(self, info: TensorInfo, raw: np.ndarray) -> None:
        if len(info.shape) != 2:
            raise UnsupportedModelError(f"tensor {info.name!r}: expected a matrix, got shape {info.shape}")
        k = KERNELS.get(info.format.name)
        if k is None:
            supported = ", ".join(KERNELS)
            raise UnsupportedModelError(
                f"tensor {info.name!r} has block type {info.format.name}, which lmap cannot compute yet "
                f"(supported: {supported})"
            )
        self.name = info.name
        self.format = info.format
        self.cols, self.rows = info.shape
        self.k = k
        self.data = (
            raw.reshape(self.rows, -1).view(k.view_dtype) if raw.dtype != k.view_dtype else raw.reshape(self.rows, -1)
        )
        # >= 0: prompt products go through the integer panel GEMM (panels.py) with this format id
        self.fid = panels.format_id(info.format.name, self.rows, self.cols)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def matvec(self, x: np.ndarray, out: np.ndarray) -> None:
        """out[rows] = W @ x[cols]."""
        self.k.matvec(self.data, x, out)

    def dequantize_rows(self, r0: int, r1: int, out: np.ndarray) -> None:
        """out[: r1 - r0] = float32 rows r0..r1 of W."""
        self.k.dequantize_rows(self.data, r0, r1, out)

    def gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        """out[t] = row ids[t] of W (embedding lookup)."""
        for t, i in enumerate(ids):
            self.k.dequantize_rows(self.data, int(i), int(i) + 1, out[t : t + 1])

    def matmul(self, x: np.ndarray, out: np.ndarray, tile: np.ndarray, act: ActScratch | None = None) -> None:
        """out[n, rows] = x[n, cols] @ W.T for a batch: dequantize tiles of rows, then BLAS.

        ``tile`` is float32 scratch of at least [t, cols]; its row count sets the tile height.
        Decoding one token goes through :meth:`matvec` instead (no dequantized copy at all).
        With ``act`` the activations are first rounded (or, for one token, quantized to int8 and
        multiplied in integer SIMD) the way llama.cpp does for this format, so results track
        llama.cpp's token for token; without it the product is exact float32.
        """
        if act is not None and self.k.activation is not None:
            if x.shape[0] == 1 and self.k.matvec_q8 is not None:
                k = x.shape[1]
                q, d, s = act.q[:k], act.d[: k // 32], act.s[: k // 32]
                self.k.quantize(x[0], q, d, s)
                self.k.matvec_q8(self.data, q, d, s, out[0])
                return
            if self.fid >= 0 and act.panels is not None:
                xq, dx, xs = act.int8(x.shape[0], self.cols, panels.FORMATS[self.format.name][1])
                panels.quantize_rows(x, self.fid, xq, dx, xs)
                self.matmul_q8(xq, dx, xs, out, act)
                return
            for r0, xr in act.rounded(x, self.k.activation):
                self._float_matmul(xr, out[r0 : r0 + xr.shape[0]], tile)
            return
        self._float_matmul(x, out, tile)

    def _float_matmul(self, x: np.ndarray, out: np.ndarray, tile: np.ndarray) -> None:
        if x.shape[0] == 1:
            self.matvec(x[0], out[0])
            return
        th = min(tile.size // self.cols, self.rows)
        buf = tile.reshape(-1)[: th * self.cols].reshape(th, self.cols)
        for r0 in range(0, self.rows, th):
            r1 = min(r0 + th, self.rows)
            self.k.dequantize_rows(self.data, r0, r1, buf)
            np.matmul(x, buf[: r1 - r0].T, out=out[:, r0:r1])

    def matmul_q8(self, xq: np.ndarray, dx: np.ndarray, xs: np.ndarray, out: np.ndarray, act: ActScratch) -> None:
        """out[n, rows] = activations quantized by panels.quantize_rows (for this format) @ W.T, in integers."""
        panels.gemm(self.fid, self.data, xq, dx, xs, out, act.panels, act.counter, numba.get_num_threads())

    def __repr__(self) -> str:
        return f"QMatrix({self.name!r}, {self.format.name}, [{self.rows}, {self.cols}])"
