#!/usr/bin/env python3
"""Reference perplexities from llama.cpp's llama-perplexity, for tests/test_perplexity.py.

    scripts/build_llama_cpp.sh
    source ~/.cache/lmap/llama.cpp-0.3.36/env.sh
    python scripts/make_perplexity_fixtures.py [--models-dir DIR] [--only smollm2] [--threads 2]

Needs only the llama.cpp binaries ($LMAP_LLAMA_BIN: llama-perplexity, llama-tokenize); any Python 3.11.

1. The text, tests/fixtures/pydoc_topics_100k.txt: CPython's pydoc topics (``pydoc_data.topics.topics``,
   PSF-licensed documentation) in sorted key order, joined by blank lines, cut to 100 000 bytes on a
   UTF-8 character boundary. The file is committed because the topics change between Python versions;
   it is (re)written only when missing or with ``--write-text``.
2. For each model: ``llama-tokenize --ids --no-parse-special`` (what llama-perplexity's tokenization
   does: BOS when the model adds it, no special-token parsing) gives the token count and a sha256 of the
   ids; ``llama-perplexity -m MODEL -f TEXT -c 512 -t THREADS`` gives the running estimates after each
   chunk and ``Final estimate: PPL = X +/- Y``.
3. Written: tests/fixtures/perplexity_llama_cpp.json (about 3 minutes per model on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import platform
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
TEXT_NAME = "pydoc_topics_100k.txt"
TEXT_BYTES = 100_000
N_CTX = 512
LLAMA_CPP_COMMIT = os.environ.get("LMAP_LLAMA_CPP_COMMIT", "0c1e57098")
MODELS = {
    "smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "gemma3": "gemma-3-270m-q4_k_m.gguf",
}


def make_text() -> bytes:
    """The pydoc topics, sorted by key, joined by blank lines, cut to TEXT_BYTES on a UTF-8 boundary."""
    from pydoc_data.topics import topics

    data = "\n\n".join(topics[k] for k in sorted(topics)).encode("utf-8")
    if len(data) < TEXT_BYTES:
        raise SystemExit(f"pydoc topics hold only {len(data)} bytes, fewer than {TEXT_BYTES}")
    # errors="ignore" drops only the partial character the cut may leave at the end
    return data[:TEXT_BYTES].decode("utf-8", errors="ignore").encode("utf-8")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tokens_sha256(ids: list[int]) -> str:
    """sha256 of the ids as little-endian int32, the form the test recomputes from lmap's tokens."""
    return hashlib.sha256(struct.pack(f"<{len(ids)}i", *ids)).hexdigest()


