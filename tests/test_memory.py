"""Memory while it talks: a flat line over 1 000 decoded tokens; load modes (no-mmap, mlock)."""

from __future__ import annotations

import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

MiB = 1 << 20


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmRSS", "RssAnon", "RssFile", "VmLck", "VmHWM"):
            out[k] = int(v.split()[0]) * 1024
    return out


@pytest.mark.slow
def test_1000_tokens_allocate_nothing(gemma3_path: object) -> None:
    from lmap.llama import Llama

    llm = Llama(gemma3_path, n_ctx=2048, verbose=False)  # type: ignore[arg-type]
    gen = llm.generate(llm.tokenize(b"Once upon a time, in a small village by the sea,"), temp=0.8, seed=1)
    before = heap0 = 0
    for i, _ in enumerate(gen):  # generate() ignores EOS: the caller decides when to stop
        if i == 50:  # warm-up done: first-use allocations (sampler buffers, caches) are behind
            before = _status()["VmRSS"]
            tracemalloc.start()
            heap0 = tracemalloc.get_traced_memory()[0]
        if i == 1050:
            break
    heap = tracemalloc.get_traced_memory()[0] - heap0
    tracemalloc.stop()
    after = _status()
    assert llm.n_tokens > 1000
    assert after["VmRSS"] - before < 1 * MiB
    assert heap < 1 * MiB
    print(f"RssAnon {after['RssAnon'] / MiB:.1f} MiB, RssFile {after['RssFile'] / MiB:.1f} MiB")


_LOAD = r"""
import json, sys
def st():
    return {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status')
            if l.startswith(('VmRSS', 'RssAnon', 'RssFile', 'VmLck'))}
import lmap.llama
from lmap.llama import Llama
path, mode = sys.argv[1], sys.argv[2]
base = st()
try:
    llm = Llama(path, n_ctx=256, use_mmap=mode != "no-mmap", use_mlock=mode == "mlock", verbose=False)
except Exception as e:
    print(json.dumps({"error": str(e)})); sys.exit(0)
loaded = st()
gen = llm.generate(llm.tokenize(b"The capital of France is"), temp=0.0)
toks = [next(gen) for _ in range(12)]
print(json.dumps({"base": base, "loaded": loaded, "tokens": toks, "size": llm.model_size_bytes}))
"""


def _load(path: object, mode: str, limit: int | None = None) -> dict:  # type: ignore[type-arg]
    import json

    def lower() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))

    out = subprocess.run(
        [sys.executable, "-c", _LOAD, str(path), mode], capture_output=True, text=True, check=True, preexec_fn=lower
    )
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.slow
def test_no_mmap_same_tokens_in_anonymous_memory(smollm2_path: object) -> None:
    # a first load of each mode fills Numba's cache: on a fresh one (CI's first run after a kernel
    # change) the measured load would hold its compiler's memory too, ~40 MiB of RssAnon and LLVM's
    # pages, in one process only; a copied file's writable arrays compile kernels of their own
    _load(smollm2_path, "mmap")
    _load(smollm2_path, "no-mmap")
    mapped = _load(smollm2_path, "mmap")
    copied = _load(smollm2_path, "no-mmap")
    assert copied["tokens"] == mapped["tokens"]
    size = mapped["size"]
    grow = {
        m: {k: r["loaded"][k] - r["base"][k] for k in ("RssAnon", "RssFile")} for m, r in (("m", mapped), ("c", copied))
    }
    # the weights move from file-backed pages to anonymous ones
    assert grow["c"]["RssAnon"] - grow["m"]["RssAnon"] > 0.9 * size
    assert grow["m"]["RssFile"] - grow["c"]["RssFile"] > 0.9 * size


@pytest.mark.slow
def test_mlock_pins_the_file(smollm2_path: object) -> None:
    r = _load(smollm2_path, "mlock")
    assert "error" not in r, r
    size = r["size"]
    assert r["loaded"]["VmLck"] >= 0.95 * size
    assert r["tokens"] == _load(smollm2_path, "mmap")["tokens"]


@pytest.mark.slow
def test_mlock_failure_names_ulimit(smollm2_path: object) -> None:
    r = _load(smollm2_path, "mlock", limit=64 * 1024)
    if "error" not in r:
        pytest.skip("mlock succeeded under a 64 KiB RLIMIT_MEMLOCK: this process has CAP_IPC_LOCK (root)")
    assert "ulimit -l" in r["error"]
