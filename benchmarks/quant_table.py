"""The seeds' quantization table, measured: size, bits per weight, perplexity, KL divergence, decode speed.

Base: SmolLM2-135M-Instruct dequantized to F32 by ``lmap quantize`` (the file on PyPI is Q4_1 + Q8_0,
so every format below is "as good as it gets from this base", and the base's own quality is that of
the Q4_1 original; the comparison between formats is what this table is for). Each format is made
from the F32 base with lmap's quantizers (byte-identical with llama.cpp's), then scored with
``lmap.perplexity`` on the committed pydoc text against the base's saved log-probabilities, and
decoded for ``--gen`` tokens (lmap bench's tg test, ``--reps`` runs, mean).

    python benchmarks/quant_table.py                     # all formats, 20 chunks of 512 (~15 min here)
    python benchmarks/quant_table.py --formats Q8_0,Q4_K_M --chunks 4 --out table.json
    python benchmarks/quant_table.py --gen 0 --work DIR --out t.json   # quality only, files kept
    python benchmarks/quant_table.py --speed-only --work DIR --out t.json  # then speed, when quiet

Prints a markdown table (the one in the README) and, with ``--out``, the raw numbers as JSON.
Work files go to ``--work`` (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "tests" / "fixtures" / "pydoc_topics_100k.txt"
# the seeds' table first, then the other block formats lmap reads
FORMATS = [
    "BF16",
    "Q8_0",
    "Q6_K",
    "Q5_K_M",
    "Q4_K_M",
    "Q3_K_M",
    "Q2_K",
    "F16",
    "Q5_0",
    "Q5_1",
    "Q4_0",
    "Q4_1",
    "IQ4_NL",
    "IQ4_XS",
]


def decode_speed(path: Path, n_gen: int, reps: int, threads: int) -> float:
    from lmap import Llama
    from lmap.bench import run_bench

    llm = Llama(str(path), n_ctx=max(256, n_gen + 8), n_batch=64, n_threads=threads, verbose=False)
    try:
        res = run_bench(llm, n_prompt=0, n_gen=n_gen, threads=[threads], reps=reps)
        return res[0].avg_ts
    finally:
        llm.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m", help="model to dequantize as the base (name or path)")
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated types / presets")
    ap.add_argument("--chunks", type=int, default=20, help="perplexity chunks of -c tokens (default 20)")
    ap.add_argument("-c", "--ctx", type=int, default=512)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--gen", type=int, default=64, help="tokens per decode-speed run (0 skips it)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--work", type=Path, default=None, help="keep the quantized files here")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="re-measure only decode tok/s of the files in --work, updating the rows in --out "
        "(quality numbers are deterministic; speed wants a quiet machine)",
    )
    args = ap.parse_args(argv)
    if args.speed_only:
        return speed_only(args)

    from lmap.perplexity import load_text, perplexity
    from lmap.quantize import quantize_model
    from lmap.registry import resolve_model

    src = resolve_model(args.model)
    text = load_text(TEXT)
    tmp = None if args.work else tempfile.TemporaryDirectory(prefix="lmap-quant-table-")
    work = args.work or Path(tmp.name)  # type: ignore[union-attr]
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        base = work / "base-F32.gguf"
        if not base.exists():
            log(f"dequantizing {src.name} to F32 ...")
            quantize_model(src, base, "F32", allow_requantize=True)
        kld_file = work / "base.kld"
        log("base perplexity (and its log-probabilities for KL divergence) ...")
        if kld_file.exists():
            kld_file.unlink()
        b = perplexity(str(base), text, n_ctx=args.ctx, chunks=args.chunks, n_threads=args.threads, save_base=kld_file)
        rows.append(
            {
                "format": "F32 (base)",
                "mib": base.stat().st_size / 2**20,
                "bpw": 32.0,
                "ppl": b.ppl,
                "ppl_err": b.ppl_err,
                "kld": 0.0,
                "same_top": 1.0,
                "tg": decode_speed(base, args.gen, args.reps, args.threads) if args.gen else math.nan,
            }
        )
        log(f"  PPL {b.ppl:.4f} ± {b.ppl_err:.4f}")
        for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
            out = work / f"{fmt}.gguf"
            t0 = time.perf_counter()
            if not out.exists():
                q = quantize_model(base, out, fmt)
                bpw = q.bits_per_weight
            else:
                from lmap.gguf import GGUFFile

                g = GGUFFile(out)
                bpw = 8.0 * sum(t.nbytes for t in g.tensors.values()) / sum(t.n_elements for t in g.tensors.values())
            tq = time.perf_counter() - t0
            r = perplexity(str(out), text, kl_base=kld_file, n_threads=args.threads)
            assert r.kld is not None
            tg = decode_speed(out, args.gen, args.reps, args.threads) if args.gen else math.nan
            rows.append(
                {
                    "format": fmt,
                    "mib": out.stat().st_size / 2**20,
                    "bpw": bpw,
                    "ppl": r.ppl,
                    "ppl_err": r.ppl_err,
                    "kld": r.kld.kld_mean,
                    "kld_err": r.kld.kld_err,
                    "same_top": r.kld.same_top,
                    "tg": tg,
                    "quantize_s": tq,
                }
            )
            log(f"  {fmt}: {bpw:.2f} bpw, PPL {r.ppl:.4f}, KLD {r.kld.kld_mean:.5f}, tg {tg:.1f} tok/s")
    finally:
        if tmp is not None:
            tmp.cleanup()

    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    print_table(rows, args)
    return 0


def speed_only(args: argparse.Namespace) -> int:
    if args.work is None or args.out is None or not args.out.exists():
        raise SystemExit("--speed-only needs --work (the kept files) and --out (the JSON of an earlier run)")
    data = json.loads(args.out.read_text())
    rows = data["rows"]
    for r in rows:
        name = "base-F32" if str(r["format"]).startswith("F32") else str(r["format"])
        r["tg"] = decode_speed(args.work / f"{name}.gguf", args.gen, args.reps, args.threads)
        print(f"  {r['format']}: tg {r['tg']:.1f} tok/s", file=sys.stderr, flush=True)
    args.out.write_text(json.dumps(data, indent=1))
    args.chunks, args.ctx = int(data["args"]["chunks"]), int(data["args"]["ctx"])
    print_table(rows, args)
    return 0


def print_table(rows: list[dict[str, object]], args: argparse.Namespace) -> None:
    print(f"\nSmolLM2-135M from an F32 base, {args.chunks} x {args.ctx} tokens of pydoc text, -t {args.threads}\n")
    print("| format | size (MiB) | bits/weight | PPL | ΔPPL vs base | mean KLD | same top token | decode tok/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    base_ppl = float(rows[0]["ppl"])  # type: ignore[arg-type]
    for r in rows:
        ppl = float(r["ppl"])  # type: ignore[arg-type]
        print(
            f"| {r['format']} | {r['mib']:.1f} | {r['bpw']:.2f} | {ppl:.3f} ± {r['ppl_err']:.3f} "
            f"| {(ppl / base_ppl - 1) * 100:+.2f} % | {r['kld']:.5f} | {float(r['same_top']) * 100:.1f} % "  # type: ignore[arg-type]
            f"| {r['tg']:.1f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
