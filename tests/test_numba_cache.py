"""Numba's cache folder follows the source of every module with compiled code (lmap/numba_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lmap.numba_cache import KEEP, _prune, sources_digest


def _package(root: Path) -> Path:
    pkg = root / "pkg"
    (pkg / "kernels").mkdir(parents=True)
    (pkg / "kernels" / "simd.py").write_text("import numba\nA = 1\n")
    (pkg / "kernels" / "chunks.py").write_text("from numba import cfunc\n")
    (pkg / "cli.py").write_text("print('no compiled code here')\n")
    return pkg


def test_digest_changes_with_an_intrinsic_module_not_with_plain_python(tmp_path: Path) -> None:
    pkg = _package(tmp_path)
    before = sources_digest(pkg)
    (pkg / "cli.py").write_text("print('edited')\n")
    assert sources_digest(pkg) == before  # editing the CLI keeps the warm kernel cache
    (pkg / "kernels" / "simd.py").write_text("import numba\nA = 2\n")
    assert sources_digest(pkg) != before  # an edited intrinsic invalidates every kernel built on it


def test_prune_keeps_the_most_recent_versions(tmp_path: Path) -> None:
    folders = []
    for i in range(KEEP + 2):
        f = tmp_path / f"v{i}"
        f.mkdir()
        os.utime(f, (1_000_000 + i, 1_000_000 + i))
        folders.append(f)
    _prune(tmp_path, folders[0])  # the one in use survives even though it is the oldest
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["v0"] + [f"v{i}" for i in range(KEEP + 2 - (KEEP - 1), KEEP + 2)])


def _cache_dir_in_child(env: dict[str, str]) -> str:
    code = "import lmap, os, numba; print(os.environ['NUMBA_CACHE_DIR'], numba.config.CACHE_DIR)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_import_points_numba_at_a_source_keyed_folder(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env["LMAP_CACHE_DIR"] = str(tmp_path)
    digest = sources_digest(Path(__import__("lmap").__file__).parent)
    want = str(tmp_path / "numba" / digest)
    assert _cache_dir_in_child(env) == f"{want} {want}"
    env["NUMBA_CACHE_DIR"] = str(tmp_path / "mine")  # the user's choice wins
    assert _cache_dir_in_child(env) == f"{tmp_path / 'mine'} {tmp_path / 'mine'}"


_KERNELS = """
import numba
import numpy as np
from numba import prange


@numba.njit(cache=True, parallel=True)
def total(x):
    s = 0.0
    for i in prange(x.shape[0]):
        s += x[i] * 2.0
    return s


@numba.cfunc("float64(float64)", cache=True)
def halve(v):
    return v / 2.0


@numba.njit  # not cached: compiled in each process, linking the cached kernel in
def twice_total(x):
    return 2.0 * total(x)
"""

_USE = """
import sys
import numpy as np
from numba.core import entrypoints
from numba.core.runtime import nrtdynmod
compiled = []
create = nrtdynmod.create_nrt_module
nrtdynmod.create_nrt_module = lambda ctx: compiled.append(1) or create(ctx)
import lmap.kernels  # installs load_without_compiler_setup
from lmap.kernels import ops
import kernels_mod
linalg = 'numba.np.linalg' in sys.modules  # before a compile sets the compiler up
a = np.ones((2, 3), np.float32)
ops.add_inplace(a, a)
from lmap.kernels import team
team.team(2)  # its helpers' loop inlines Numba's carray and ndarray.view
after_lmap = (entrypoints._already_initialized, 'numpy.ma' in sys.modules, 'numba.np.arrayobj' in sys.modules)
x = np.arange(10.0)
print(kernels_mod.total(x), kernels_mod.halve.ctypes(3.0), linalg, kernels_mod.twice_total(x[:4]), a.sum())
print(len(compiled), *after_lmap, entrypoints._already_initialized)
"""


def test_warm_start_loads_cached_kernels_without_the_compiler_set_up(tmp_path: Path) -> None:
    # the first process compiles (Numba's compiler sets itself up); the second only loads: its
    # parallel kernel and its cfunc must run, the compiler's registries stay unimported until a
    # new function is compiled, and that one can link the loaded kernel in (its bitcode, not parsed
    # at load, is parsed then). The runtime's own code is compiled once, then loaded; an lmap
    # kernel loads without Numba's extension scan, numpy.ma or the modules of the Numba library
    # code it inlines (numba.np.arrayobj); others' first call still scans the extensions.
    (tmp_path / "kernels_mod.py").write_text(_KERNELS)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", _USE], capture_output=True, text=True, env=env, timeout=300)
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout.split() == ["90.0", "1.5", "True", "24.0", "12.0", "1", "True", "True", "True", "True"]
    assert runs[1].stdout.split() == ["90.0", "1.5", "False", "24.0", "12.0", "0", "False", "False", "False", "True"]
    (nrt,) = (tmp_path / "cache").glob("nrt-*.nbc")
    nrt.write_bytes(nrt.read_bytes()[:100])  # a damaged file: compiled again, and rewritten
    r = subprocess.run([sys.executable, "-c", _USE], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[:6] == ["90.0", "1.5", "False", "24.0", "12.0", "1"]
    assert len(nrt.read_bytes()) > 1000


def test_elf_symbols_of_an_object_and_of_anything_else() -> None:
    import numba

    from lmap.numba_cache import elf_defined_symbols

    @numba.njit
    def add_one(v: float) -> float:
        return v + 1.0

    add_one(1.0)
    library = add_one.overloads[add_one.signatures[0]].library
    obj = library._get_compiled_object() if library._object_caching_enabled else library.emit_native_object()
    names = elf_defined_symbols(obj)
    # what Numba itself records on a load: LLVM's list of the module's definitions
    module = library._get_module_for_linking()
    defined = {g.name for gs in (module.functions, module.global_variables) for g in gs if not g.is_declaration}
    assert names == defined and any("add_one" in n for n in names)
    for junk in (b"", b"\x7fELF" + bytes(60), b"MZ" + bytes(100), obj[:100]):
        assert elf_defined_symbols(junk) is None  # not ELF64, or cut short: Numba's own path


def test_a_fork_right_after_import_can_load_kernels(tmp_path: Path) -> None:
    # the runtime compiles on another thread under Numba's compiler lock; a child forked at that
    # moment must not inherit the lock held (it would hang at its first kernel)
    (tmp_path / "kernels_mod.py").write_text(_KERNELS)
    code = (
        "import os, time, numpy as np\n"
        "import lmap.kernels\n"
        "time.sleep(0.005)  # the compile thread holds the lock by now (for ~20 ms)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    import kernels_mod\n"
        "    print(kernels_mod.total(np.arange(10.0)), flush=True)\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.split() == ["90.0"], r.stderr


def test_a_kernel_compiled_after_its_cache_folder_was_pruned_is_saved(tmp_path: Path) -> None:
    # another lmap version's start may prune this one's folder while it runs (a server, a test
    # run): a kernel compiled afterwards must still save, into the folder made again
    (tmp_path / "kernels_mod.py").write_text(_KERNELS)
    code = (
        "import os, shutil, numpy as np\n"
        "import lmap.kernels\n"
        "import kernels_mod\n"
        "shutil.rmtree(os.environ['NUMBA_CACHE_DIR'])\n"
        "print(kernels_mod.total(np.arange(10.0)))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(tmp_path)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["90.0"], r.stderr
    assert list((tmp_path / "cache").rglob("*total*.nbi"))
