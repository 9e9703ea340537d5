#!/usr/bin/env python3
"""lmap against llama.cpp on the same GGUF file, same thread counts, alternating, in one run.

For each of R rounds and each thread count, runs ``llama-bench -o json -p P -n N -r 1 -t T`` and
``lmap bench -o json -p P -n N -r 1 -t T`` one after the other (the order flips every round, so
slow drift of the machine hits both alike), then prints the median tok/s of each per (test,
threads) and the ratio lmap / llama.cpp. Time to first token is the wall time of a whole
process that prints one token (``llama-completion ... -n 1`` against ``lmap run ... -n 1``),
with warm file caches; it includes loading, which is the point of measuring it.

On a shared, small machine the absolute numbers drift from run to run; the ratios, measured
together, are the claim.

    python benchmarks/side_by_side.py --model smollm2-135m -t 1,2 -r 5 --out results.json
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LLAMA_CPP_VERSION = "0.3.36"
TTFT_PROMPT = (
    "The history of computing is a story of ever smaller machines doing ever larger jobs. "
    "Early computers filled rooms and were programmed with switches and punched cards; "
    "today a phone holds more memory than all of them together. Explain, in one sentence, why"
)
ENGINES = ("llama.cpp", "lmap")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], *, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr[-3000:]}")
    return r


def llama_cpp_bin(explicit: str | None) -> Path:
    """Build llama.cpp once with the project's script (a no-op when built) and return its bin folder."""
    if explicit:
        return Path(explicit)
    default = Path.home() / ".cache" / "lmap" / f"llama.cpp-{LLAMA_CPP_VERSION}"
    cache = os.environ.get("LMAP_LLAMA_CPP_DIR", str(default))
    script = ROOT / "scripts" / "build_llama_cpp.sh"
    log(f"[side_by_side] {script} (builds once; ~15 min on 2 cores the first time)")
    sh = f'{shlex.quote(str(script))} >&2 && source {shlex.quote(cache)}/env.sh && printf %s "$LMAP_LLAMA_BIN"'
    r = subprocess.run(["bash", "-c", sh], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=os.environ)
    if r.returncode != 0 or not r.stdout:
        raise SystemExit("scripts/build_llama_cpp.sh failed (see above)")
    return Path(r.stdout)


def llama_bench(bin_dir: Path, model: Path, p: int, n: int, t: int, d: int = 0) -> dict[str, float]:
    cmd = [str(bin_dir / "llama-bench"), "-m", str(model), "-p", str(p), "-n", str(n), "-r", "1", "-t", str(t)]
    out: dict[str, float] = {}
    for row in json.loads(run([*cmd, "-d", str(d), "-o", "json"]).stdout):
        test = f"pp{row['n_prompt']}" if row["n_prompt"] else f"tg{row['n_gen']}"
        out[test + (f" @ d{row['n_depth']}" if row.get("n_depth") else "")] = float(row["avg_ts"])
    return out


def lmap_bench(model: Path, p: int, n: int, t: int, d: int = 0) -> dict[str, float]:
    cmd = [sys.executable, "-m", "lmap", "bench", "-m", str(model), "-p", str(p), "-n", str(n), "-d", str(d), "-r", "1"]
    # the triad is irrelevant to a ratio and would cost 768 MiB and a second per call
    res = json.loads(run([*cmd, "-t", str(t), "-o", "json", "--stream-mib", "0"]).stdout)["results"]
    return {row["test"]: float(row["avg_ts"]) for row in res}


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    run(cmd)
    return time.perf_counter() - t0


