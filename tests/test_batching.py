"""Batched decoding (one row per sequence in one forward pass) against each sequence decoded alone.

The server decodes its slots together: ``Model.forward(..., seq=array)`` with one row per sequence
of a shared :class:`KVCache`. Each row is meant to get *bit for bit* the logits it would get in a
one-sequence cache, because every per-row operation is the same compiled code on the same numbers:
the matrix products use the same row-dot intrinsic and the same activation quantization
(``kernels/multivec.py``), attention the same ``_attend`` over the sequence's own cells, and the
norms / rope / activations work row by row. So the tests compare with ``array_equal``; a change that
merely reorders a float sum for batched rows is a bug here (greedy output through the server would
then drift from ``Llama.create_completion``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lmap.gguf import GGUFFile
from lmap.kv_cache import SWA_CHUNK, KVCache
from lmap.models import Model, Scratch, load_model

pytestmark = pytest.mark.slow

N_SEQ = 3
N_DECODE = 6


class Engine:
    """A model with one cache of ``n_seq`` sequences and its scratch (what the server's worker holds)."""

    def __init__(
        self,
        model: Model,
        n_seq: int,
        n_ctx: int,
        n_batch: int,
        window: int | None = None,
        swa_chunk: int = SWA_CHUNK,
        activations: str = "q8",
    ) -> None:
        hp = model.hp
        self.model = model
        self.kv = KVCache(
            hp.n_layer,
            n_ctx,
            hp.n_head_kv,
            hp.head_dim_k,
            hp.head_dim_v,
            swa_layers=model.swa_layers,
            window=hp.sliding_window if window is None else window,
            n_batch=n_batch,
            n_seq=n_seq,
            swa_chunk=swa_chunk,
        )
        self.s = Scratch(hp, n_batch, n_ctx, max(n_seq, 1), activations, n_seq)

    def prefill(self, toks: list[int], start: int, seq: int) -> np.ndarray:
        """Evaluate ``toks`` at positions start.. of ``seq``, n_batch at a time; the last token's logits."""
        ids = np.asarray(toks, np.int32)
        pos = np.arange(start, start + ids.size, dtype=np.int32)
        nb = self.s.x.shape[0]
        for i in range(0, ids.size, nb):
            out = self.model.forward(ids[i : i + nb], pos[i : i + nb], self.s, self.kv, False, seq=seq)
        return out[-1].copy()

    def step(self, toks: list[int], pos: list[int], seqs: list[int]) -> np.ndarray:
        return self.model.forward(
            np.asarray(toks, np.int32),
            np.asarray(pos, np.int32),
            self.s,
            self.kv,
            True,
            seq=np.asarray(seqs, np.int32),
        ).copy()


def _prompts(n_vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, min(n_vocab, 20000), size=n).tolist() for n in lengths]


def _alone(
    model: Model,
    prompt: list[int],
    follow: list[int],
    n_ctx: int,
    n_batch: int,
    window: int | None,
    swa_chunk: int = SWA_CHUNK,
) -> list:
    """Logits after the prompt, then after each token of ``follow``, in a one-sequence cache."""
    e = Engine(model, 1, n_ctx, n_batch, window, swa_chunk)
    out = [e.prefill(prompt, 0, 0)]
    for i, t in enumerate(follow):
        out.append(e.prefill([t], len(prompt) + i, 0))
    return out


def _check_batched(
    model: Model, lengths: list[int], n_ctx: int, n_batch: int, window: int | None = None, swa_chunk: int = SWA_CHUNK
) -> None:
    prompts = _prompts(model.hp.n_vocab, lengths)
    e = Engine(model, N_SEQ, n_ctx, n_batch, window, swa_chunk)
    # prefill in an order other than the sequence order, with a decode step of the others in between
    last = [np.empty(0)] * N_SEQ
    for s in (1, 0, 2):
        last[s] = e.prefill(prompts[s], 0, s)
    follow: list[list[int]] = [[] for _ in range(N_SEQ)]
    rows: list[list[np.ndarray]] = [[last[s]] for s in range(N_SEQ)]
    n_done = [0] * N_SEQ
    for step in range(N_DECODE):
        # all three together, then a step where sequence 1 sits out (a finished slot leaves) in shuffled order
        seqs = [2, 0] if step == 3 else list(range(N_SEQ))
        toks = [int(np.argmax(rows[s][-1])) for s in seqs]
        pos = [len(prompts[s]) + n_done[s] for s in seqs]
        logits = e.step(toks, pos, seqs)
        for j, s in enumerate(seqs):
            follow[s].append(toks[j])
            rows[s].append(logits[j])
            n_done[s] += 1
    for s in range(N_SEQ):
        ref = _alone(model, prompts[s], follow[s], n_ctx, n_batch, window, swa_chunk)
        assert len(ref) == len(rows[s])
        for i, (a, b) in enumerate(zip(rows[s], ref, strict=True)):
            assert np.array_equal(a, b), (
                f"sequence {s} step {i}: batched logits differ from decoding alone "
                f"(max abs diff {np.abs(a - b).max():.3g})"
            )


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Model:
    return load_model(GGUFFile(smollm2_path))


