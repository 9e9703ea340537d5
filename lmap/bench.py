"""``lmap bench``: llama-bench's speed table for lmap, plus how close decoding comes to the memory bus.

What is timed follows llama-bench (examples/llama-bench), so the two tables compare row for row:

- ``pp<P>``: clear the context, then evaluate P token ids (BOS first when the model adds one,
  the rest random with a fixed seed) in ``n_batch`` chunks. No sampling.
- ``tg<N>``: clear the context, then evaluate N single tokens from an empty context, each a
  random id (a sampled token would cost the same forward pass; sampling is not timed).
- ``-d D`` (``pp<P> @ d<D>``, ``tg<N> @ d<D>``): each run first evaluates D random tokens,
  untimed, so the timed part attends over a context of D more cells (llama-bench's ``-d``).
- Each test runs once untimed first (llama-bench's warm-up: the whole prompt for pp, one token
  for tg), then ``reps`` timed times; tok/s is the mean ± sample sd over the repetitions.

Decoding one token reads every weight matrix once, so tg is bounded by memory bandwidth. The
table shows the bytes streamed per token x tok/s (GB/s) and that as a share of the machine's
bandwidth, measured here by a STREAM triad (``a = b + s*c`` over arrays far larger than the
caches, best of several runs, STREAM's byte count: 3 arrays, no write-allocate traffic).

This module imports only the standard library at the top: ``cli.build_parser`` imports it for the
argument definitions, and NumPy/Numba should load only when the command runs.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InvalidParameterError

if TYPE_CHECKING:
    from .gguf import GGUFFile
    from .llama import Llama

TOKEN_SEED = 1234  # fixed, so every run (and every thread count) evaluates the same ids
STREAM_RUNS = 5


# ---------------------------------------------------------------------- results
@dataclass
class ModelDesc:
    """The model a table is about, with llama-bench's size (tensor bytes) and params (all elements)."""

    name: str
    path: str
    architecture: str
    file_type: str
    size_bytes: int
    n_params: int
    bytes_per_token: int  # weight bytes one decoded token reads (see weights_streamed_per_token)
    tied_output: bool


@dataclass
class BenchResult:
    """One table row: one test at one thread count."""

    threads: int
    test: str
    n_prompt: int
    n_gen: int
    n_batch: int
    samples_ts: list[float]
    avg_ts: float
    stddev_ts: float
    gbps: float | None = None  # weights streamed per second (tg rows only)
    pct_bandwidth: float | None = None  # gbps / the machine's triad bandwidth
    n_depth: int = 0  # tokens already in the context when the timed part starts


@dataclass
class BenchReport:
    model: ModelDesc
    system: dict[str, Any]
    bandwidth: dict[str, Any] | None
    results: list[BenchResult] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": asdict(self.model),
            "system": self.system,
            "memory_bandwidth": self.bandwidth,
            "results": [asdict(r) for r in self.results],
        }


# ---------------------------------------------------------------------- measurement
def weights_streamed_per_token(g: GGUFFile) -> tuple[int, bool]:
    """Bytes of weights one decoded token reads, and whether the output matrix is the token embedding.

    Every matrix is read whole except the token embedding, of which only one row is gathered;
    a tied output (no ``output.weight``) reads the embedding whole as the last mat-vec.
    """
    tensors = g.tensors
    total = sum(t.nbytes for t in tensors.values())
    tied = "output.weight" not in tensors
    embd = tensors.get("token_embd.weight")
    if embd is None:
        return total, tied
    row = embd.nbytes // max(embd.n_rows, 1)
    return total - embd.nbytes + row + (embd.nbytes if tied else 0), tied


@functools.cache
def _triad_kernel() -> Callable[..., None]:
    import numba

    from . import kernels  # noqa: F401  # picks Numba's threading layer (TBB) before the first parallel launch

    @numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
    def triad(a: Any, b: Any, c: Any, s: float) -> None:
        for i in numba.prange(a.shape[0]):
            a[i] = b[i] + s * c[i]

    return triad  # type: ignore[no-any-return]


