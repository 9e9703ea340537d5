"""``lmap`` command line: run | chat | pull | info.

A thin layer over :class:`lmap.Llama`: parse, call, print. Every ``LmapError``
becomes one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import InvalidParameterError, LmapError
from .quants.formats import FILE_TYPES

log = logging.getLogger("lmap")


# ---------------------------------------------------------------------- helpers
def _peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min_p x the best (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for repeated tokens (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=-1, help="RNG seed; -1 = random (default)")


def _cache_type_args(p: argparse.ArgumentParser) -> None:
    for kv in ("k", "v"):
        p.add_argument(
            f"--cache-type-{kv}",
            choices=("f16", "q8_0", "f32"),
            default="f16",
            help=f"KV cache type for {kv.upper()} (default f16; q8_0 takes 53 %% of f16's memory)",
        )


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="path to a .gguf file or a model name (default smollm2-135m)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument(
        "-c", "--ctx-size", type=int, default=4096, help="context size in tokens; 0 = model's (default 4096)"
    )
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass (default 512)")
    p.add_argument("--no-mmap", action="store_true", help="read the model into memory instead of mapping it")
    p.add_argument("--mlock", action="store_true", help="pin the model in RAM (needs a high enough `ulimit -l`)")
    _cache_type_args(p)
    p.add_argument(
        "--keep",
        type=int,
        default=None,
        metavar="N",
        help="context shift: when the context fills, keep the first N tokens and drop half of the rest "
        "(default: off, generation stops at the context size)",
    )
    p.add_argument(
        "--mem-budget",
        default=None,
        metavar="SIZE",
        help="keep the resident part of the model file under SIZE (e.g. 64M, 1G): pin what fits, stream the rest",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _load(args: argparse.Namespace) -> Any:
    from .llama import Llama

    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError(f"--threads must be >= 1, got {args.threads}")
    llm = Llama(
        args.model,
        n_ctx=args.ctx_size,
        n_batch=args.batch_size,
        n_threads=args.threads,
        use_mmap=not args.no_mmap,
        use_mlock=args.mlock,
        mem_budget=getattr(args, "mem_budget", None),
        type_k=args.cache_type_k,
        type_v=args.cache_type_v,
        n_keep=args.keep,
        verbose=args.verbose,
    )
    end_startup_gc()
    return llm


def end_startup_gc() -> None:
    """Turn the collector back on after a start-up that ran without it (see ``lmap.__main__``).

    What start-up built (Numba's registries, the model, the tokenizer) lives as long as the
    process: ``gc.freeze`` keeps later collections from scanning it again and again.
    """
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _check_sampling(args: argparse.Namespace) -> None:
    if args.temp < 0:
        raise InvalidParameterError(f"--temp must be >= 0, got {args.temp}")
    if not 0.0 <= args.top_p <= 1.0:
        raise InvalidParameterError(f"--top-p must be in [0, 1], got {args.top_p}")
    if not 0.0 <= args.min_p <= 1.0:
        raise InvalidParameterError(f"--min-p must be in [0, 1], got {args.min_p}")
    if args.top_k < 0:
        raise InvalidParameterError(f"--top-k must be >= 0, got {args.top_k}")
    if args.repeat_penalty <= 0:
        raise InvalidParameterError(f"--repeat-penalty must be > 0, got {args.repeat_penalty}")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "temperature": args.temp,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repeat_penalty": args.repeat_penalty,
        "seed": None if args.seed < 0 else args.seed,
    }


def _print_timings(llm: Any) -> None:
    t = llm.timings
    pt, pms, et, ems = t["prompt_tokens"], t["prompt_ms"], t["eval_tokens"], t["eval_ms"]
    print(
        f"\n\nload: {t['load_ms']:.0f} ms | prompt: {pt} tokens, {pms:.0f} ms, {pt / max(pms, 1e-9) * 1e3:.1f} tok/s"
        f" | decode: {et} tokens, {ems:.0f} ms, {et / max(ems, 1e-9) * 1e3:.1f} tok/s"
        f" | peak RSS: {_peak_rss_mib():.0f} MiB",
        file=sys.stderr,
    )
    if getattr(llm, "residency", None) is not None:
        print(llm.residency.report(), file=sys.stderr)


# ---------------------------------------------------------------------- commands
def cmd_run(args: argparse.Namespace) -> int:
    _check_sampling(args)
    if args.n_predict < -1:
        raise InvalidParameterError(f"-n must be >= -1 (-1 = until the end of generation), got {args.n_predict}")
    if args.memory_trace is None:
        return _run(args, None)
    from .memtrace import MemorySampler

    with MemorySampler(args.memory_trace) as trace:
        rc = _run(args, trace)
    print(f"memory trace: {trace.samples} samples in {args.memory_trace}", file=sys.stderr)
    return rc


def _run(args: argparse.Namespace, trace: Any) -> int:
    llm = _load(args)
    if trace is not None:
        trace.mark("loaded")
    if args.file is not None:
        try:
            prompt = Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InvalidParameterError(f"--file {args.file}: cannot read the prompt ({e})") from None
    else:
        prompt = args.prompt or ""
    use_chat = args.chat or (not args.raw and llm.metadata.get("tokenizer.chat_template") is not None)
    max_tokens = None if args.n_predict == -1 else args.n_predict
    if args.n_predict == 0:
        return 0
    if use_chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}
        ]
        stream = llm.create_chat_completion(messages, max_tokens=max_tokens, stream=True, **_sampling_kwargs(args))
        texts = (chunk["choices"][0]["delta"].get("content", "") for chunk in stream)
    else:
        sys.stdout.write(prompt)
        stream = llm.create_completion(prompt, max_tokens=max_tokens, stream=True, **_sampling_kwargs(args))
        texts = (chunk["choices"][0]["text"] for chunk in stream)
    for i, text in enumerate(texts):
        if i == 0 and trace is not None:
            trace.mark("first token")
        sys.stdout.write(text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    _print_timings(llm)
    return 0


def cmd_plot_memory(args: argparse.Namespace) -> int:
    from .memtrace import plot_memory

    out = args.output or str(Path(args.trace).with_suffix(".png"))
    if Path(out).exists() and not args.force:
        raise InvalidParameterError(f"{out}: file exists (not overwritten; use --force)")
    print(f"wrote {plot_memory(args.trace, out)}", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    _check_sampling(args)
    llm = _load(args)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    print("lmap chat: type a message, Ctrl-D to quit, /reset to forget the conversation.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        reply = []
        max_tokens = None if args.n_predict == -1 else args.n_predict
        for chunk in llm.create_chat_completion(messages, stream=True, max_tokens=max_tokens, **_sampling_kwargs(args)):
            text = chunk["choices"][0]["delta"].get("content", "")
            reply.append(text)
            sys.stdout.write(text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        t = llm.timings
        if args.verbose or not interactive:
            print(f"[prompt tokens evaluated: {t['prompt_tokens']}, reused: {t['reused_tokens']}]", file=sys.stderr)
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    from .registry import pull

    path = pull(args.name, force=args.force)
    print(path)
    return 0


def _layer_of(name: str) -> str:
    m = re.match(r"blk\.(\d+)\.", name)
    return f"blk.{m.group(1)}" if m else "(global)"


def cmd_info(args: argparse.Namespace) -> int:
    from .gguf import GGUFFile
    from .models.base import HParams
    from .registry import resolve_model

    path = resolve_model(args.model)
    t = time.perf_counter()
    g = GGUFFile(path)
    parse_ms = (time.perf_counter() - t) * 1e3
    md = g.metadata
    print(f"file:            {path}  ({g.size / 2**20:.1f} MiB, GGUF v{g.version}, parsed in {parse_ms:.0f} ms)")
    print(f"name:            {md.get('general.name', '?')}")
    print(f"architecture:    {g.architecture}")
    ft = md.get("general.file_type")
    print(f"file type:       {FILE_TYPES.get(ft, ft)}")
    try:
        hp = HParams.from_gguf(g)
        print(f"context length:  {hp.n_ctx_train}")
        print(f"embedding:       {hp.n_embd}   layers: {hp.n_layer}   ffn: {hp.n_ff}")
        print(
            f"heads:           {hp.n_head} (kv {hp.n_head_kv}, head dim {hp.head_dim_k})   rope: dims {hp.n_rot}, "
            f"base {hp.rope_freq_base:g}"
        )
        if hp.sliding_window:
            print(f"sliding window:  {hp.sliding_window}")
        print(f"rms eps:         {hp.rms_eps:g}")
        n_vocab = hp.n_vocab
    except LmapError as e:
        print(f"hparams:         unavailable ({e})")
        n_vocab = len(md.get("tokenizer.ggml.tokens", []))
    print(
        f"vocab:           {n_vocab} tokens, tokenizer {md.get('tokenizer.ggml.model', '?')} "
        f"(pre: {md.get('tokenizer.ggml.pre', '-')})"
    )
    print(f"chat template:   {'yes' if md.get('tokenizer.chat_template') else 'no'}")
    print(f"tensors:         {len(g.tensors)}")
    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for ti in g.tensors.values():
        by_type[ti.format.name] += 1
        bytes_by_type[ti.format.name] += ti.nbytes
    for name, cnt in sorted(by_type.items(), key=lambda kv: -bytes_by_type[kv[0]]):
        print(f"  {name:<8} {cnt:>5} tensors  {bytes_by_type[name] / 2**20:>9.2f} MiB")
    per_layer: dict[str, int] = defaultdict(int)
    for ti in g.tensors.values():
        per_layer[_layer_of(ti.name)] += ti.n_elements
    total = sum(per_layer.values())
    print("parameters:")
    layers = sorted((k for k in per_layer if k.startswith("blk.")), key=lambda k: int(k.split(".")[1]))
    if "(global)" in per_layer:
        print(f"  {'global':<10} {per_layer['(global)']:>14,}   (embeddings, output, final norm)")
    for k in layers if args.layers else layers[:1]:
        print(f"  {k:<10} {per_layer[k]:>14,}")
    if not args.layers and len(layers) > 1:
        print(f"  ... {len(layers)} layers x ~{per_layer[layers[0]]:,} (--layers shows each)")
    print(
        f"  {'total':<10} {total:>14,}   ({total / 1e6:.1f} M, "
        f"{8 * sum(bytes_by_type.values()) / total:.2f} bits/weight)"
    )
    if args.memory or args.mem_budget is not None:
        _print_memory_plan(args, path)
    return 0


def _print_memory_plan(args: argparse.Namespace, path: Path) -> None:
    from .plan import max_ctx, plan_for_file
    from .residency import format_size, parse_size

    if args.ctx_size < 0 or args.batch_size < 1:
        raise InvalidParameterError(f"-c must be >= 0 and -b >= 1, got -c {args.ctx_size} -b {args.batch_size}")
    kw: dict[str, Any] = {"type_k": args.cache_type_k, "type_v": args.cache_type_v}
    p = plan_for_file(path, args.ctx_size, args.batch_size, **kw)
    print(f"\nmemory plan: n_ctx {p.n_ctx}, n_batch {p.n_batch}, cache {p.type_k}/{p.type_v}")
    print(p.table())
    if args.mem_budget is not None:
        budget = parse_size(args.mem_budget, "--mem-budget")
        n = max_ctx(path, budget, args.batch_size, **kw)
        if n:
            print(f"largest context within {format_size(budget)}: -c {n}")
        else:
            print(
                f"no context fits within {format_size(budget)} with the whole model resident; "
                "`lmap run --mem-budget` streams the weights instead"
            )


# ---------------------------------------------------------------------- main
def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``lmap`` parser; given the command line (``argv``), commands it does not name are
    placeholders (same name and help, no options); without one, every command is built."""
    p = argparse.ArgumentParser(prog="lmap", description="Run GGUF language models from a memory map.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="generate text from a prompt, streaming to stdout")
    _model_args(r)
    r.add_argument("-p", "--prompt", default=None, help="the prompt")
    r.add_argument("-f", "--file", default=None, help="read the prompt from a file")
    r.add_argument("-n", "--n-predict", type=int, default=-1, help="tokens to generate; -1 = until the end (default)")
    r.add_argument("--system", default=None, help="system message (chat mode)")
    mode = r.add_mutually_exclusive_group()
    mode.add_argument(
        "--chat", action="store_true", help="wrap the prompt in the chat template (default if the model has one)"
    )
    mode.add_argument("--raw", action="store_true", help="feed the prompt as plain text")
    r.add_argument(
        "--memory-trace", metavar="FILE", default=None, help="sample RSS / RssAnon / RssFile every 100 ms into a CSV"
    )
    _sampling_args(r)
    r.set_defaults(func=cmd_run)

    pm = sub.add_parser("plot-memory", help="draw a --memory-trace CSV (needs matplotlib)")
    pm.add_argument("trace", help="CSV written by `lmap run --memory-trace`")
    pm.add_argument("-o", "--output", default=None, help="image to write (default: TRACE with .png)")
    pm.add_argument("--force", action="store_true", help="overwrite the image if it exists")
    pm.set_defaults(func=cmd_plot_memory)

    c = sub.add_parser("chat", help="interactive multi-turn chat (the KV cache is kept between turns)")
    _model_args(c)
    c.add_argument("--system", default=None, help="system message")
    c.add_argument("-n", "--n-predict", type=int, default=-1, help="max tokens per reply; -1 = until the end")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat)

    pl = sub.add_parser("pull", help="fetch a named model into the cache")
    pl.add_argument("name", help="model name (smollm2-135m, gemma3-270m)")
    pl.add_argument("--force", action="store_true", help="download again even if cached")
    pl.set_defaults(func=cmd_pull)

    i = sub.add_parser("info", help="describe a GGUF model: hparams, tensors, parameters")
    i.add_argument("model", nargs="?", default=None, help="path or model name (default smollm2-135m)")
    i.add_argument("--layers", action="store_true", help="parameter count of every layer")
    i.add_argument("--memory", action="store_true", help="print the memory plan of a context (every buffer)")
    i.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size for --memory (default 4096)")
    i.add_argument("-b", "--batch-size", type=int, default=512, help="batch size for --memory (default 512)")
    _cache_type_args(i)
    i.add_argument(
        "--mem-budget",
        default=None,
        metavar="SIZE",
        help="with --memory: a total memory budget (e.g. 512M, 2G); prints the largest context that fits",
    )
    i.set_defaults(func=cmd_info)

    # These commands' parsers live with their code (argparse only: NumPy, Numba, FastAPI load when
    # the command runs). Importing those modules takes ~7 ms, so a command line that names another
    # command gets a placeholder with the same name and help (tests/test_cli.py compares them).
    wanted = _command_in(argv)
    for name, (module, adder, help_) in _LAZY_COMMANDS.items():
        if wanted is None or wanted == name:
            getattr(importlib.import_module(module, __package__), adder)(sub)
        else:
            sub.add_parser(name, help=help_)
    return p


_LAZY_COMMANDS = {
    "bench": (
        ".bench",
        "add_bench_parser",
        "llama-bench-style speed table: prompt (pp) and generation (tg) tok/s, GB/s of weights",
    ),
    "perplexity": (
        ".perplexity",
        "add_perplexity_parser",
        "llama-perplexity's chunked perplexity (and KL divergence against a base model's saved log-probs)",
    ),
    "quantize": (
        ".quantize",
        "add_quantize_parser",
        "convert a GGUF model's weights to another type (llama-quantize's presets and mixes)",
    ),
    "serve": (".server.command", "add_serve_parser", "OpenAI-compatible HTTP server with a chat page at /"),
}


def _command_in(argv: Sequence[str] | None) -> str | None:
    """The subcommand a command line names (its first word that is not an option), None if none."""
    for a in argv or ():
        if not a.startswith("-"):
            return a
        if a in ("-h", "--help"):
            return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    if args.func not in (cmd_run, cmd_chat):
        end_startup_gc()  # only run and chat turn it back on themselves, once the model is loaded
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except LmapError as e:
        print(f"lmap: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
