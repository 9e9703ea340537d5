"""Compiled (Numba) kernels and the threading set-up they need.

Numba's parallel launches cost ~2 µs with TBB against ~70 µs with its own
workqueue and milliseconds with OpenMP on a loaded machine, and a forward pass
makes hundreds of launches, so TBB is preferred. The pip ``tbb`` wheel puts
``libtbb.so.12`` under ``sys.prefix/lib``, which the loader may not search
(virtual environments); preloading it by path makes Numba's TBB pool import.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys
from pathlib import Path

from ..numba_cache import load_without_compiler_setup

log = logging.getLogger("lmap")


def _preload_tbb() -> bool:
    for prefix in {sys.prefix, sys.base_prefix}:
        lib = Path(prefix) / "lib" / "libtbb.so.12"
        if lib.exists():
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                return True
            except OSError:
                continue
    try:
        ctypes.CDLL("libtbb.so.12", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


if "NUMBA_THREADING_LAYER" not in os.environ:
    os.environ["NUMBA_THREADING_LAYER"] = "tbb" if _preload_tbb() else "workqueue"

load_without_compiler_setup()