def memory_bandwidth(array_mib: int, threads: Sequence[int], runs: int = STREAM_RUNS) -> dict[int, float]:
    """STREAM triad bandwidth in bytes/s for each thread count (best of ``runs``)."""
    import numba
    import numpy as np

    n = array_mib * 2**20 // 8
    # np.full writes every page, so page faults are paid here and not inside the timed runs
    a, b, c = np.full(n, 0.0), np.full(n, 1.0), np.full(n, 2.0)
    triad = _triad_kernel()
    triad(a[:64], b[:64], c[:64], 3.0)  # compile / load from cache
    before = numba.get_num_threads()
    out: dict[int, float] = {}
    try:
        for t in threads:
            numba.set_num_threads(t)
            triad(a, b, c, 3.0)  # wakes the worker threads
            best = math.inf
            for _ in range(runs):
                t0 = time.perf_counter()
                triad(a, b, c, 3.0)
                best = min(best, time.perf_counter() - t0)
            out[t] = 3 * a.nbytes / best
    finally:
        numba.set_num_threads(before)
    return out


def _prompt_tokens(llm: Llama, n: int, seed: int) -> list[int]:
    import numpy as np

    ids = np.random.default_rng(seed).integers(0, llm.n_vocab(), size=n).tolist()
    bos = llm.token_bos()
    if ids and llm.tokenizer_.add_bos and bos >= 0:
        ids[0] = bos
    return [int(i) for i in ids]


def _time_pp(llm: Llama, tokens: Sequence[int], depth: Sequence[int] = ()) -> float:
    llm.reset()
    if depth:
        llm.eval(depth)  # untimed, as llama-bench's -d
    t0 = time.perf_counter()
    llm.eval(tokens)
    return time.perf_counter() - t0


def _time_tg(llm: Llama, tokens: Sequence[int], depth: Sequence[int] = ()) -> float:
    llm.reset()
    if depth:
        llm.eval(depth)
    t0 = time.perf_counter()
    for tok in tokens:
        llm.eval([tok])
    return time.perf_counter() - t0


def run_bench(
    llm: Llama,
    *,
    n_prompt: int,
    n_gen: int,
    threads: Sequence[int],
    reps: int,
    warmup: bool = True,
    bytes_per_token: int | None = None,
    bandwidth: float | None = None,
    on_result: Callable[[BenchResult], None] | None = None,
    n_depth: int = 0,
) -> list[BenchResult]:
    """Time pp``n_prompt`` and tg``n_gen`` at each thread count (llama-bench's order: threads outer).

    With ``n_depth`` each timed run starts after that many (untimed) tokens, as llama-bench's
    ``-d``: the rows read ``pp512 @ d2048``, and show what attention over a long context costs.
    """
    from .threads import set_threads

    prompt = _prompt_tokens(llm, n_prompt, TOKEN_SEED)
    gen = _prompt_tokens(llm, n_gen, TOKEN_SEED + 1)
    depth = _prompt_tokens(llm, n_depth, TOKEN_SEED + 2)
    at = f" @ d{n_depth}" if n_depth else ""
    results: list[BenchResult] = []
    for t in threads:
        set_threads(t)  # Numba's pool and the BLAS pool prefill uses, as llama-bench's -t
        llm.n_threads = t
        tests: list[tuple[str, int, int, Callable[[], float]]] = []
        if n_prompt > 0:
            tests.append((f"pp{n_prompt}{at}", n_prompt, 0, lambda: _time_pp(llm, prompt, depth)))
        if n_gen > 0:
            tests.append((f"tg{n_gen}{at}", 0, n_gen, lambda: _time_tg(llm, gen, depth)))
        for name, np_, ng, timed in tests:
            if warmup:
                if np_:
                    timed()
                else:
                    _time_tg(llm, gen[:1])
            samples = [(np_ + ng) / timed() for _ in range(reps)]
            avg = statistics.fmean(samples)
            sd = statistics.stdev(samples) if len(samples) > 1 else 0.0
            r = BenchResult(t, name, np_, ng, llm.n_batch, samples, avg, sd, n_depth=n_depth)
            if ng and bytes_per_token is not None:
                r.gbps = bytes_per_token * avg / 1e9
                if bandwidth:
                    r.pct_bandwidth = 100.0 * bytes_per_token * avg / bandwidth
            results.append(r)
            if on_result is not None:
                on_result(r)
    llm.reset()
    return results


# ---------------------------------------------------------------------- system facts
def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _threading_layer() -> str:
    import numba

    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel function has run yet
        return os.environ.get("NUMBA_THREADING_LAYER", "unknown")