@pytest.fixture(scope="module")
def gemma3(gemma3_path: Path) -> Model:
    return load_model(GGUFFile(gemma3_path))


def test_batched_decode_equals_alone_smollm2(smollm2: Model) -> None:
    _check_batched(smollm2, [5, 23, 11], n_ctx=128, n_batch=16)


def test_batched_decode_equals_alone_gemma3(gemma3: Model) -> None:
    # n_ctx < window: every layer keeps its whole history (no ring)
    _check_batched(gemma3, [7, 19, 12], n_ctx=96, n_batch=16)


def test_batched_decode_equals_alone_gemma3_ring(gemma3: Model) -> None:
    # A small window makes the sliding-window layers rings (window + n_batch = 14 cells) that wrap during the
    # prompts and the decode steps; logits are not gemma's any more, but batched and alone must still agree.
    _check_batched(gemma3, [9, 22, 4], n_ctx=48, n_batch=6, window=8)


def test_batched_decode_equals_alone_gemma3_chunked_ring(gemma3: Model) -> None:
    # rings of window + chunk = 16 cells, smaller than a batch of 24: prompts are stored chunk by chunk
    _check_batched(gemma3, [9, 40, 4], n_ctx=64, n_batch=24, window=8, swa_chunk=8)


def test_chunked_ring_gives_the_logits_of_a_ring_that_holds_the_batch(gemma3: Model) -> None:
    """A sliding-window ring of window + chunk cells, written and read chunk by chunk, against one of
    window + n_batch cells that takes each batch whole (llama.cpp's sizing): the same attention,
    so the same logits up to float32 regrouping, and the same greedy tokens. Exact float32 products:
    with llama.cpp's int8 activations a regrouped sum that crosses a rounding boundary moves these
    random-token logits by up to ~2 (as it does between batch sizes of the same cache)."""
    n_ctx, n_batch, window = 128, 32, 8
    (p,) = _prompts(gemma3.hp.n_vocab, [75], seed=3)
    whole = Engine(gemma3, 1, n_ctx, n_batch, window, swa_chunk=n_batch, activations="f32")
    chunked = Engine(gemma3, 1, n_ctx, n_batch, window, swa_chunk=8, activations="f32")
    assert whole.kv.swa is not None and chunked.kv.swa is not None
    assert (whole.kv.swa.n_cells, chunked.kv.swa.n_cells) == (40, 16)
    a, b = whole.prefill(p, 0, 0), chunked.prefill(p, 0, 0)
    for i in range(4):
        np.testing.assert_allclose(b, a, rtol=0, atol=5e-3 * np.abs(a).max())
        assert int(np.argmax(a)) == int(np.argmax(b))
        t = int(np.argmax(a))
        a, b = whole.prefill([t], len(p) + i, 0), chunked.prefill([t], len(p) + i, 0)


@pytest.mark.parametrize("window", [None, 8])
def test_copy_shares_a_prefix(gemma3: Model, window: int | None) -> None:
    n_ctx, n_batch = 64, 6
    p, q = _prompts(gemma3.hp.n_vocab, [16, 19], seed=1)
    e = Engine(gemma3, N_SEQ, n_ctx, n_batch, window)
    after_p = e.prefill(p, 0, 0)
    # 1: a second choice for the same prompt, continued with the same first token as the reference
    e.kv.copy(0, 1, len(p))
    # 2: a prompt sharing p's first 12 tokens: keep those, evaluate the rest
    keep = e.kv.reusable(12, 0)
    e.kv.copy(0, 2, keep)
    after_q = e.prefill(q[keep:], keep, 2)
    t = int(np.argmax(after_p))
    logits = e.step([t, t, int(np.argmax(after_q))], [len(p), len(p), len(q)], [0, 1, 2])

    ref_p = _alone(gemma3, p, [t], n_ctx, n_batch, window)
    assert np.array_equal(logits[0], ref_p[1])
    assert np.array_equal(logits[1], ref_p[1])
    r = Engine(gemma3, 1, n_ctx, n_batch, window)
    r.prefill(p, 0, 0)  # what the shared cache evaluated: all of p, of which `keep` positions stay
    r.kv.truncate(keep)
    ref_q = r.prefill(q[keep:], keep, 0)
    assert np.array_equal(after_q, ref_q)
    assert np.array_equal(logits[2], r.prefill([int(np.argmax(after_q))], len(q), 0))


def test_copy_does_not_disturb_other_sequences(smollm2: Model) -> None:
    a, b = _prompts(smollm2.hp.n_vocab, [14, 9], seed=2)
    e = Engine(smollm2, N_SEQ, 64, 16)
    e.prefill(a, 0, 0)
    e.prefill(b, 0, 2)
    e.kv.copy(0, 1, 10)
    e.kv.clear(0)  # the source may be freed; the copy stays
    t = 42
    logits = e.step([t, t], [10, len(b)], [1, 2])
    r = Engine(smollm2, 1, 64, 16)
    r.prefill(a, 0, 0)
    r.kv.truncate(10)
    ref1 = r.prefill([t], 10, 0)
    ref2 = _alone(smollm2, b, [t], 64, 16, None)[1]
    assert np.array_equal(logits[0], ref1)
    assert np.array_equal(logits[1], ref2)
