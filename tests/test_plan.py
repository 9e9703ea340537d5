"""The memory plan (lmap/plan.py) against the allocated buffers and the measured RSS."""

from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmap.kv_cache import KVCache
from lmap.models.base import HParams, Scratch
from lmap.plan import MiB, context_arrays, kv_buffers, plan, plan_for_file, prefault, scratch_buffers


def _hp(**kw: object) -> HParams:
    base = dict(arch="t", n_ctx_train=8192, n_embd=192, n_layer=6, n_ff=512, n_head=6, n_head_kv=2)
    base.update(kw)
    hp = HParams(**base)  # type: ignore[arg-type]
    hp.head_dim_k = hp.head_dim_k or hp.n_embd // hp.n_head
    hp.head_dim_v = hp.head_dim_v or hp.head_dim_k
    hp.n_rot = hp.n_rot or hp.head_dim_k
    hp.n_vocab = hp.n_vocab or 1000
    return hp


CASES = [
    # n_ctx, n_batch, window, type_k, type_v, n_seq, logits_all, activations
    (256, 64, 0, "f16", "f16", 1, False, "q8"),
    (300, 4, 0, "f32", "f16", 1, False, "f32"),  # small batch: no prefill attention scratch
    (1024, 128, 96, "q8_0", "q8_0", 1, True, "q8"),  # sliding window: ring layers
    (512, 32, 64, "f16", "q8_0", 3, False, "q8"),  # several sequences (server slots)
]


@pytest.mark.parametrize(("n_ctx", "n_batch", "window", "tk", "tv", "n_seq", "logits_all", "act"), CASES)
def test_plan_equals_allocated_nbytes(
    n_ctx: int, n_batch: int, window: int, tk: str, tv: str, n_seq: int, logits_all: bool, act: str
) -> None:
    hp = _hp(sliding_window=window)
    swa = [il % 3 != 2 for il in range(hp.n_layer)]
    kv = KVCache(
        hp.n_layer,
        n_ctx,
        hp.n_head_kv,
        hp.head_dim_k,
        hp.head_dim_v,
        tk,
        tv,
        swa_layers=swa,
        window=window,
        n_batch=n_batch,
        n_seq=n_seq,
    )
    assert sum(b.nbytes for b in kv_buffers(hp, n_ctx, n_batch, swa, tk, tv, n_seq)) == kv.nbytes
    rows = n_batch if logits_all else 1
    s = Scratch(hp, n_batch, n_ctx, rows, act, n_seq)
    planned = scratch_buffers(hp, n_batch, n_ctx, rows, act, n_seq)
    assert sum(b.nbytes for b in planned) == s.nbytes
    p = plan(hp, n_ctx=n_ctx, n_batch=n_batch, swa_layers=swa, type_k=tk, type_v=tv, n_seq=n_seq, activations=act)
    assert p.group("kv") == kv.nbytes
    assert p.total == p.anon + p.file
    assert "total" in p.table()


def test_q8_0_cache_is_53_percent_of_f16() -> None:
    hp = _hp(n_embd=256, n_head=4, n_head_kv=1)  # head_dim 64
    f16 = plan(hp, n_ctx=2048, type_k="f16", type_v="f16").group("kv")
    q8 = plan(hp, n_ctx=2048, type_k="q8_0", type_v="q8_0").group("kv")
    assert 0.52 < q8 / f16 < 0.54


