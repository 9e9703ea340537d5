"""The ``serve`` command: argparse options, then model load, engine, app and uvicorn.

Argparse only at import time, so ``lmap --help`` stays fast; FastAPI, uvicorn and NumPy load
when a server starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidParameterError, LmapError

log = logging.getLogger("lmap")

__all__ = ["add_serve_parser", "serve", "main"]


def _options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=None, help="path to a .gguf file or a model name (default smollm2-135m)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 = any free port)")
    p.add_argument(
        "-np", "--parallel", type=int, default=4, help="slots: requests decoded together in one batch (default 4)"
    )
    p.add_argument(
        "-c", "--ctx-size", type=int, default=4096, help="context of each slot in tokens; 0 = model's (default 4096)"
    )
    p.add_argument("-b", "--batch-size", type=int, default=512, help="prompt tokens per forward pass (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LMAP_API_KEY"),
        help="require 'Authorization: Bearer KEY' on the API (default: $LMAP_API_KEY, else no key)",
    )
    p.add_argument("--alias", default=None, help="model name to report and accept (default: the file's stem)")
    p.add_argument("--max-n", type=int, default=16, help="largest n (choices per request) accepted (default 16)")
    p.add_argument("--no-mmap", action="store_true", help="read the model into memory instead of mapping it")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``lmap serve`` on the CLI's subparsers."""
    s: argparse.ArgumentParser = sub.add_parser(
        "serve",
        help="OpenAI-compatible HTTP server with a chat page at /",
        description=(
            "Serve MODEL over an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/embeddings, "
            "/v1/models, /tokenize, /detokenize, /health) with a chat page at /. Requests in flight decode "
            "together in one batch (--parallel slots); more wait in a queue."
        ),
    )
    _options(s)
    s.set_defaults(func=cmd_serve)
    return s


def cmd_serve(args: argparse.Namespace) -> int:
    if args.parallel < 1:
        raise InvalidParameterError(f"--parallel must be >= 1, got {args.parallel}")
    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError(f"--threads must be >= 1, got {args.threads}")
    if not 0 <= args.port < 65536:
        raise InvalidParameterError(f"--port must be in [0, 65535], got {args.port}")
    serve(
        args.model,
        host=args.host,
        port=args.port,
        parallel=args.parallel,
        n_ctx=args.ctx_size,
        n_batch=args.batch_size,
        n_threads=args.threads,
        api_key=args.api_key or None,
        alias=args.alias,
        max_n=args.max_n,
        use_mmap=not args.no_mmap,
    )
    return 0


def serve(
    model: str | os.PathLike[str] | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    parallel: int = 4,
    n_ctx: int = 4096,
    n_batch: int = 512,
    n_threads: int | None = None,
    api_key: str | None = None,
    alias: str | None = None,
    max_n: int = 16,
    use_mmap: bool = True,
) -> None:
    """Load ``model`` and serve it until interrupted (blocks)."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise LmapError(
            f"lmap serve needs FastAPI and uvicorn ({e.name} is missing): pip install -e . (they are lmap dependencies)"
        ) from e

    from ..llama import Llama
    from .app import ServerConfig, create_app
    from .engine import Engine

    llama = Llama(model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads, use_mmap=use_mmap, verbose=False)
    model_id = alias or Path(llama.model_path).stem
    aliases = {Path(llama.model_path).name, llama.model_path}
    if model is not None:
        aliases.add(str(model))
    engine = Engine(llama, parallel)
    app = create_app(engine, ServerConfig(model_id=model_id, aliases=aliases, api_key=api_key, max_n=max_n))
    engine.start()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    print(
        f"lmap: serving {model_id} on http://{host}:{port} ({parallel} slots x {engine.n_ctx} tokens)",
        file=sys.stderr,
        flush=True,
    )
    try:
        server.run()
    finally:
        engine.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m lmap.server", description="lmap's OpenAI-compatible server")
    _options(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    try:
        return cmd_serve(args)
    except LmapError as e:
        print(f"lmap: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
