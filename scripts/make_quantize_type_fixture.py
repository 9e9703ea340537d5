#!/usr/bin/env python3
"""Record which type llama-quantize gives every tensor, for tests/test_quantize_tool.py.

For each real model (SmolLM2-135M, gemma-3-270m) this makes an F16 source with lmap itself
(``lmap quantize --allow-requantize MODEL F16``: the cached models are already quantized, and
llama-quantize makes the very same bytes from them), runs llama.cpp's ``llama-quantize`` on it
for every preset ``lmap quantize`` offers (and a few option variants), and writes each output
tensor's type, the output's general.file_type, size and sha256 to
``tests/fixtures/quantize_types_{smollm2,gemma3}.json``.

    cmake --build ~/.cache/lmap/llama.cpp-0.3.36/build -j2 --target llama-quantize
    python scripts/make_quantize_type_fixture.py [--bin DIR] [--only smollm2] [--work DIR]

Takes a few minutes on 2 cores; needs ~2.5 GB of scratch space (deleted afterwards).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from lmap.gguf import GGUFFile
from lmap.quantize import PRESETS, quantize_model
from lmap.registry import resolve_model

LLAMA_CPP_COMMIT = os.environ.get("LMAP_LLAMA_CPP_COMMIT", "0c1e57098")
MODELS = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m"}
# extra llama-quantize arguments tried on top of the plain presets: (label, args, preset)
VARIANTS = [
    ("Q4_K_M --token-embedding-type q8_0", ["--token-embedding-type", "q8_0"], "Q4_K_M"),
    ("Q4_K_M --output-tensor-type f16", ["--output-tensor-type", "f16"], "Q4_K_M"),
    (
        "Q8_0 --token-embedding-type q4_0 --output-tensor-type q5_0",
        ["--token-embedding-type", "q4_0", "--output-tensor-type", "q5_0"],
        "Q8_0",
    ),
]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def run_llama_quantize(binary: Path, src: Path, dst: Path, preset: str, extra: list[str]) -> None:
    cmd = [str(binary), *extra, str(src), str(dst), preset, "2"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{shlex.join(cmd)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")


def record(out_path: Path) -> dict[str, object]:
    with GGUFFile(out_path) as g:
        return {
            "file_type": int(g.metadata["general.file_type"]),
            "tensors": list(g.tensors),
            "types": [t.format.name for t in g.tensors.values()],
            "keys": list(g.metadata),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_bin = Path(os.environ.get("LMAP_LLAMA_BIN", Path.home() / ".cache/lmap/llama.cpp-0.3.36/build/bin"))
    ap.add_argument("--bin", type=Path, default=default_bin, help="directory holding llama-quantize")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    ap.add_argument("--only", choices=sorted(MODELS), default=None)
    ap.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args()
    binary = args.bin / "llama-quantize"
    if not binary.exists():
        sys.exit(f"{binary} not found: cmake --build ~/.cache/lmap/llama.cpp-0.3.36/build --target llama-quantize")

    for short, name in MODELS.items():
        if args.only and short != args.only:
            continue
        model = resolve_model(name)
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            src = Path(tmp) / f"{short}-f16.gguf"
            quantize_model(model, src, "F16", allow_requantize=True)
            ref_f16 = Path(tmp) / "llama-f16.gguf"
            run_llama_quantize(binary, model, ref_f16, "F16", ["--allow-requantize"])
            same_f16 = sha256(ref_f16) == sha256(src)
            ref_f16.unlink()
            presets: dict[str, object] = {}
            tensors: list[str] | None = None
            keys: list[str] | None = None
            jobs = [(p, [], p) for p in PRESETS] + VARIANTS
            for label, extra, preset in jobs:
                out = Path(tmp) / "out.gguf"
                print(f"{short}: {label}", file=sys.stderr, flush=True)
                run_llama_quantize(binary, src, out, preset, list(extra))
                rec = record(out)
                if tensors is None:
                    tensors, keys = rec["tensors"], rec["keys"]  # type: ignore[assignment]
                assert rec["tensors"] == tensors, f"{label}: tensor order differs between outputs"
                presets[label] = {
                    "file_type": rec["file_type"],
                    "types": " ".join(rec["types"]),  # one per entry of "tensors"
                    "size": out.stat().st_size,
                    "sha256": sha256(out),
                }
                out.unlink()
            data = {
                "generator": {
                    "tool": "llama-quantize",
                    "llama_cpp_commit": LLAMA_CPP_COMMIT,
                    "command": "python scripts/make_quantize_type_fixture.py",
                    "date": _dt.date.today().isoformat(),
                },
                "model": model.name,
                "model_sha256": sha256(model),
                "source": f"lmap quantize --allow-requantize {model.name} F16",
                "source_sha256": sha256(src),
                "source_equals_llama_quantize_f16": same_f16,
                "tensors": tensors,
                "keys": keys,
                "presets": presets,
            }
        path = args.out / f"quantize_types_{short}.json"
        path.write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
