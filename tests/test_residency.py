"""Weight residency (lmap/residency.py): size parsing, page ranges, the plan, and streamed forward passes.

The fast tests run a tiny 4-layer llama written here; the slow ones run gemma3-270m under a
64 MiB budget from a cold page cache and compare tokens and memory with the unbudgeted model.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lmap.errors import InvalidParameterError
from lmap.gguf import GGUFFile
from lmap.kv_cache import KVCache
from lmap.memtrace import read_status
from lmap.models import Scratch, load_model
from lmap.residency import (
    PAGE,
    Residency,
    inner_span,
    merge_spans,
    outer_span,
    parse_size,
    plan_residency,
)

MiB = 1 << 20


# ---------------------------------------------------------------------- sizes
def test_parse_size_units_are_powers_of_1024() -> None:
    assert parse_size(123) == 123
    assert parse_size("123") == 123
    assert parse_size("64M") == 64 * MiB
    assert parse_size("64m") == 64 * MiB
    assert parse_size("64MiB") == 64 * MiB
    assert parse_size("64 MB") == 64 * MiB
    assert parse_size("1.5G") == 3 * 512 * MiB
    assert parse_size("512k") == 512 * 1024
    assert parse_size("2T") == 2 << 40


@pytest.mark.parametrize("bad", ["", "M", "64Q", "-1", "1e3", "64 M B", "0", "0M", 0, -5, True, 1.5, None])
def test_parse_size_rejects_with_the_parameter_name(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="mem_budget"):
        parse_size(bad)  # type: ignore[arg-type]


@given(st.integers(1, 10**6), st.sampled_from(["", "K", "M", "G"]))
def test_parse_size_integer_strings(n: int, unit: str) -> None:
    assert parse_size(f"{n}{unit}") == n * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[unit]


# ---------------------------------------------------------------------- page ranges
@given(st.integers(0, 1 << 40), st.integers(1, 1 << 30))
def test_outer_and_inner_spans(start: int, length: int) -> None:
    end = start + length
    a, b = outer_span(start, end)
    assert a % PAGE == 0 and b % PAGE == 0
    assert a <= start < end <= b and start - a < PAGE and b - end < PAGE
    c, d = inner_span(start, end)
    if d > c:
        assert c % PAGE == 0 and d % PAGE == 0
        assert start <= c < d <= end and c - start < PAGE and end - d < PAGE
    else:  # empty: no whole page inside, so [start, end) lies within two pages
        assert c == d and b - a <= 2 * PAGE


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 50)), max_size=20))
def test_merge_spans_covers_the_same_bytes(pairs: list[tuple[int, int]]) -> None:
    spans = [(a, a + n) for a, n in pairs]
    merged = merge_spans(spans)
    covered = {x for a, b in spans for x in range(a, b)}
    assert {x for a, b in merged for x in range(a, b)} == covered
    for (_, b0), (a1, _) in zip(merged, merged[1:], strict=False):
        assert b0 < a1  # sorted, disjoint, not touching
    assert all(b > a for a, b in merged)


# ---------------------------------------------------------------------- the plan
def test_plan_pins_everything_that_fits() -> None:
    p = plan_residency([4 * MiB] * 4, 8 * MiB, 1024, 64 * 1024, 64 * MiB)
    assert p.pinned_layers == (0, 1, 2, 3) and p.output_pinned
    assert p.depth == 0 and p.streamed_bytes == 0


def test_plan_refuses_a_budget_below_the_minimum_and_says_it() -> None:
    with pytest.raises(InvalidParameterError, match=r"minimum is 4\.1 MiB.*at least 5M"):
        plan_residency([4 * MiB, 3 * MiB], 8 * MiB, 1024, 64 * 1024, 4 * MiB, path="m.gguf")
    # exactly the minimum runs, one unit at a time (no read-ahead)
    p = plan_residency([4 * MiB, 3 * MiB], 8 * MiB, 1024, 64 * 1024, 4 * MiB + 64 * 1024)
    assert p.depth == 1 and p.pinned_layers == () and not p.output_pinned
    assert p.peak_bytes <= p.budget


def test_plan_pins_layers_then_streams_the_output_in_chunks() -> None:
    # gemma3-270m's shape: 18 layers of ~3.6 MiB, a 170 MiB tied output of 680-byte rows
    layers = [3_780_000 // PAGE * PAGE] * 18
    p = plan_residency(layers, 170 * MiB, 680, 200 * 1024, 64 * MiB)
    assert p.depth == 3
    assert p.pinned_layers == tuple(range(len(p.pinned_layers))) and 0 < len(p.pinned_layers) < 18
    assert not p.output_pinned and p.output_chunk_rows * 680 <= p.unit_bytes
    assert p.peak_bytes <= 64 * MiB
    assert p.streamed_bytes == sum(layers) + 170 * MiB - p.pinned_bytes


@settings(max_examples=200)
@given(
    st.lists(st.integers(1, 64).map(lambda k: k * PAGE), min_size=1, max_size=30),
    st.integers(1, 4000),
    st.sampled_from([34, 144, 210, 680, 4096]),
    st.integers(0, 100_000),
    st.integers(0, 4000),
)
def test_plan_never_exceeds_the_budget(layers: list[int], out_pages: int, row: int, small: int, extra: int) -> None:
    out_bytes = out_pages * PAGE // row * row
    minimum = small + max(*layers, row + 2 * PAGE if out_bytes else 0)  # an output chunk overhangs two pages
    budget = minimum + extra * PAGE
    p = plan_residency(layers, out_bytes, row, small, budget)
    assert p.minimum == minimum
    assert p.peak_bytes <= budget
    assert p.streamed_bytes + p.pinned_bytes == sum(layers) + out_bytes
    if not p.output_pinned:
        assert p.output_chunk_rows >= 1 and p.depth >= 1


# ---------------------------------------------------------------------- a tiny model, streamed
N_EMBD, N_FF, N_VOCAB, N_LAYER = 256, 512, 4096, 4


def _write_tiny(path: Path) -> Path:
    """A 4-layer llama with Q8_0 matrices and the output tied to a 1.1 MiB token embedding."""
    rng = np.random.default_rng(3)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(N_LAYER)
    w.add_context_length(256)
    w.add_embedding_length(N_EMBD)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(N_VOCAB)
    q8 = gguf.GGMLQuantizationType.Q8_0

    def mat(name: str, rows: int, cols: int, scale: float) -> None:
        a = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(a, q8), raw_dtype=q8)

    mat("token_embd.weight", N_VOCAB, N_EMBD, 1.0)
    for i in range(N_LAYER):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
        mat(p + "attn_q.weight", N_EMBD, N_EMBD, 0.06)
        mat(p + "attn_k.weight", N_EMBD // 2, N_EMBD, 0.06)
        mat(p + "attn_v.weight", N_EMBD // 2, N_EMBD, 0.06)
        mat(p + "attn_output.weight", N_EMBD, N_EMBD, 0.06)
        w.add_tensor(p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(N_EMBD)).astype(np.float32))
        mat(p + "ffn_gate.weight", N_FF, N_EMBD, 0.06)
        mat(p + "ffn_up.weight", N_FF, N_EMBD, 0.06)
        mat(p + "ffn_down.weight", N_EMBD, N_FF, 0.04)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_tiny(tmp_path_factory.mktemp("residency") / "tiny-q8.gguf")


class Runner:
    """One model over its own mapping, with a KV cache and scratch for up to 2 sequences."""

    def __init__(self, path: Path, budget: int | str | None) -> None:
        self.g = GGUFFile(path)
        self.model = load_model(self.g)
        hp = self.model.hp
        self.residency = Residency.attach(self.model, budget) if budget is not None else None
        self.kv = KVCache(hp.n_layer, 64, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v, n_batch=16, n_seq=2)
        self.s = Scratch(hp, 16, 64, 16, "q8", n_seq=2)

    def run(self, tokens: list[int], start: int, all_logits: bool = False, seq: object = None) -> np.ndarray:
        ids = np.array(tokens, np.int32)
        pos = np.arange(start, start + len(tokens), dtype=np.int32) if seq is None else np.full(len(tokens), start)
        return self.model.forward(ids, pos.astype(np.int32), self.s, self.kv, all_logits, seq).copy()


def _greedy(r: Runner, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    logits = [r.run(prompt, 0, all_logits=True)]
    out = [int(np.argmax(logits[-1][-1]))]
    for i in range(n - 1):
        logits.append(r.run([out[-1]], len(prompt) + i))
        out.append(int(np.argmax(logits[-1][-1])))
    return out, logits


def test_streamed_tiny_model_computes_the_same_logits(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # prefill tiles of 512 rows (4096 by default, the whole tiny output) so that chunks can align with them
    monkeypatch.setattr(Scratch, "TILE_ELEMENTS", 512 * N_EMBD)
    plain = Runner(tiny, None)
    # layers of ~616 KiB and a 1088 KiB output: room for one pinned layer next to a window of three units
    budget = "2600K"
    r = Runner(tiny, budget)
    assert r.residency is not None
    plan = r.residency.plan
    assert 0 < len(plan.pinned_layers) < N_LAYER and not plan.output_pinned and plan.depth >= 2
    n_chunks = -(-N_VOCAB // plan.output_chunk_rows)
    assert n_chunks > 1 and plan.output_chunk_rows % 512 == 0
    prompt = [1, 17, 300, 4000, 5, 9, 77, 1234, 2, 3, 999, 42]  # >= 8 rows: the batched attention path too
    want, want_logits = _greedy(plain, prompt, 6)
    got, got_logits = _greedy(r, prompt, 6)
    assert got == want
    for a, b in zip(want_logits, got_logits, strict=True):
        np.testing.assert_array_equal(a, b)
    st_ = r.residency.stats()
    streamed = N_LAYER - len(plan.pinned_layers)
    assert st_["passes"] == 6
    assert st_["bytes_read"] >= 6 * plan.streamed_bytes * 0.99  # every pass read every streamed unit
    assert st_["bytes_read"] <= (6 + 1) * plan.streamed_bytes + plan.depth * plan.unit_bytes
    assert streamed >= 1


def test_streamed_rows_of_separate_sequences_match(tiny: Path) -> None:
    """The server's decode step (one row per sequence) through a chunked output."""
    plain, r = Runner(tiny, None), Runner(tiny, "2600K")
    for x in (plain, r):
        x.run([5, 6, 7], 0, seq=0)
        x.run([8, 9], 0, seq=1)
    a = plain.run([11, 12], 3, seq=np.array([0, 1], np.int32))
    b = r.run([11, 12], 3, seq=np.array([0, 1], np.int32))
    np.testing.assert_array_equal(a, b)


