"""``python -m lmap.server [-m MODEL] [--host H] [--port P] [--parallel N] [-c CTX] [--api-key KEY]``."""

from __future__ import annotations

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