def _blas_info() -> dict[str, Any]:
    """NumPy's BLAS (prefill runs its matmuls there) and its thread count, through threadpoolctl."""
    import numpy  # noqa: F401  (loads the BLAS so threadpoolctl sees it)
    from threadpoolctl import threadpool_info

    for pool in threadpool_info():
        if pool.get("user_api") == "blas":
            return {
                "name": pool.get("internal_api"),
                "version": pool.get("version"),
                "threads": pool.get("num_threads"),
                "kernels": pool.get("architecture"),
            }
    return {"name": None, "version": None, "threads": None, "kernels": None}


def _system_info() -> dict[str, Any]:
    import numba
    import numpy as np

    from . import __version__

    return {
        "lmap_version": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "threading_layer": _threading_layer(),
        "blas": _blas_info(),
        "numba_num_threads": int(numba.config.NUMBA_NUM_THREADS),
        "cpu": _cpu_name(),
        "n_cpus": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _model_desc(llm: Llama, label: str) -> ModelDesc:
    from .quants.formats import FILE_TYPES

    g = llm._gguf
    per_token, tied = weights_streamed_per_token(g)
    ft = g.metadata.get("general.file_type")
    return ModelDesc(
        name=label,
        path=llm.model_path,
        architecture=g.architecture,
        file_type=str(FILE_TYPES.get(ft, ft if ft is not None else "?")),
        size_bytes=llm.model_size_bytes,
        n_params=sum(t.n_elements for t in g.tensors.values()),
        bytes_per_token=per_token,
        tied_output=tied,
    )


# ---------------------------------------------------------------------- output
_MD_COLUMNS = ("model", "size", "params", "threads", "test", "tok/s", "GB/s", "% bw")
_MD_ALIGN = ("<", ">", ">", ">", ">", ">", ">", ">")
_MD_WIDTH = (28, 10, 10, 7, 9, 18, 7, 6)


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(f"{c:{a}{w}}" for c, a, w in zip(cells, _MD_ALIGN, _MD_WIDTH, strict=True)) + " |"


def md_header(report: BenchReport) -> list[str]:
    m, s, bw = report.model, report.system, report.bandwidth
    lines = [
        f"model: {m.path} ({m.architecture}, {m.file_type})",
        f"weights streamed per generated token: {m.bytes_per_token / 2**20:.2f} MiB "
        f"(all tensors but token_embd{', plus token_embd as the tied output' if m.tied_output else ''})",
    ]
    if bw is None:
        lines.append("memory bandwidth: not measured (--stream-mib 0)")
    else:
        per = ", ".join(f"{t} thr {v:.1f}" for t, v in bw["gbps_by_threads"].items())
        lines.append(
            f"memory bandwidth (STREAM triad, 3 x {bw['array_mib']} MiB float64, best of {bw['runs']}): "
            f"{bw['gbps']:.1f} GB/s ({per})"
        )
    load = s["load_avg"]
    lines.append(
        f"numba {s['numba']}, threading layer: {s['threading_layer']}, NUMBA_NUM_THREADS={s['numba_num_threads']}; "
        f"CPU: {s['cpu']} x {s['n_cpus']}" + (f"; load avg {load[0]:.2f}" if load else "")
    )
    blas = s.get("blas") or {}
    if blas.get("name"):
        n = blas.get("threads")
        lines.append(
            f"BLAS (prefill matmuls): {blas['name']} {blas.get('version') or ''}"
            + (f" ({blas['kernels']} kernels)" if blas.get("kernels") else "")
            + f", {'? threads' if n is None else f'{n} threads'} (set to -t per row)"
        )
    return [
        *lines,
        "",
        _md_line(_MD_COLUMNS),
        "| " + " | ".join(_rule(a, w) for a, w in zip(_MD_ALIGN, _MD_WIDTH, strict=True)) + " |",
    ]


def _rule(align: str, width: int) -> str:
    return "-" * (width - 1) + ":" if align == ">" else "-" * width


def md_row(report: BenchReport, r: BenchResult) -> str:
    m = report.model
    return _md_line(
        (
            f"{m.name} {m.file_type}",
            f"{m.size_bytes / 2**20:.2f} MiB",
            f"{m.n_params / 1e6:.2f} M",
            str(r.threads),
            r.test,
            f"{r.avg_ts:.2f} ± {r.stddev_ts:.2f}",
            "-" if r.gbps is None else f"{r.gbps:.2f}",
            "-" if r.pct_bandwidth is None else f"{r.pct_bandwidth:.0f}%",
        )
    )


CSV_FIELDS = (
    "model",
    "file_type",
    "size_bytes",
    "n_params",
    "bytes_per_token",
    "threading_layer",
    "threads",
    "test",
    "n_prompt",
    "n_gen",
    "n_depth",
    "n_batch",
    "avg_ts",
    "stddev_ts",
    "gbps",
    "pct_bandwidth",
    "bandwidth_gbps",
    "samples_ts",
)


def csv_header() -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(CSV_FIELDS)
    return buf.getvalue().rstrip("\n")


def csv_row(report: BenchReport, r: BenchResult) -> str:
    m, bw = report.model, report.bandwidth
    row = {
        "model": m.name,
        "file_type": m.file_type,
        "size_bytes": m.size_bytes,
        "n_params": m.n_params,
        "bytes_per_token": m.bytes_per_token,
        "threading_layer": report.system["threading_layer"],
        "bandwidth_gbps": "" if bw is None else f"{bw['gbps']:.3f}",
        "samples_ts": " ".join(f"{x:.3f}" for x in r.samples_ts),
        **{k: v for k, v in asdict(r).items() if k != "samples_ts"},
    }
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(["" if row[k] is None else row[k] for k in CSV_FIELDS])
    return buf.getvalue().rstrip("\n")


# ---------------------------------------------------------------------- command
def parse_int_list(text: str, name: str) -> list[int]:
    """``"1,2"`` or ``"1-4"`` (inclusive, as llama-bench) into ints."""
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "-" in part[1:]:
                lo, hi = part.split("-", 1)
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise InvalidParameterError(f"{name} {text!r}: expected integers like 1,2 or 1-4") from None
    if not out:
        raise InvalidParameterError(f"{name} {text!r}: expected at least one value")
    return out


def _check_args(args: argparse.Namespace, threads: list[int]) -> None:
    import numba

    if args.n_prompt < 0 or args.n_gen < 0:
        raise InvalidParameterError(f"-p and -n must be >= 0, got -p {args.n_prompt} -n {args.n_gen}")
    if args.n_depth < 0:
        raise InvalidParameterError(f"-d must be >= 0, got {args.n_depth}")
    if args.n_prompt == 0 and args.n_gen == 0:
        raise InvalidParameterError("-p and -n are both 0: nothing to time")
    if args.repetitions < 1:
        raise InvalidParameterError(f"-r must be >= 1, got {args.repetitions}")
    if args.batch_size < 1:
        raise InvalidParameterError(f"-b must be >= 1, got {args.batch_size}")
    if args.stream_mib < 0:
        raise InvalidParameterError(f"--stream-mib must be >= 0, got {args.stream_mib}")
    limit = int(numba.config.NUMBA_NUM_THREADS)
    for t in threads:
        if not 1 <= t <= limit:
            # Llama would silently clip, and the row would be mislabelled
            raise InvalidParameterError(
                f"-t {t}: thread counts must be in [1, {limit}] (NUMBA_NUM_THREADS; set it to oversubscribe)"
            )


def _label(model: str | None, path: str) -> str:
    from .registry import DEFAULT_MODEL, MODELS

    if model is None:
        return DEFAULT_MODEL
    return model if model in MODELS and not Path(model).is_file() else Path(path).stem


def cmd_bench(args: argparse.Namespace) -> int:
    from .llama import Llama

    threads = parse_int_list(args.threads, "-t") if args.threads else [len(os.sched_getaffinity(0))]
    _check_args(args, threads)
    fmt = args.output
    llm = Llama(
        args.model,
        n_ctx=args.n_depth + args.n_prompt + args.n_gen,
        n_batch=args.batch_size,
        n_threads=threads[0],
        verbose=args.verbose,
    )
    model = _model_desc(llm, _label(args.model, llm.model_path))
    bandwidth: dict[str, Any] | None = None
    if args.stream_mib:
        import numba

        counts = sorted({*threads, int(numba.config.NUMBA_NUM_THREADS)})
        by_t = memory_bandwidth(args.stream_mib, counts)
        best = max(by_t.values())
        bandwidth = {
            "method": "STREAM triad a = b + s*c, float64, bytes = 3 x array per run",
            "array_mib": args.stream_mib,
            "runs": STREAM_RUNS,
            "gbps_by_threads": {str(t): v / 1e9 for t, v in by_t.items()},
            "gbps": best / 1e9,
        }
    report = BenchReport(model, _system_info(), bandwidth)

    def emit(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    if fmt == "md":
        for line in md_header(report):
            emit(line)
    elif fmt == "csv":
        emit(csv_header())

    def on_result(r: BenchResult) -> None:
        # md and csv rows appear as they finish, as llama-bench's do
        if fmt == "md":
            emit(md_row(report, r))
        elif fmt == "csv":
            emit(csv_row(report, r))

    report.results = run_bench(
        llm,
        n_prompt=args.n_prompt,
        n_gen=args.n_gen,
        threads=threads,
        reps=args.repetitions,
        warmup=not args.no_warmup,
        bytes_per_token=model.bytes_per_token,
        bandwidth=None if bandwidth is None else bandwidth["gbps"] * 1e9,
        on_result=on_result,
        n_depth=args.n_depth,
    )
    if fmt == "json":
        emit(json.dumps(report.to_json(), indent=2))
    if args.profile:
        _print_profiles(llm, args, threads[-1])
    return 0


def _print_profiles(llm: Llama, args: argparse.Namespace, threads: int) -> None:
    """Per-phase ms per token of one tg and one pp run (after the timed table, so it does not perturb it)."""
    from .profile import profiling
    from .threads import set_threads

    set_threads(threads)
    depth = _prompt_tokens(llm, args.n_depth, TOKEN_SEED + 2)
    at = f" @ d{args.n_depth}" if args.n_depth else ""

    def fill() -> None:  # the depth tokens, outside the profile
        llm.reset()
        if depth:
            llm.eval(depth)

    if args.n_gen > 0:
        gen = _prompt_tokens(llm, args.n_gen, TOKEN_SEED + 1)
        _time_tg(llm, gen[:1])
        fill()
        with profiling(llm._model) as prof:
            for tok in gen:
                llm.eval([tok])
        print("\n" + prof.table(f"tg{args.n_gen}{at} profile, -t {threads}"), file=sys.stderr)
    if args.n_prompt > 0:
        prompt = _prompt_tokens(llm, args.n_prompt, TOKEN_SEED)
        fill()
        with profiling(llm._model) as prof:
            llm.eval(prompt)
        print("\n" + prof.table(f"pp{args.n_prompt}{at} profile, -t {threads}"), file=sys.stderr)
    llm.reset()


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``lmap bench`` on the CLI's subparsers (argparse only: nothing heavy is imported here)."""
    b: argparse.ArgumentParser = sub.add_parser(
        "bench", help="llama-bench-style speed table: prompt (pp) and generation (tg) tok/s, GB/s of weights"
    )
    b.add_argument("-m", "--model", default=None, help="path to a .gguf file or a model name (default smollm2-135m)")
    b.add_argument("-p", "--n-prompt", type=int, default=512, help="prompt tokens for the pp test; 0 = skip (512)")
    b.add_argument("-n", "--n-gen", type=int, default=128, help="tokens for the tg test; 0 = skip (default 128)")
    b.add_argument(
        "-d",
        "--n-depth",
        type=int,
        default=0,
        help="tokens already in the context before each test, as llama-bench's -d (0)",
    )
    b.add_argument("-t", "--threads", default=None, help="thread counts, e.g. 1,2 or 1-4 (default: all cores)")
    b.add_argument("-r", "--repetitions", type=int, default=5, help="timed runs per test (default 5)")
    b.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass (default 512)")
    b.add_argument("-o", "--output", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    b.add_argument(
        "--stream-mib",
        type=int,
        default=256,
        help="MiB per array of the memory-bandwidth triad (3 arrays; far above the caches); 0 = skip (default 256)",
    )
    b.add_argument("--no-warmup", action="store_true", help="skip the untimed run before each test")
    b.add_argument(
        "--profile", action="store_true", help="then print where each ms of a token goes, per phase (stderr)"
    )
    b.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    b.set_defaults(func=cmd_bench)
    return b