def test_interrupted_pass_resynchronises(tiny: Path) -> None:
    """A pass that stops before the output (hidden states only) must not shift the stream."""
    plain, r = Runner(tiny, None), Runner(tiny, "2600K")
    for x in (plain, r):
        x.model.forward(np.array([3, 4], np.int32), np.arange(2, dtype=np.int32), x.s, x.kv, False, None, True)
    np.testing.assert_array_equal(plain.run([7], 2), r.run([7], 2))


def test_buffered_reads_when_o_direct_is_unavailable(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    plain, r = Runner(tiny, None), Runner(tiny, "2600K")
    assert r.residency is not None and r.residency.stats()["direct_io"] == 0.0
    np.testing.assert_array_equal(plain.run([1, 2, 3], 0), r.run([1, 2, 3], 0))


def test_budget_below_minimum_names_it(tiny: Path) -> None:
    with pytest.raises(InvalidParameterError, match=r"mem_budget=.*minimum is .*--mem-budget to at least \d+M"):
        Runner(tiny, "100K")


def test_mem_budget_needs_the_mapping(tiny: Path) -> None:
    model = load_model(GGUFFile(tiny, use_mmap=False))
    with pytest.raises(InvalidParameterError, match="no-mmap"):
        Residency.attach(model, "64M")


def test_no_budget_pins_everything_and_streams_nothing(tiny: Path) -> None:
    r = Runner(tiny, "1G")
    assert r.residency is not None and r.residency.plan.depth == 0
    r.run([1, 2], 0)
    assert r.residency.stats()["bytes_read"] == 0


# ---------------------------------------------------------------------- gemma3-270m, 64 MiB
def _mapped_kib(path: str) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, cur = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                cur = line.rstrip().endswith(path)
            elif cur and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


class Peaks:
    """Samples the model file's mapped Rss, RssFile and RssAnon every few ms in a thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.model_kib = self.file_kib = self.anon_kib = 0
        self.samples = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            s = read_status()
            self.model_kib = max(self.model_kib, _mapped_kib(self.path))
            self.file_kib = max(self.file_kib, s.get("file_kib", 0))
            self.anon_kib = max(self.anon_kib, s.get("anon_kib", 0))
            self.samples += 1

    def close(self) -> None:
        self._stop.set()
        self._t.join()


def _cold_copy(src: Path, dst: Path) -> Path:
    """A private copy of the model with none of its pages cached (nobody else maps it)."""
    shutil.copyfile(src, dst)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return dst


@pytest.mark.slow
def test_gemma3_under_64m_matches_and_stays_under_budget(gemma3_path: Path, tmp_path: Path) -> None:
    from lmap.llama import Llama

    prompt = "The three primary colors are"
    ref = Llama(gemma3_path, n_ctx=256, verbose=False)
    want = ref.create_completion(prompt, max_tokens=32, temperature=0)["choices"][0]["text"]
    want_ids = ref.tokenize(want.encode(), add_bos=False)
    ref.close()
    del ref

    path = str(_cold_copy(gemma3_path, tmp_path / "gemma3-cold.gguf"))
    peaks = Peaks(path)
    try:
        llm = Llama(path, n_ctx=256, verbose=False, mem_budget="64M")
        got = llm.create_completion(prompt, max_tokens=32, temperature=0)["choices"][0]["text"]
    finally:
        peaks.close()
    assert got == want, (got, want)
    assert len(want_ids) >= 16
    r = llm.residency
    assert r is not None
    st_ = r.stats()
    budget_kib = 64 * 1024
    assert peaks.samples > 20
    # the resident part of the model file: pinned layers + gathered embedding rows (the streamed
    # units live in anonymous slots, counted in the plan's peak with the copied norms)
    assert peaks.model_kib * 1024 + st_["planned_peak_bytes"] - r.plan.pinned_bytes <= budget_kib * 1024 * 1.1
    assert peaks.model_kib <= budget_kib * 1.1
    assert st_["bytes_read"] > 30 * r.plan.streamed_bytes
    print(
        f"\ngemma3-270m --mem-budget 64M: {r.report()}\n"
        f"sampled peaks: model file mapped {peaks.model_kib / 1024:.1f} MiB, RssFile {peaks.file_kib / 1024:.1f} MiB"
        f" (libraries included), RssAnon {peaks.anon_kib / 1024:.1f} MiB; timings {llm.timings}"
    )
    llm.close()