def run(cmd: list[str]) -> str:
    print("+", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return p.stdout + p.stderr


def tokenize(bin_dir: Path, model: Path, text: Path) -> list[int]:
    out = subprocess.run(
        [str(bin_dir / "llama-tokenize"), "-m", str(model), "-f", str(text), "--ids", "--log-disable"]
        + ["--no-parse-special"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    m = re.search(r"\[[0-9, ]*\]", out)
    if m is None:
        raise SystemExit(f"llama-tokenize printed no id list for {model.name}")
    return [int(x) for x in m.group(0)[1:-1].split(",") if x.strip()]


def perplexity(bin_dir: Path, model: Path, text: Path, threads: int) -> dict:
    cmd = [str(bin_dir / "llama-perplexity"), "-m", str(model), "-f", str(text), "-c", str(N_CTX), "-t", str(threads)]
    log = run(cmd)
    running = [float(v) for _, v in re.findall(r"\[(\d+)\](\d+\.\d+),", log)]
    final = re.search(r"Final estimate: PPL = (\d+\.\d+) \+/- (\d+\.\d+)", log)
    plan = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", log)
    sysinfo = re.search(r"system_info: (.*)", log)
    if final is None or plan is None or not running:
        raise SystemExit(f"could not parse llama-perplexity's output for {model.name}:\n{log[-3000:]}")
    n_chunks = int(plan.group(1))
    if len(running) != n_chunks:
        raise SystemExit(f"{model.name}: {len(running)} running estimates for {n_chunks} chunks")
    return {
        "command": " ".join(shlex.quote(c) for c in [Path(cmd[0]).name, "-m", model.name] + cmd[3:]),
        "n_ctx": int(plan.group(2)),
        "n_chunks": n_chunks,
        "batch_size": int(plan.group(3)),
        "n_seq": int(plan.group(4)),
        "running": running,
        "ppl": float(final.group(1)),
        "ppl_err": float(final.group(2)),
        "system_info": sysinfo.group(1).strip() if sysinfo else None,
    }


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--models-dir", default=os.environ.get("LMAP_MODELS_DIR", str(Path.home() / ".cache" / "lmap" / "models"))
    )
    ap.add_argument("--out", default=str(FIXTURES))
    ap.add_argument("--only", choices=sorted(MODELS), action="append")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write-text", action="store_true", help="rewrite the text from this Python's pydoc topics")
    args = ap.parse_args(argv)

    bin_dir = Path(os.environ.get("LMAP_LLAMA_BIN", Path.home() / ".cache/lmap/llama.cpp-0.3.36/build/bin"))
    for tool in ("llama-perplexity", "llama-tokenize"):
        if not (bin_dir / tool).exists():
            raise SystemExit(f"{bin_dir / tool} not found: run scripts/build_llama_cpp.sh and source its env.sh")
    out = Path(args.out)
    text_path = out / TEXT_NAME
    if args.write_text or not text_path.exists():
        text_path.write_bytes(make_text())
        print(f"wrote {text_path} from Python {platform.python_version()}'s pydoc topics", file=sys.stderr)
    text = text_path.read_bytes()

    fixture_path = out / "perplexity_llama_cpp.json"
    fixture: dict = json.loads(fixture_path.read_text()) if fixture_path.exists() else {"models": {}}
    fixture["generator"] = {
        "tool": "scripts/make_perplexity_fixtures.py",
        "llama_cpp_commit": LLAMA_CPP_COMMIT,
        "llama_cpp_source": "vendor/llama.cpp from the llama_cpp_python-0.3.36 sdist (PyPI)",
        "build": "scripts/build_llama_cpp.sh (cmake Release, GGML_NATIVE=ON, BUILD_SHARED_LIBS=ON, CPU only)",
        "machine": platform.machine(),
        "command": " ".join(shlex.quote(a) for a in ["python", "scripts/make_perplexity_fixtures.py"] + argv),
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    fixture["text"] = {
        "file": TEXT_NAME,
        "bytes": len(text),
        "sha256": hashlib.sha256(text).hexdigest(),
        "source": "pydoc_data.topics.topics (CPython documentation, PSF license) in sorted key order, joined "
        f"by blank lines, cut to {TEXT_BYTES} bytes on a UTF-8 boundary",
        "note": "llama.cpp's -f drops one trailing newline; the tokens below are of the text as llama.cpp reads it",
    }
    fixture["notes"] = (
        "running[i] is llama-perplexity's estimate after chunk i+1 ('[i+1]x.xxxx,' printed with 4 decimals); "
        "ppl/ppl_err its 'Final estimate: PPL = X +/- Y'. tokens_sha256 = sha256 of the ids as little-endian int32."
    )
    for key in args.only or sorted(MODELS):
        model = Path(args.models_dir) / MODELS[key]
        if not model.exists():
            raise SystemExit(f"{model} not found (pass --models-dir, or `lmap pull` the model)")
        ids = tokenize(bin_dir, model, text_path)
        entry = {
            "file": model.name,
            "sha256": sha256_file(model),
            "n_tokens": len(ids),
            "tokens_sha256": tokens_sha256(ids),
            "first_tokens": ids[:8],
            **perplexity(bin_dir, model, text_path, args.threads),
        }
        if entry["n_chunks"] != len(ids) // N_CTX:
            raise SystemExit(f"{model.name}: {entry['n_chunks']} chunks, expected {len(ids)} // {N_CTX}")
        fixture["models"][key] = entry
        print(f"{key}: {len(ids)} tokens, PPL = {entry['ppl']} +/- {entry['ppl_err']}", file=sys.stderr)
    fixture_path.write_text(json.dumps(fixture, indent=1) + "\n")
    print(f"wrote {fixture_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