def test_prefault_makes_pages_resident() -> None:
    def anon() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssAnon")

    # a fresh anonymous mapping: np.zeros may reuse heap pages freed (resident) by earlier tests
    buf = mmap.mmap(-1, 64 * MiB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    a = np.frombuffer(buf, np.uint8)  # mapped lazily: not resident yet
    before = anon()
    assert prefault([a]) == 64 * MiB
    assert anon() - before > 56 * MiB


def test_map_in_background_maps_a_file(tmp_path: Path) -> None:
    from lmap.plan import map_in_background

    def file_rss() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no RssFile")

    path = tmp_path / "weights.bin"
    path.write_bytes(np.arange(32 * MiB, dtype=np.uint8).tobytes())  # in the page cache, not mapped
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    a = np.frombuffer(m, np.uint8)
    before = file_rss()
    map_in_background(a[100:]).join()  # an unaligned start maps from its page on
    assert file_rss() - before > 30 * MiB
    del a
    m.close()


@pytest.mark.parametrize("n_head_kv", [1, 2])
def test_attention_and_ffn_share_one_arena(n_head_kv: int) -> None:
    # liveness: the attention's buffers are dead when the FFN's are written, so they share memory;
    # the buffers of one side never overlap each other; xb2 (written after attention, and after the
    # gated activation folds hb2 into hb) overlays q and hb2 and nothing else that is live with it
    from itertools import combinations

    s = Scratch(_hp(n_head_kv=n_head_kv), 64, 256, 1)
    assert s.attn is not None
    attn = [s.q, s.k, s.v, s.att, s.attn.k, s.attn.v, s.attn.q, s.attn.o, s.attn.inv, s.attn.s]
    attn = [a for a in attn if a.size]  # one KV head: no gathered q, o
    assert len(attn) == (8 if n_head_kv == 1 else 10)
    for side in (attn, [s.hb, s.hb2]):
        assert not any(np.shares_memory(a, b) for a, b in combinations(side, 2))
        assert all(a.base is not None and np.shares_memory(a, s.arena) for a in side)
    assert np.shares_memory(s.hb2, s.q)
    assert s.arena.nbytes < sum(a.nbytes for a in attn + [s.hb, s.hb2])
    assert np.shares_memory(s.xb2, s.q) and np.shares_memory(s.xb2, s.hb2)
    others = [a for a in attn if a is not s.q] + [s.hb, s.x, s.xb]
    assert not any(np.shares_memory(s.xb2, a) for a in others)
    # where it does not fit in both, it has its own buffer
    wide = Scratch(_hp(n_ff=128), 64, 256, 1)
    assert wide.xb2.base is None


def test_context_arrays_leave_cell_maps_alone() -> None:
    hp = _hp()
    s = Scratch(hp, 16, 64, 1)
    arrays = context_arrays(s)
    assert sum(a.nbytes for a in arrays) == s.nbytes  # every scratch array, the nested ones included


_MEASURE = r"""
import json, sys
from lmap.llama import Llama
from lmap.plan import plan_for_file
path, n_ctx = sys.argv[1], int(sys.argv[2])
llm = Llama(path, n_ctx=n_ctx, verbose=False)
st = {l.split(':')[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/status')
      if l.startswith(('VmRSS', 'RssAnon', 'RssFile'))}
p = plan_for_file(path, n_ctx)
print(json.dumps({"rss": st["VmRSS"], "anon": st["RssAnon"], "file": st["RssFile"], "plan": p.total,
                  "kv": p.group("kv"), "kv_alloc": llm._kv.nbytes}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2_path", "gemma3_path"])
@pytest.mark.parametrize("n_ctx", [512, 2048])
def test_plan_matches_rss(model: str, n_ctx: int, request: pytest.FixtureRequest) -> None:
    """A fresh process that loaded the model (its weights mapped in at load) is within 10 % of the plan."""
    path = request.getfixturevalue(model)
    # twice: a first process may compile kernels missing from Numba's cache (a fresh checkout),
    # and LLVM's memory is not part of a warm start's plan
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _MEASURE, str(path), str(n_ctx)], capture_output=True, text=True, check=True
        )
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["kv"] == m["kv_alloc"]
    assert abs(m["rss"] - m["plan"]) <= 0.10 * m["rss"], m
    if model == "gemma3_path" and n_ctx == 2048:
        # issue 5's bar: llama.cpp's llama-completion on this file at -c 2048 holds 85.8 MiB of
        # anonymous memory (85.9 measured again 2026-12-06; lmap's loaded process: ~80)
        assert m["anon"] <= 85.8 * MiB, f"gemma3 at n_ctx 2048 holds {m['anon'] / MiB:.1f} MiB anonymous"


@pytest.mark.slow
def test_info_memory_cli(smollm2_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from lmap.cli import main
    from lmap.plan import max_ctx, plan_for_file

    assert main(["info", str(smollm2_path), "--memory", "-c", "1024", "--mem-budget", "600M"]) == 0
    out = capsys.readouterr().out
    assert "memory plan: n_ctx 1024" in out and "layers 0-29 K+V (30 x 0.75)" in out
    n = max_ctx(smollm2_path, 600 * MiB)  # type: ignore[arg-type]
    assert f"largest context within 600.0 MiB: -c {n}" in out
    assert plan_for_file(smollm2_path, n).total <= 600 * MiB  # type: ignore[arg-type]
    n = max_ctx(smollm2_path, 400 * MiB)  # type: ignore[arg-type]
    assert 0 < n < 8192  # below the training context: the next step must not fit
    assert plan_for_file(smollm2_path, n).total <= 400 * MiB < plan_for_file(smollm2_path, n + 256).total  # type: ignore[arg-type]
    assert main(["info", str(smollm2_path), "--memory", "--mem-budget", "100M"]) == 0
    assert "no context fits" in capsys.readouterr().out


def test_needs_tile_only_where_a_prompt_product_dequantizes() -> None:
    from lmap.models.base import needs_tile
    from lmap.quants import panels

    if not panels.VNNI512:  # every prompt product dequantizes tiles on this CPU
        assert needs_tile([0, 1], 0, "q8")
        return
    assert not needs_tile([0, 1], 0, "q8")
    assert needs_tile([0, 1], -1, "q8")  # an output matrix without a packer: logits of several rows
    assert needs_tile([0, -1], 0, "q8")  # one matrix of a format without a packer
    assert needs_tile([0, 1], 0, "f32")  # exact float products go through BLAS
    assert needs_tile([], 0, "q8")


@pytest.mark.slow
@pytest.mark.parametrize("logits_all", [False, True])
def test_plan_for_file_decides_the_tile_as_llama_does(smollm2_path: object, logits_all: bool) -> None:
    from lmap.llama import Llama
    from lmap.quants import panels

    llm = Llama(smollm2_path, n_ctx=512, logits_all=logits_all, verbose=False)  # type: ignore[arg-type]
    planned = plan_for_file(smollm2_path, 512, logits_all=logits_all)  # type: ignore[arg-type]
    assert [b.nbytes for b in planned.buffers if b.name == "dequant tile"] == [llm._scratch.tile.nbytes]
    hp = llm._model.hp
    one_row = llm._scratch.tile.size == max(hp.n_embd, hp.n_ff, hp.n_head * hp.head_dim_v)
    assert one_row == panels.VNNI512  # SmolLM2's Q4_1 and Q8_0 all take the integer panel GEMM here
