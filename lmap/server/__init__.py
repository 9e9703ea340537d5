"""lmap's OpenAI-compatible server: ``lmap serve -m MODEL`` or ``python -m lmap.server``.

- :mod:`~lmap.server.engine`: the worker thread, slots, continuous batching;
- :mod:`~lmap.server.app`: FastAPI routes, request checks, OpenAI-shaped responses and errors;
- :mod:`~lmap.server.schemas`: request bodies;
- :mod:`~lmap.server.command`: the command line (argparse only until it runs);
- ``static/index.html``: the chat page served at ``/``.

Importing this package is cheap: FastAPI, uvicorn and the model load only when a server starts.
"""

from __future__ import annotations

__all__ = ["add_serve_parser", "serve"]

from .command import add_serve_parser, serve