def ttft_cmds(bin_dir: Path, model: Path, prompt: str, t: int) -> dict[str, list[str]]:
    return {
        "llama.cpp": [
            str(bin_dir / "llama-completion"),
            *("-m", str(model), "-p", prompt, "-n", "1", "--temp", "0", "-no-cnv", "-t", str(t)),
        ],
        "lmap": [
            sys.executable,
            *("-m", "lmap", "run", "-m", str(model), "-p", prompt, "-n", "1", "--temp", "0", "--raw", "-t", str(t)),
        ],
    }


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", "-m", default="smollm2-135m", help="model name or .gguf path (default smollm2-135m)")
    ap.add_argument("-t", "--threads", default="1,2", help="comma-separated thread counts (default 1,2)")
    ap.add_argument("-r", "--rounds", type=int, default=5, help="alternating rounds (default 5)")
    ap.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens (default 512)")
    ap.add_argument("-n", "--n-gen", type=int, default=128, help="generated tokens (default 128)")
    ap.add_argument("-d", "--n-depth", type=int, default=0, help="tokens in the context before each test (default 0)")
    ap.add_argument("--llama-bin", default=None, help="llama.cpp bin folder (default: build with the project script)")
    ap.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-token comparison")
    ap.add_argument("--ttft-only", action="store_true", help="only the time-to-first-token comparison")
    ap.add_argument("--prompt", default=TTFT_PROMPT, help="prompt for time to first token")
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    threads = [int(x) for x in args.threads.split(",")]
    if args.rounds < 1:
        ap.error("-r must be >= 1")

    sys.path.insert(0, str(ROOT))
    from lmap.registry import resolve_model

    model = resolve_model(args.model)
    bin_dir = llama_cpp_bin(args.llama_bin)
    load0 = os.getloadavg()

    # samples[test][threads][engine] = tok/s per round
    samples: dict[str, dict[int, dict[str, list[float]]]] = {}
    for rnd in range(0 if args.ttft_only else args.rounds):
        order = ENGINES if rnd % 2 == 0 else ENGINES[::-1]
        for t in threads:
            for engine in order:
                log(f"[side_by_side] round {rnd + 1}/{args.rounds}, {t} thread(s): {engine}")
                if engine == "llama.cpp":
                    got = llama_bench(bin_dir, model, args.n_prompt, args.n_gen, t, args.n_depth)
                else:
                    got = lmap_bench(model, args.n_prompt, args.n_gen, t, args.n_depth)
                for test, ts in got.items():
                    samples.setdefault(test, {}).setdefault(t, {e: [] for e in ENGINES})[engine].append(ts)

    summary = []
    for test in sorted(samples, key=lambda s: (s[:2] != "pp", s)):
        for t in threads:
            per = samples[test].get(t)
            if per is None:
                continue
            ll, lm = median(per["llama.cpp"]), median(per["lmap"])
            summary.append({"test": test, "threads": t, "llama_cpp": ll, "lmap": lm, "ratio": lm / ll})

    ttft: dict[str, Any] | None = None
    if not args.no_ttft:
        t = max(threads)
        cmds = ttft_cmds(bin_dir, model, args.prompt, t)
        # an installed package has its bytecode compiled by pip; a checkout run under
        # PYTHONDONTWRITEBYTECODE would compile lmap's sources again on every start
        compileall.compile_dir(str(ROOT / "lmap"), quiet=1)
        for cmd in cmds.values():
            run(cmd)  # warm the page cache and Numba's kernel cache
        walls: dict[str, list[float]] = {e: [] for e in ENGINES}
        for rnd in range(args.rounds):
            for engine in ENGINES if rnd % 2 == 0 else ENGINES[::-1]:
                log(f"[side_by_side] time to first token, round {rnd + 1}/{args.rounds}: {engine}")
                walls[engine].append(wall(cmds[engine]))
        med = {e: median(v) for e, v in walls.items()}
        ttft = {
            "threads": t,
            "prompt": args.prompt,
            "commands": {e: shlex.join(c) for e, c in cmds.items()},
            "wall_s": walls,
            "median_s": med,
            "ratio": med["lmap"] / med["llama.cpp"],
        }

    print(f"model: {model}")
    print(
        f"{args.rounds} alternating rounds, -p {args.n_prompt} -n {args.n_gen} -d {args.n_depth}, "
        "medians of per-round tok/s; "
        f"load avg at start {load0[0]:.2f}, at end {os.getloadavg()[0]:.2f}"
    )
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:  # prefill's BLAS kernels: a forced core type can halve pp speed
            print(f"note: {var}={os.environ[var]} is set for NumPy's OpenBLAS (lmap's prefill products)")
    print()
    print("| test   | threads | llama.cpp tok/s |  lmap tok/s | lmap / llama.cpp |")
    print("| ------ | ------: | --------------: | ----------: | ---------------: |")
    for s in summary:
        cells = f"{s['llama_cpp']:>15.2f} | {s['lmap']:>11.2f} | {s['ratio']:>16.2f}"
        print(f"| {s['test']:<6} | {s['threads']:>7} | {cells} |")
    if ttft is not None:
        print()
        print(f"time to first token (whole process, warm caches, {ttft['threads']} threads, median wall s):")
        print(
            f"llama.cpp {ttft['median_s']['llama.cpp']:.3f} s, lmap {ttft['median_s']['lmap']:.3f} s, "
            f"lmap / llama.cpp {ttft['ratio']:.2f}"
        )

    if args.out:
        doc = {
            "model": str(model),
            "threads": threads,
            "rounds": args.rounds,
            "n_prompt": args.n_prompt,
            "n_gen": args.n_gen,
            "n_depth": args.n_depth,
            "llama_cpp_bin": str(bin_dir),
            "system": {
                "cpu": platform.processor() or platform.machine(),
                "n_cpus": os.cpu_count(),
                "load_avg_start": load0,
                "load_avg_end": os.getloadavg(),
            },
            "samples": {test: {str(t): v for t, v in per.items()} for test, per in samples.items()},
            "summary": summary,
            "ttft": ttft,
        }
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
        log(f"[side_by_side] wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
