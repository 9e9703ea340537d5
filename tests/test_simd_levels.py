"""The intrinsics' instruction-set paths (LMAP_SIMD=auto | avx2 | portable) give identical products.

VNNI (vpdpbusd), AVX2 (vpmaddubsw + vpmaddwd) and the portable vector IR compute the same exact
integer block sums, then the same float steps, so a model's logits must not depend on which one
the CPU has. Each level runs in its own process (the level is fixed when the intrinsics are
built) with its own Numba cache folder, on every format's team products for 1 and 3 rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

CHILD = r"""
import sys
import numpy as np
sys.path.insert(0, {tests!r})
from test_team import matrix
from lmap.kernels import simd
from lmap.kernels.chunks import CHUNKS
from lmap.kernels.multivec import RowActs, matmuls

out = {{"level": np.array([simd.SIMD, str(simd.AVX2), str(simd.VNNI)])}}
x = np.random.default_rng(4).standard_normal((3, 512)).astype(np.float32)
for fmt in sorted(CHUNKS):
    w = matrix(fmt, 67, 512, 1)
    for n in (1, 3):
        y = np.zeros((n, w.rows), np.float32)
        matmuls([(w, y)], x[:n], RowActs(4, 512))
        out[f"{{fmt}}-{{n}}"] = y
# the prompt GEMM: VNNI on zmm under auto (where the host has it), portable vector IR otherwise
from lmap.quants import panels
xp = np.random.default_rng(5).standard_normal((7, 512)).astype(np.float32)
for fmt in ("Q8_0", "Q4_1", "Q4_K", "Q6_K"):
    fid, sub = panels.FORMATS[fmt]
    w = matrix(fmt, 48, 512, 2)
    xq = np.zeros((7, 512), np.int8)
    dx = np.zeros((7, 512 // sub), np.float32)
    xs = np.zeros_like(dx)
    panels.quantize_rows(xp, fid, xq, dx, xs)
    y = np.zeros((7, 48), np.float32)
    panels.gemm(fid, w.data, xq, dx, xs, y, np.zeros((2, panels.panel_bytes(512)), np.uint8), np.zeros(1, np.int64), 2)
    out[f"gemm-{{fmt}}"] = y
np.savez({path!r}, **out)
"""


def products(level: str, tmp: Path) -> dict[str, np.ndarray]:
    path = tmp / f"{level}.npz"
    env = dict(os.environ, LMAP_SIMD=level)
    env.pop("NUMBA_CACHE_DIR", None)  # lmap keys its cache folder by the level
    code = CHILD.format(tests=str(Path(__file__).parent), path=str(path))
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=600)
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_every_level_gives_the_same_products(tmp_path: Path) -> None:
    auto = products("auto", tmp_path)
    for level in ("avx2", "portable"):
        other = products(level, tmp_path)
        assert other["level"][0] == level
        for key in auto:
            if key != "level":
                np.testing.assert_array_equal(other[key], auto[key], err_msg=f"{key}: {level} differs from auto")


def test_an_unknown_level_is_named(tmp_path: Path) -> None:
    env = dict(os.environ, LMAP_SIMD="sse9", LMAP_CACHE_DIR=str(tmp_path))
    env.pop("NUMBA_CACHE_DIR", None)
    r = subprocess.run(
        [sys.executable, "-c", "import lmap.kernels.simd"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode != 0
    assert "LMAP_SIMD='sse9'" in r.stderr and "auto, avx2, portable" in r.stderr
    # the command says it in one line, no traceback
    r = subprocess.run(
        [sys.executable, "-m", "lmap", "run", "-p", "hi"], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 1
    assert r.stderr.strip() == "lmap: error: LMAP_SIMD='sse9': expected one of auto, avx2, portable"
    # and no cache folder is made for it (a new folder prunes the oldest: a live process's)
    assert not (tmp_path / "numba").exists() or not any((tmp_path / "numba").iterdir())
