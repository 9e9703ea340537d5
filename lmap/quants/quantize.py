"""Float32 rows -> raw GGUF block bytes, the way llama.cpp's ``ggml_quantize_chunk`` writes them.

``quantize_rows(fmt, x, imatrix)`` is the one entry point (``lmap quantize`` builds on it).
The kernels live per family: :mod:`.quantize_legacy` (floats and 32-weight blocks),
:mod:`.quantize_k` (K-quants), :mod:`.quantize_iq4` (IQ4_NL / IQ4_XS); the scalar search
helpers they share are in :mod:`.quantize_search`. All of them are ports of ggml-quants.c
that keep its float32 order of operations, so the bytes equal llama.cpp's (tests check this
against fixtures recorded from libggml-base and against gguf-py's quantizers).

``imatrix`` holds one importance weight per column (llama-imatrix's per-tensor vector). As in
llama.cpp it changes the search for Q4_0/Q4_1/Q5_0/Q5_1, the K-quants and IQ4, and is ignored
by F32/F16/BF16/Q8_0.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import InvalidParameterError
from . import quantize_iq4 as _iq4
from . import quantize_k as _k
from . import quantize_legacy as _legacy
from .formats import FORMATS_BY_NAME


def _f32(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    out[...] = x.view(np.uint8)


def _bf16(x: np.ndarray, qw: np.ndarray, out: np.ndarray) -> None:
    _legacy.quantize_bf16(x.view(np.uint32), qw, out)


_KERNELS: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], None]] = {
    "F32": _f32,
    "F16": _legacy.quantize_f16,
    "BF16": _bf16,
    "Q8_0": _legacy.quantize_q8_0,
    "Q4_0": _legacy.quantize_q4_0,
    "Q4_1": _legacy.quantize_q4_1,
    "Q5_0": _legacy.quantize_q5_0,
    "Q5_1": _legacy.quantize_q5_1,
    "Q2_K": _k.quantize_q2_k,
    "Q3_K": _k.quantize_q3_k,
    "Q4_K": _k.quantize_q4_k,
    "Q5_K": _k.quantize_q5_k,
    "Q6_K": _k.quantize_q6_k,
    "IQ4_NL": _iq4.quantize_iq4_nl,
    "IQ4_XS": _iq4.quantize_iq4_xs,
}

SUPPORTED: frozenset[str] = frozenset(_KERNELS)
"""Format names :func:`quantize_rows` accepts (GGML type names as in :mod:`lmap.quants.formats`)."""

_NO_WEIGHTS = np.zeros(0, np.float32)


def quantize_rows(fmt: str, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Quantize ``x`` float32 [rows, cols] to ``fmt``: uint8 [rows, row_bytes] of GGUF blocks.

    ``cols`` must be a multiple of the format's block size. ``imatrix``, if given, is float32
    [cols] of per-column importance (as llama.cpp's ``quant_weights``). Rows are quantized in
    parallel; the result is byte-identical to llama.cpp's ``ggml_quantize_chunk``.
    """
    kernel = _KERNELS.get(fmt)
    if kernel is None:
        raise InvalidParameterError(
            f"quantize: unknown or unsupported format {fmt!r} (supported: {', '.join(sorted(SUPPORTED))})"
        )
    x = np.asarray(x)
    if x.ndim != 2:
        raise InvalidParameterError(f"quantize {fmt}: x must be 2-D [rows, cols], got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    bf = FORMATS_BY_NAME[fmt]
    if cols % bf.block_size != 0:
        raise InvalidParameterError(
            f"quantize {fmt}: column count {cols} is not a multiple of the block size {bf.block_size}"
        )
    if imatrix is None:
        qw = _NO_WEIGHTS
    else:
        qw = np.ascontiguousarray(imatrix, dtype=np.float32).reshape(-1)
        if qw.shape[0] != cols:
            raise InvalidParameterError(
                f"quantize {fmt}: imatrix has {qw.shape[0]} values, expected one per column ({cols})"
            )
    out = np.empty((rows, bf.row_bytes(cols)), np.uint8)
    if rows and cols:
        kernel(x, qw, out)
    return out
