"""``python -m lmap.server [-m MODEL] [--host H] [--port P] [--parallel N] [-c CTX] [--api-key KEY]``."""

from __future__ import annotations

import sys

from ..errors import LmapError

if __name__ == "__main__":
    try:
        from .command import main
    except LmapError as e:  # a bad setting found while the kernels are built (e.g. LMAP_SIMD)
        print(f"lmap: error: {e}", file=sys.stderr)
        sys.exit(1)
    sys.exit(main())
