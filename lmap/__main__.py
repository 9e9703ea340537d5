"""``python -m lmap`` and the ``lmap`` command.

The kernels are built when :mod:`lmap.cli` is imported, and a bad setting found then (an
unknown ``LMAP_SIMD``) is an :class:`~lmap.errors.LmapError` like any other bad input: one line,
not a traceback.
"""

from __future__ import annotations

import sys

from .errors import LmapError


def entry() -> int:
    try:
        from .cli import main
    except LmapError as e:
        print(f"lmap: error: {e}", file=sys.stderr)
        return 1
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
