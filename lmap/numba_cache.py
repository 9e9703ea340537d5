"""Numba's on-disk cache, keyed by the source of every module that holds compiled code.

Numba invalidates a cached kernel only when *its own* file changes (mtime and size). lmap's
kernels are built from LLVM intrinsics defined in other modules (``simd.py`` feeds
``simd_multi.py`` feeds ``chunks.py``), so editing an intrinsic left the kernels that inline it
loading stale machine code: wrong numbers or a crash, with nothing to say why. Pointing
``NUMBA_CACHE_DIR`` at a folder named by a hash of all those sources makes any edit start a fresh
cache, and an unchanged install keep its warm one. A user's own ``NUMBA_CACHE_DIR`` wins.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

KEEP = 3  # source versions whose caches are kept (a few checkouts or venvs side by side)


def sources_digest(package: Path) -> str:
    """A short hash of every ``.py`` file under ``package`` that uses Numba, in path order."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(package.rglob("*.py")):
        data = path.read_bytes()
        if b"numba" in data:
            h.update(str(path.relative_to(package)).encode())
            h.update(data)
    return h.hexdigest()


def _prune(root: Path, keep: Path) -> None:
    """Delete all but the KEEP most recently used version folders under ``root``."""
    try:
        folders = sorted((p for p in root.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    except OSError:
        return
    for old in [p for p in folders if p != keep][KEEP - 1 :]:
        shutil.rmtree(old, ignore_errors=True)


def use_source_keyed_cache() -> None:
    """Set Numba's cache folder to ``<lmap cache>/numba/<sources hash>`` unless the user chose one."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return
    from .registry import cache_dir

    root = cache_dir() / "numba"
    name = sources_digest(Path(__file__).parent)
    # LMAP_SIMD picks the intrinsics' instruction set at import: its kernels must not share a cache
    # (an unknown value makes no folder: the kernels refuse it before compiling anything)
    simd = "".join(c for c in os.environ.get("LMAP_SIMD", "").lower() if c.isalnum())
    if simd not in ("", "auto", "avx2", "portable"):
        return
    folder = root / (f"{name}-{simd}" if simd and simd != "auto" else name)
    try:
        new = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        os.utime(folder)  # most recently used, for pruning
    except OSError:
        return  # an unwritable cache folder: Numba falls back to its own locations
    if new:
        _prune(root, folder)
    os.environ["NUMBA_CACHE_DIR"] = str(folder)
    if "numba" in sys.modules:  # imported before lmap: its config has already read the environment
        import numba

        numba.config.CACHE_DIR = str(folder)


def load_without_compiler_setup() -> None:
    """Load cached kernels without first setting up Numba's compiler.

    Numba's ``Cache.load_overload`` refreshes the CPU target before every load: it imports
    ~70 modules of implementations (NumPy's linalg, typed containers, random generators...) and
    installs their typing and lowering registries, ~0.2 s of a warm start that only relinks
    machine code. A load needs none of that, only the runtime (NRT) whose functions cached code
    calls, so this loads without the refresh. A cache miss still compiles through Numba's
    compiler, which refreshes both contexts itself (``CompilerBase.__init__``), so a cold start
    is unchanged. Applied once, to Numba's one file-cache class; if a Numba release renames what
    this relies on, loads simply keep their refresh.
    """
    from llvmlite.binding import ffi
    from numba.core import caching, dispatcher, entrypoints
    from numba.core.runtime import rtsys

    original = caching.Cache.load_overload
    if getattr(original, "_lmap_no_refresh", False) or not hasattr(caching.Cache, "_load_overload"):
        return

    def load_overload(self: caching.Cache, sig: object, target_context: object) -> object:
        rtsys.initialize(target_context)  # once; cached code links against the NRT's functions
        # Numba times its compiles with an event fired on every call into LLVM; a load makes
        # ~150 such calls (symbol by symbol) and reports no timings, so the callbacks are off
        # meanwhile (~1 ms per kernel loaded).
        callbacks = list(getattr(getattr(ffi.lib, "_lock", None), "_cblist", ()))
        for acquired, released in callbacks:
            ffi.unregister_lock_callback(acquired, released)
        try:
            with self._guard_against_spurious_io_errors():
                cres = self._load_overload(sig, target_context)
        finally:
            for acquired, released in callbacks:
                ffi.register_lock_callback(acquired, released)
        if cres is None:
            entrypoints.init_all()  # a compile follows: the extensions lmap's dispatchers put off
        return cres

    def init_hook(self: dispatcher._DispatcherBase) -> None:
        # Numba loads its third-party extensions (entry points: a scan of every installed
        # distribution, 13 ms) before typing any call. lmap's kernels take arrays and numbers, so
        # theirs waits for a compile (above), which a warm start never reaches; others' is unchanged.
        cached = isinstance(getattr(self, "_cache", None), caching.Cache)
        if not (cached and getattr(self.py_func, "__module__", "").startswith("lmap.")):
            chain_init_hook(self)

    chain_init_hook = dispatcher._DispatcherBase._compilation_chain_init_hook
    dispatcher._DispatcherBase._compilation_chain_init_hook = init_hook  # type: ignore[method-assign]
    load_overload._lmap_no_refresh = True  # type: ignore[attr-defined]
    load_overload.__doc__ = original.__doc__
    caching.Cache.load_overload = load_overload  # type: ignore[method-assign]
    _link_modules_on_demand()
    _cache_folder_checked_once()
    _typeof_arrays_without_numpy_ma()
    _environments_without_imports()
    _initialize_runtime(rtsys)


def _cache_folder_checked_once() -> None:
    """Check that the cache folder is writable once, not once per kernel.

    Numba proves it by creating and deleting a temporary file there for every cached function
    when it is defined: 126 files, 3 ms of importing lmap. The folder is still made again when
    missing (another version's start may have pruned it since), before each save as before.
    """
    from numba.core import caching

    original = caching._CacheLocator.ensure_cache_path
    if getattr(original, "_lmap_once", False):
        return
    checked: set[str] = set()

    def ensure_cache_path(self: caching._CacheLocator) -> None:
        path = self.get_cache_path()
        if path in checked:
            os.makedirs(path, exist_ok=True)
        else:
            original(self)
            checked.add(path)

    ensure_cache_path._lmap_once = True  # type: ignore[attr-defined]
    caching._CacheLocator.ensure_cache_path = ensure_cache_path  # type: ignore[method-assign]


def _environments_without_imports() -> None:
    """Rebuild the environments of Numba's own library code without importing its modules.

    Every compiled function has an environment: its module's globals, for object-mode code, and
    its constants. A cached kernel that inlines Numba's ``carray`` or ``ndarray.view`` brings their
    environments along, and rebuilding one imports its module (``numba.np.arrayobj``: 22 ms of a
    warm start). Nopython code never reads those globals, and an environment without constants
    holds nothing else, so such an environment of a ``numba.*`` module not yet imported is made
    with just the module's name (what pickling it again needs). Any other keeps Numba's path.
    """
    from numba.core import environment

    original = environment._rebuild_env
    if getattr(original, "_lmap_lazy", False):
        return

    def _rebuild_env(modname: str, consts: list, env_name: str) -> object:  # type: ignore[type-arg]
        if consts or modname in sys.modules or not modname.startswith("numba."):
            return original(modname, consts, env_name)
        env = environment.lookup_environment(env_name)
        if env is None:
            env = environment.Environment({"__name__": modname})
            env.env_name = env_name
            environment.Environment._memo[env_name] = env
        return env

    _rebuild_env._lmap_lazy = True  # type: ignore[attr-defined]
    environment._rebuild_env = _rebuild_env


def _typeof_arrays_without_numpy_ma() -> None:
    """Type plain ndarrays without importing ``numpy.ma``.

    Numba's typing of an array argument starts with ``isinstance(val, np.ma.MaskedArray)``, and
    that attribute imports ``numpy.ma`` (8 ms, at the first kernel call of a start). A plain
    ``np.ndarray`` is never a masked array, so it is typed directly, with the same calls Numba
    makes after that check; subclasses, and dtypes Numba rejects, go through Numba's own function.
    """
    import numpy as np
    from numba.core import errors, types
    from numba.core.typing.typeof import typeof_impl
    from numba.np import numpy_support

    original = typeof_impl.dispatch(np.ndarray)
    if getattr(original, "_lmap_plain", False):
        return

    def typeof_ndarray(val: np.ndarray, c: object) -> object:
        if type(val) is not np.ndarray:
            return original(val, c)
        try:
            dtype = numpy_support.from_dtype(val.dtype)
        except errors.NumbaNotImplementedError:
            return original(val, c)  # its message names the dtype
        return types.Array(dtype, val.ndim, numpy_support.map_layout(val), readonly=not val.flags.writeable)

    typeof_ndarray._lmap_plain = True  # type: ignore[attr-defined]
    typeof_impl.register(np.ndarray)(typeof_ndarray)


def _link_modules_on_demand() -> None:
    """Parse a cached kernel's LLVM bitcode only when a later compile links it in.

    A cached kernel is stored as machine code plus its LLVM bitcode, kept so that new code can
    inline it; Numba parses that bitcode on every load (~1.6 ms a kernel, a third of a warm start's
    loading) just to learn which symbols the machine code defines. Those names are read from the
    object file's ELF symbol table instead (defined, named symbols: every function and global the
    engine can be asked for), and the bitcode is parsed the first time a compile links the kernel.
    Objects that are not ELF (other platforms) take Numba's own path.
    """
    import llvmlite.binding as ll
    from numba.core import codegen

    lib = codegen.CPUCodeLibrary
    needed = (hasattr(lib, "_unserialize"), hasattr(lib, "_get_module_for_linking"), hasattr(codegen, "JitEngine"))
    if getattr(lib, "_lmap_lazy_bitcode", False) or not all(needed):
        return  # already done, or a Numba whose internals differ: its own path
    unserialize, for_linking = lib._unserialize.__func__, lib._get_module_for_linking  # type: ignore[attr-defined]

    def _unserialize(cls: type, cg: object, state: tuple) -> object:  # type: ignore[type-arg]
        name, kind, data = state
        names = elf_defined_symbols(data[0]) if kind == "object" else None
        if names is None or not isinstance(getattr(getattr(cg, "_engine", None), "_defined_symbols", None), set):
            return unserialize(cls, cg, state)
        self = cg.create_library(name)  # type: ignore[attr-defined]
        self.enable_object_caching()
        self._set_compiled_object(data[0])
        self._lmap_shared_bitcode = data[1]
        self._finalize_final_module()
        cg._engine._defined_symbols |= names  # type: ignore[attr-defined]  # what _load_defined_symbols records
        return self

    def _get_module_for_linking(self: codegen.CPUCodeLibrary) -> object:
        pending = self.__dict__.pop("_lmap_shared_bitcode", None)
        if pending is not None:
            self._shared_module = ll.parse_bitcode(pending)
        return for_linking(self)

    lib._unserialize = classmethod(_unserialize)  # type: ignore[assignment,method-assign]
    lib._get_module_for_linking = _get_module_for_linking  # type: ignore[method-assign]
    lib._lmap_lazy_bitcode = True  # type: ignore[attr-defined]


def elf_defined_symbols(obj: bytes) -> set[str] | None:
    """Names of the symbols a little-endian ELF64 object defines; None if ``obj`` is not one."""
    import struct

    if len(obj) < 64 or obj[:4] != b"\x7fELF" or obj[4] != 2 or obj[5] != 1:
        return None
    try:
        (shoff,) = struct.unpack_from("<Q", obj, 0x28)
        shentsize, shnum = struct.unpack_from("<HH", obj, 0x3A)
        sections = [struct.unpack_from("<IIQQQQIIQQ", obj, shoff + i * shentsize) for i in range(shnum)]
        names: set[str] = set()
        for _, sh_type, _, _, offset, size, link, _, _, entsize in sections:
            if sh_type != 2 or entsize != 24:  # SHT_SYMTAB of Elf64_Sym
                continue
            str_off = sections[link][4]
            for at in range(offset + 24, offset + size, 24):  # entry 0 is the null symbol
                st_name, st_info, _, st_shndx = struct.unpack_from("<IBBH", obj, at)
                if st_shndx == 0 or st_name == 0 or st_info & 0xF in (3, 4):  # undefined, unnamed, section, file
                    continue
                end = obj.index(b"\0", str_off + st_name)
                names.add(obj[str_off + st_name : end].decode())
        return names
    except (struct.error, IndexError, ValueError, UnicodeDecodeError):
        return None


def _initialize_runtime(rtsys: object) -> None:
    """Set up the NRT, whose functions cached kernels call, from its own cached machine code.

    Numba compiles the NRT's functions from LLVM IR in every process (15 ms alone, and ~35 ms of
    waiting at the first kernel load when overlapped with start-up's imports). Its object code
    depends only on Numba's version and this CPU, so it is kept next to the kernels, keyed by
    both, and loaded like them. Without a cache folder, or on a Numba whose internals differ, it
    is compiled on a background thread while start-up imports and parses on.
    """
    from numba.core.registry import cpu_target

    ctx = cpu_target.target_context  # made here, on the importing thread, never by two threads at once
    path = _runtime_cache_path(ctx)
    if path is not None and _load_runtime(rtsys, ctx, path):
        return
    from numba.core.compiler_lock import global_compiler_lock

    def run() -> None:
        with global_compiler_lock:
            if path is not None:
                try:
                    _compile_runtime(rtsys, ctx, path)
                    return
                except Exception:  # noqa: BLE001 - Numba's internals differ: its own set-up below
                    pass
            rtsys.initialize(ctx)  # type: ignore[attr-defined]

    thread = threading.Thread(target=run, name="lmap-nrt", daemon=True)
    thread.start()
    # a fork meanwhile (multiprocessing's default here) would copy the compiler lock held, and the
    # child's first kernel would wait on it forever: forks wait for the compile instead
    os.register_at_fork(before=thread.join)


def _runtime_cache_path(ctx: object) -> Path | None:
    import numba
    from numba.core.runtime import _nrt_python, nrtdynmod

    needed = (hasattr(nrtdynmod, "create_nrt_module"), hasattr(_nrt_python, "c_helpers"))
    if not numba.config.CACHE_DIR or not all(needed):
        return None
    try:
        magic = repr((numba.__version__, ctx.codegen().magic_tuple()))  # type: ignore[attr-defined]
    except AttributeError:
        return None
    return Path(numba.config.CACHE_DIR) / f"nrt-{hashlib.blake2b(magic.encode(), digest_size=8).hexdigest()}.nbc"


def _add_runtime_symbols() -> None:
    """What ``rtsys.initialize`` does before compiling: the NRT's C helpers become linkable symbols
    (the NRT's own machine code calls them, so they must exist before it is loaded)."""
    import llvmlite.binding as ll
    from numba.core import config
    from numba.core.runtime import _nrt_python

    if config.NRT_STATS:
        _nrt_python.memsys_enable_stats()
    for py_name, address in _nrt_python.c_helpers.items():
        ll.add_symbol(py_name if py_name.startswith("_") else "NRT_" + py_name, address)


def _load_runtime(rtsys: object, ctx: object, path: Path) -> bool:
    import pickle

    from numba.core.compiler_lock import global_compiler_lock

    try:
        state = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError):
        return False
    with global_compiler_lock:
        if getattr(rtsys, "_init", False):
            return True
        try:
            _add_runtime_symbols()
            library = ctx.codegen().unserialize_library(state)  # type: ignore[attr-defined]
        except Exception:  # noqa: BLE001 - a file from elsewhere, or Numba's internals differ: compile
            return False
        rtsys._library = library  # type: ignore[attr-defined]
        rtsys._init = True  # type: ignore[attr-defined]
    return True


def _compile_runtime(rtsys: object, ctx: object, path: Path) -> None:
    """Compile the NRT as ``rtsys.initialize`` does, with its object code kept at ``path``."""
    import pickle

    from numba.core.runtime import nrtdynmod

    if getattr(rtsys, "_init", False):
        return
    _add_runtime_symbols()
    ir_mod, library = nrtdynmod.create_nrt_module(ctx)
    library.enable_object_caching()
    library.add_ir_module(ir_mod)
    library.finalize()
    rtsys._library = library  # type: ignore[attr-defined]
    rtsys._init = True  # type: ignore[attr-defined]
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:  # written whole then renamed: a concurrent start never reads half a file
        tmp.write_bytes(pickle.dumps(library.serialize_using_object_code()))
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
