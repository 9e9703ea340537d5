#!/usr/bin/env python3
"""Record llama.cpp's block quantizers (ggml_quantize_chunk in libggml-base) into tests/fixtures/quantize_blocks.npz.

    source ~/.cache/lmap/llama.cpp-0.3.36/env.sh
    python scripts/make_quantize_fixtures.py             # writes the fixture
    python scripts/make_quantize_fixtures.py --compare 4000 [--cols 256]
                                                         # or: compare lmap with llama.cpp on many random rows

The library is called through ctypes only:

    size_t ggml_quantize_chunk(enum ggml_type type, const float * src, void * dst, int64_t start,
                               int64_t nrows, int64_t n_per_row, const float * imatrix);

(it calls ggml_quantize_init itself). Inputs are seeded: rows of 768 and 256 columns drawn from
a normal, a heavy-tailed Student t(2), weight-like (normal * 0.02), shifted positive, integer
quarter steps (ties), mixed tiny / huge magnitudes, rows with zero sub-blocks, and an all-zero
row; importance vectors are log-normal. The npz holds, per input set ``s`` (``c768``, ``c256``):
``x_s``, ``imatrix_s``, and for each format ``F`` but F32: ``F_s`` (no imatrix) and ``F_s_imatrix``
(only for formats whose llama.cpp quantizer reads it).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FORMATS = {  # ggml_type ids (ggml.h)
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q5_0": 6,
    "Q5_1": 7,
    "Q8_0": 8,
    "Q2_K": 10,
    "Q3_K": 11,
    "Q4_K": 12,
    "Q5_K": 13,
    "Q6_K": 14,
    "IQ4_NL": 20,
    "IQ4_XS": 23,
    "BF16": 30,
}
# formats whose ggml quantizer ignores the importance matrix
NO_IMATRIX = {"F32", "F16", "BF16", "Q8_0"}
BLOCK = {"F32": 1, "F16": 1, "BF16": 1, "Q2_K": 256, "Q3_K": 256, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256, "IQ4_XS": 256}
TYPE_SIZE = {
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "Q4_0": 18,
    "Q4_1": 20,
    "Q5_0": 22,
    "Q5_1": 24,
    "Q8_0": 34,
    "Q2_K": 84,
    "Q3_K": 110,
    "Q4_K": 144,
    "Q5_K": 176,
    "Q6_K": 210,
    "IQ4_NL": 18,
    "IQ4_XS": 136,
}


def row_bytes(fmt: str, cols: int) -> int:
    return cols // BLOCK.get(fmt, 32) * TYPE_SIZE[fmt]


def load_ggml() -> ctypes.CDLL:
    d = os.environ.get("LMAP_LLAMA_BIN") or str(Path.home() / ".cache/lmap/llama.cpp-0.3.36/build/bin")
    lib = ctypes.CDLL(str(Path(d) / "libggml-base.so"))
    f = lib.ggml_quantize_chunk
    f.restype = ctypes.c_size_t
    f.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_int64,
        ctypes.c_void_p,
    ]
    return lib


def ggml_quantize(lib: ctypes.CDLL, fmt: str, x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    rows, cols = x.shape
    out = np.zeros((rows, row_bytes(fmt, cols)), np.uint8)
    qw = None if imatrix is None else np.ascontiguousarray(imatrix, np.float32)
    n = lib.ggml_quantize_chunk(
        FORMATS[fmt], x.ctypes.data, out.ctypes.data, 0, rows, cols, None if qw is None else qw.ctypes.data
    )
    assert n == out.size, (fmt, n, out.size)
    return out


def make_inputs(seed: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    rows = [
        rng.standard_normal(cols),
        np.clip(rng.standard_t(2, cols), -200, 200),
        rng.standard_normal(cols) * 0.02,
        rng.uniform(0.5, 2.0, cols) + 1.0,  # all positive: the K-quant mins are clipped to 0
        rng.integers(-8, 9, cols) * 0.25,  # ties: x / d lands on .5
        rng.standard_normal(cols) * np.exp(rng.uniform(-20, 20, cols)),  # tiny and huge in one row
        rng.standard_normal(cols) * (rng.random(cols) < 0.1),  # sparse
        rng.standard_normal(cols),
        np.zeros(cols),
    ]
    rows[7][16:48] = 0.0  # zero sub-blocks of 16 and 32
    rows[7][100] = 40.0  # one outlier
    x = np.stack(rows).astype(np.float32)
    imatrix = np.exp(rng.standard_normal(cols)).astype(np.float32)
    return x, imatrix


def write_fixture(lib: ctypes.CDLL, out: Path) -> None:
    data: dict[str, np.ndarray] = {}
    for name, seed, cols in (("c768", 1234, 768), ("c256", 5678, 256)):
        x, imatrix = make_inputs(seed, cols)
        data[f"x_{name}"] = x
        data[f"imatrix_{name}"] = imatrix
        for fmt in FORMATS:
            if fmt == "F32":  # a copy of x; not worth the bytes
                continue
            data[f"{fmt}_{name}"] = ggml_quantize(lib, fmt, x, None)
            if fmt not in NO_IMATRIX:
                data[f"{fmt}_{name}_imatrix"] = ggml_quantize(lib, fmt, x, imatrix)
    data["generator"] = np.array(
        f"scripts/make_quantize_fixtures.py; llama.cpp {os.environ.get('LMAP_LLAMA_CPP_COMMIT', '0c1e57098')}"
        f" libggml-base ggml_quantize_chunk; {_dt.date.today().isoformat()}"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **data)
    print(f"wrote {out} ({out.stat().st_size} bytes, {len(data)} arrays)")


def compare(lib: ctypes.CDLL, n_rows: int, cols: int, seed: int) -> int:
    """Quantize n_rows random rows with lmap and llama.cpp; print the rows that differ per format."""
    sys.path.insert(0, str(ROOT))
    from lmap.quants.quantize import quantize_rows

    rng = np.random.default_rng(seed)
    kinds = [
        lambda: rng.standard_normal(cols),
        lambda: np.clip(rng.standard_t(2, cols), -1e3, 1e3),
        lambda: rng.standard_normal(cols) * 0.02,
        lambda: rng.uniform(-1, 3, cols),
        lambda: rng.integers(-8, 9, cols) * 0.25,
        lambda: rng.standard_normal(cols) * np.exp(rng.uniform(-10, 10, cols)),
        lambda: rng.standard_normal(cols) * (rng.random(cols) < 0.1),
    ]
    x = np.stack([kinds[i % len(kinds)]() * np.exp(rng.uniform(-5, 5)) for i in range(n_rows)]).astype(np.float32)
    imatrix = np.exp(rng.standard_normal(cols)).astype(np.float32)
    bad_total = 0
    for fmt in FORMATS:
        for qw in (None, imatrix):
            if qw is not None and fmt in NO_IMATRIX:
                continue
            want = ggml_quantize(lib, fmt, x, qw)
            got = quantize_rows(fmt, x, qw)
            bad = np.flatnonzero((want != got).any(axis=1))
            bad_total += len(bad)
            tag = f"{fmt}{'+imatrix' if qw is not None else ''}"
            print(
                f"{tag:16s} rows differing: {len(bad)} / {n_rows}"
                + (f"  first: {bad[:8].tolist()}" if len(bad) else "")
            )
    return bad_total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures" / "quantize_blocks.npz")
    ap.add_argument("--compare", type=int, default=0, metavar="ROWS", help="compare lmap with llama.cpp instead")
    ap.add_argument("--cols", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lib = load_ggml()
    if args.compare:
        sys.exit(1 if compare(lib, args.compare, args.cols, args.seed) else 0)
    write_fixture(lib, args.out)


if __name__ == "__main__":
    main()
