"""``python -m lmap`` and the ``lmap`` command.

The kernels are built when :mod:`lmap.cli` is imported, and a bad setting found then (an
unknown ``LMAP_SIMD``) is an :class:`~lmap.errors.LmapError` like any other bad input: one line,
not a traceback.

The process ends with ``os._exit`` once the command is done and its output flushed: tearing down
the interpreter (Numba's type registries, LLVM's modules, the tokenizer's tables, object by
object) took 0.4 s after ``lmap run`` had printed its answer, a third of the time to first token
measured on a whole process. Every command closes its own files before returning, and no
atexit handler of lmap's does anything an exiting process needs.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

from .errors import LmapError


def _numba_without_scipy() -> None:
    """Let Numba set up its CPU target, when it compiles, without importing SciPy's BLAS or CFFI.

    Numba's first compile installs its NumPy support, whose import probes
    ``scipy.linalg.cython_blas`` (0.18 s here) to decide how ``np.dot`` and friends compile in
    jitted code, and its CFFI support, which parses C declarations with pycparser (~0.015 s);
    lmap's kernels use neither. Both are answered "absent" for that set-up only, so anything
    later in the process can still import them. A warm start loads cached kernels without that
    set-up at all (``numba_cache.load_without_compiler_setup``), so this costs nothing then.

    Numba's import also imports PyYAML (5 ms), only to read a ``.numba_config.yaml`` in the
    working folder: it is answered "absent" too unless such a file is there.
    """
    yaml = () if os.path.exists(".numba_config.yaml") else ("yaml",)
    _numba_entry_points_lazily()
    with _absent("scipy", "cffi", *yaml):
        from numba.core.registry import cpu_target

        ctx = cpu_target.target_context
    setup = ctx.refresh

    def refresh_without_scipy() -> None:
        del ctx.refresh  # the first set-up is the costly one; later refreshes are Numba's own
        with _absent("scipy", "cffi"):
            setup()

    ctx.refresh = refresh_without_scipy  # type: ignore[method-assign]


class _LazyEntryPoints(importlib.abc.MetaPathFinder):
    """Find ``numba.core.entrypoints`` as a module that runs its code on first use.

    Its only import is ``importlib.metadata`` (with ``email``, ``zipfile``, ``csv``: 12-14 ms
    here), for ``init_all()``, which Numba calls before a compile: lmap's cached kernels put it
    off until they compile (``numba_cache``), so a warm start never needs it.
    """

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "numba.core.entrypoints":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = importlib.util.LazyLoader(spec.loader)
        return spec


def _numba_entry_points_lazily() -> None:
    if "numba.core.entrypoints" not in sys.modules:
        sys.meta_path.insert(0, _LazyEntryPoints())


@contextlib.contextmanager
def _absent(*modules: str) -> Iterator[None]:
    """Make importing ``modules`` fail while the block runs, unless they are imported already."""
    names = [n for n in modules if n not in sys.modules]
    for name in names:
        sys.modules[name] = None  # type: ignore[assignment]  # importing under a None entry raises ImportError
    try:
        yield
    finally:
        for name in names:
            del sys.modules[name]


def entry() -> int:
    # Start-up allocates a million long-lived objects (Numba's type registries, the tokenizer) and
    # the collector scanned them over and over: 0.13 s of the time to first token. It is back on,
    # with all of that frozen out of its way, once the model is loaded (cli.end_startup_gc).
    gc.disable()
    try:
        _numba_without_scipy()
        from .cli import main
    except LmapError as e:
        print(f"lmap: error: {e}", file=sys.stderr)
        return 1
    rc = main()
    _exit_now(rc)
    return rc  # not reached


def _exit_now(rc: int) -> None:
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe (lmap ... | head) takes nothing more
            stream.flush()
    os._exit(rc)


if __name__ == "__main__":
    raise SystemExit(entry())
