"""The server's engine: one worker thread owns the model, N slots of one KV cache, and a queue.

Continuous batching. Every step of the worker loop

1. frees the slots of cancelled requests (a client went away) and admits queued requests into free
   slots (a request with ``n`` choices takes up to ``n`` slots);
2. evaluates one prompt chunk (``n_batch`` tokens) of each slot still reading its prompt;
3. runs one decode step for every generating slot together: ``Model.forward(seq=array)``, one row
   per slot, one pass over the weights for all of them. A slot that finishes (end of generation,
   stop string, ``max_tokens``) simply has no row in the next step; a new request's first decode
   row joins the step after its prompt is read.

Each row's arithmetic is exactly that of decoding the sequence alone (tests/test_batching.py), so
greedy output through the server equals :meth:`lmap.Llama.create_completion` for the same prompt.

Prefix reuse. A slot keeps the tokens it evaluated after its request ends. A new request takes the
free slot (or copies from any slot, :meth:`KVCache.copy`) holding the longest prefix of its prompt,
so a chat resent with one more turn only evaluates the new turn, and the other ``n - 1`` choices
of a request copy the first one's prompt instead of evaluating it again.

The event loop never calls a kernel: it submits :class:`Job` objects and reads their events from
an ``asyncio.Queue`` that the worker fills through ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LmapError
from ..grammar import Matcher, sample_with_grammar
from ..kv_cache import KVCache
from ..models import Scratch
from ..plan import context_arrays, prefault
from ..sampling import Sampler, SamplingParams, StopMatcher, top_logprobs
from ..threads import set_threads

log = logging.getLogger("lmap")

__all__ = ["Engine", "Job", "GenParams", "TokenLogprob"]


@dataclass
class GenParams:
    """What one generation request asks for (already validated)."""

    sampling: SamplingParams
    max_tokens: int | None = None  # None: until end of generation or the context is full
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: off; k: the chosen token's logprob and the k most likely
    matchers: list[Matcher] | None = None  # one grammar matcher per choice
    cache_prompt: bool = True


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the ``k`` most likely alternatives (raw logits)."""

    token: int
    piece: bytes
    logprob: float
    top: list[tuple[int, bytes, float]]


class Job:
    """A request in the engine: its prompt, parameters, and the events the worker sends back.

    Events (tuples) on :attr:`events`: ``("text", index, text, [TokenLogprob] | None)``,
    ``("done", index, finish_reason, n_completion_tokens)``, ``("embeddings", [vector], n_tokens)``,
    ``("error", LmapError | Exception)``.
    """

    _ids = itertools.count()

    def __init__(
        self,
        prompt: list[int] | list[list[int]],
        params: GenParams | None,
        n: int = 1,
        *,
        embed: bool = False,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.id = next(self._ids)
        self.embed = embed
        self.inputs: list[list[int]] = prompt if embed else []  # type: ignore[assignment]
        self.prompt = np.asarray([] if embed else prompt, dtype=np.int32)
        self.params = params
        self.n = n
        self.loop = loop or asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.cancelled = False
        self.n_admitted = 0
        self.n_finished = 0
        self.leader: Slot | None = None
        self.prompt_logits: np.ndarray | None = None  # the prompt's last logits, for the other choices
        self.t_submit = time.perf_counter()

    @property
    def finished(self) -> bool:
        return self.n_finished >= self.n


def _deliver(items: list[tuple[asyncio.Queue[tuple[Any, ...]], tuple[Any, ...]]]) -> None:
    for q, event in items:
        q.put_nowait(event)


class Outbox:
    """The events of one worker step, handed to each event loop in one wake-up.

    ``call_soon_threadsafe`` writes to the loop's self-pipe, and the woken loop takes the GIL
    while the worker waits to get it back after the write: per token, that hand-off cost the
    worker ~0.2 ms at 4 slots (py-spy: 6 % of its time in ``_write_to_self``). One wake-up per
    step keeps every event's order within its job.
    """

    def __init__(self) -> None:
        self._items: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[tuple[Any, ...]], tuple[Any, ...]]]] = {}

    def put(self, job: Job, event: tuple[Any, ...]) -> None:
        self._items.setdefault(job.loop, []).append((job.events, event))

    def flush(self) -> None:
        items, self._items = self._items, {}
        for loop, batch in items.items():
            with contextlib.suppress(RuntimeError):  # the loop is closing: nobody is listening any more
                loop.call_soon_threadsafe(_deliver, batch)


class State(enum.Enum):
    FREE = 0
    PREFILL = 1  # reading its prompt, a chunk per step
    WAIT = 2  # another choice of the same request is reading the shared prompt
    DECODE = 3  # has a sampled token to evaluate in the next batched step


class Choice:
    """The per-choice generation state: sampler, grammar, incremental decoding, stop strings."""

    def __init__(self, index: int, params: GenParams, tokenizer: Any, budget: int) -> None:
        self.index = index
        sp = params.sampling
        seed = sp.seed if sp.seed is None or sp.seed < 0 else sp.seed + index
        self.sampler = Sampler(
            SamplingParams(**{**sp.__dict__, "seed": seed}) if seed != sp.seed else sp  # type: ignore[arg-type]
        )
        self.matcher = params.matchers[index] if params.matchers else None
        self.decoder = tokenizer.incremental_decoder()
        self.stop = StopMatcher(params.stop)
        self.budget = budget
        self.n_gen = 0


class Slot:
    def __init__(self, sid: int, n_ctx: int, n_vocab: int) -> None:
        self.id = sid
        self.tokens = np.zeros(n_ctx, np.int32)  # evaluated tokens (what its KV cells hold)
        self.n_past = 0
        self.state = State.FREE
        self.job: Job | None = None
        self.choice: Choice | None = None
        self.todo = np.zeros(0, np.int32)
        self.pending = -1
        self.prompt_logits = np.zeros(n_vocab, np.float32)
        self.prompt_len = -1  # prompt_logits belong to tokens[:prompt_len]
        self.last_used = 0.0

    def common_prefix(self, prompt: np.ndarray) -> int:
        n = min(self.n_past, prompt.shape[0])
        if n == 0:
            return 0
        diff = np.flatnonzero(self.tokens[:n] != prompt[:n])
        return int(diff[0]) if diff.size else n


class Engine:
    """The worker thread and its slots over one loaded :class:`lmap.Llama` (its model and tokenizer)."""

    def __init__(self, llama: Any, n_slots: int = 1, *, warm_up: bool = True) -> None:
        self.llama = llama
        self.model = llama._model
        self.tokenizer = llama.tokenizer_
        hp = self.model.hp
        self.n_ctx = int(llama.n_ctx())
        self.n_batch = int(llama.n_batch)
        self.n_slots = int(n_slots)
        self.n_vocab = int(hp.n_vocab)
        self.n_threads = int(llama.n_threads)
        kv0: KVCache = llama._kv
        self.kv = KVCache(
            hp.n_layer,
            self.n_ctx,
            hp.n_head_kv,
            hp.head_dim_k,
            hp.head_dim_v,
            kv0.type_k,
            kv0.type_v,
            swa_layers=self.model.swa_layers,
            window=hp.sliding_window,
            n_batch=self.n_batch,
            n_seq=self.n_slots,
        )
        activations = "q8" if llama._scratch.xq is not None else "f32"
        # as Llama decides it: no dequantized weight tile (and int8-sized activations) where every
        # prompt product is an integer panel GEMM (4-16 MiB)
        tile = self.model.needs_tile(activations)
        self.s = Scratch(hp, self.n_batch, self.n_ctx, self.n_slots, activations, self.n_slots, tile=tile)
        # resident now, not page by page as slots fill: server RSS stays flat under load
        prefault(self.kv.k + self.kv.v + context_arrays(self.s))
        self.slots = [Slot(i, self.n_ctx, self.n_vocab) for i in range(self.n_slots)]
        self.eog = self.tokenizer.eog_ids
        self._ids = np.zeros(self.n_slots, np.int32)
        self._pos = np.zeros(self.n_slots, np.int32)
        self._seqs = np.zeros(self.n_slots, np.int32)
        self._queue: deque[Job] = deque()
        self._out = Outbox()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._warm = warm_up
        self.stats = {"steps": 0, "decoded": 0, "prompt_tokens": 0, "requests": 0}

    # ------------------------------------------------------------------ event-loop side
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lmap-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, job: Job) -> None:
        with self._cv:
            self._queue.append(job)
            self.stats["requests"] += 1
            self._cv.notify()

    def cancel(self, job: Job) -> None:
        """Stop ``job`` and free its slots at the next step (the client disconnected)."""
        if not job.cancelled:
            job.cancelled = True
            with self._cv:
                self._cv.notify()

    @property
    def n_busy(self) -> int:
        return sum(s.state is not State.FREE for s in self.slots)

    @property
    def n_queued(self) -> int:
        return len(self._queue)

    # ------------------------------------------------------------------ worker
    def _run(self) -> None:
        set_threads(self.n_threads)  # Numba's thread count is per calling thread
        if self._warm:
            self._warm_up()
        while True:
            with self._cv:
                while not self._stop and not self._queue and not self._active():
                    self._cv.wait()
                if self._stop:
                    return
            try:
                self._step()
            except Exception as e:  # a bug must not take the worker down: fail what is in flight, go on
                log.exception("engine step failed")
                self._fail_all(e)
            finally:
                self._out.flush()

    def _warm_up(self) -> None:
        """Compile (or load) the batched-row kernels before the first request pays for it.

        One row and two take different attention kernels (serial, team): both are loaded here,
        so RSS does not step up the first time a lone request decodes.
        """
        for n in sorted({1, min(2, self.n_slots)}):
            ids = np.zeros(n, np.int32)
            self.model.forward(ids, np.zeros(n, np.int32), self.s, self.kv, True, seq=np.arange(n, dtype=np.int32))
            self.kv.clear()

    def _active(self) -> bool:
        return any(s.state is not State.FREE for s in self.slots)

    def _step(self) -> None:
        self.stats["steps"] += 1
        self._reap()
        self._admit()
        for slot in self.slots:
            if slot.state is State.PREFILL:
                self._prefill_chunk(slot)
        self._decode()

    def _reap(self) -> None:
        for slot in self.slots:
            if slot.job is not None and slot.job.cancelled:
                self._release(slot)
        with self._cv:
            if any(j.cancelled for j in self._queue):
                self._queue = deque(j for j in self._queue if not j.cancelled)

    def _release(self, slot: Slot) -> None:
        slot.state = State.FREE
        slot.job = None
        slot.choice = None
        slot.pending = -1
        slot.last_used = time.perf_counter()

    def _fail_all(self, e: Exception) -> None:
        for slot in self.slots:
            if slot.job is not None:
                job = slot.job
                job.cancelled = True
                self._out.put(job, ("error", e))
                self._release(slot)
                slot.n_past = 0  # its cells may be half written
                slot.prompt_len = -1

    def _free_slot(self, prompt: np.ndarray | None) -> Slot | None:
        """The free slot holding the longest prefix of ``prompt``, else the least recently used one."""
        free = [s for s in self.slots if s.state is State.FREE]
        if not free:
            return None
        if prompt is not None and prompt.size:
            best = max(free, key=lambda s: (s.common_prefix(prompt), -s.last_used))
            if best.common_prefix(prompt) > 0:
                return best
        return min(free, key=lambda s: s.last_used)

    def _admit(self) -> None:
        while True:
            with self._cv:
                if not self._queue:
                    return
                job = self._queue[0]
                if job.cancelled:
                    self._queue.popleft()
                    continue
            slot = self._free_slot(None if job.embed else job.prompt)
            if slot is None:
                return
            if job.embed:
                with self._cv:
                    self._queue.popleft()
                self._embed(slot, job)
                continue
            index = job.n_admitted
            job.n_admitted += 1
            if job.n_admitted >= job.n:
                with self._cv:
                    self._queue.popleft()
            try:
                self._start(slot, job, index)
            except LmapError as e:
                self._fail(job, e)

    def _fail(self, job: Job, e: Exception) -> None:
        job.cancelled = True
        self._out.put(job, ("error", e))
        for s in self.slots:
            if s.job is job:
                self._release(s)

    def _start(self, slot: Slot, job: Job, index: int) -> None:
        assert job.params is not None
        L = int(job.prompt.shape[0])
        mt = job.params.max_tokens
        budget = self.n_ctx - L if mt is None else min(mt, self.n_ctx - L)
        slot.job = job
        slot.choice = Choice(index, job.params, self.tokenizer, budget)
        slot.last_used = time.perf_counter()
        if budget <= 0:
            slot.state = State.DECODE
            self._finish(slot, "length")
            return
        if index == 0:
            job.leader = slot
        elif job.leader is not None and job.leader.job is job and job.leader.state is State.PREFILL:
            slot.state = State.WAIT
            return
        self._begin_prefill(slot)

    def _begin_prefill(self, slot: Slot) -> None:
        job = slot.job
        assert job is not None and job.params is not None
        prompt = job.prompt
        L = int(prompt.shape[0])
        src, common = slot, 0
        sources = self.slots if job.params.cache_prompt else [job.leader] if job.prompt_logits is not None else []
        for s in sources:
            if s is None:
                continue
            c = s.common_prefix(prompt)
            if c > common or (c == common and s is slot):
                src, common = s, c
        keep = self.kv.reusable(common, src.id) if common else 0
        logits: np.ndarray | None = None
        if keep == L:
            if job.prompt_logits is not None:
                logits = job.prompt_logits
            elif src.prompt_len == L:
                logits = src.prompt_logits
            else:
                keep -= 1  # evaluate the last prompt token again for its logits
        if src is slot:
            self.kv.truncate(keep, slot.id)
        else:
            self.kv.copy(src.id, slot.id, keep)
            slot.tokens[:keep] = src.tokens[:keep]
        slot.n_past = keep
        slot.prompt_len = -1
        self.stats["prompt_tokens"] += L - keep
        if logits is not None:
            slot.prompt_logits[:] = logits
            slot.prompt_len = L
            slot.state = State.DECODE
            self._sampled(slot, slot.prompt_logits)
        else:
            slot.todo = prompt[keep:]
            slot.state = State.PREFILL

    def _prefill_chunk(self, slot: Slot) -> None:
        job = slot.job
        assert job is not None
        n = min(self.n_batch, int(slot.todo.shape[0]))
        ids = slot.todo[:n]
        p0 = slot.n_past
        pos = np.arange(p0, p0 + n, dtype=np.int32)
        logits = self.model.forward(ids, pos, self.s, self.kv, False, seq=slot.id)
        slot.tokens[p0 : p0 + n] = ids
        slot.n_past += n
        slot.todo = slot.todo[n:]
        if slot.todo.shape[0]:
            return
        slot.prompt_logits[:] = logits[-1]
        slot.prompt_len = slot.n_past
        if job.n > 1:
            job.prompt_logits = slot.prompt_logits.copy()
        slot.state = State.DECODE
        self._sampled(slot, slot.prompt_logits)
        for other in self.slots:
            if other.state is State.WAIT and other.job is job:
                self._begin_prefill(other)

    def _decode(self) -> None:
        rows = [s for s in self.slots if s.state is State.DECODE and s.pending >= 0]
        if not rows:
            return
        n = len(rows)
        for j, s in enumerate(rows):
            self._ids[j] = s.pending
            self._pos[j] = s.n_past
            self._seqs[j] = s.id
        logits = self.model.forward(self._ids[:n], self._pos[:n], self.s, self.kv, True, seq=self._seqs[:n])
        self.stats["decoded"] += n
        for j, s in enumerate(rows):
            s.tokens[s.n_past] = s.pending
            s.n_past += 1
            s.pending = -1
            if s.job is not None and not s.job.cancelled:
                self._sampled(s, logits[j])

    def _sampled(self, slot: Slot, logits: np.ndarray) -> None:
        """Draw the next token of ``slot`` from ``logits``, stream it, and decide whether it goes on."""
        job, c = slot.job, slot.choice
        assert job is not None and job.params is not None and c is not None
        hist = slot.tokens[: slot.n_past]
        try:
            if c.matcher is not None:
                tok = sample_with_grammar(lambda x: c.sampler.sample(x, hist), logits, c.matcher)
            else:
                tok = c.sampler.sample(logits, hist)
            if tok in self.eog:
                self._finish(slot, "stop")
                return
            if c.matcher is not None:
                c.matcher.accept(tok)
        except LmapError as e:
            self._fail(job, e)
            return
        c.n_gen += 1
        lp = [self._logprob(tok, logits, job.params.logprobs)] if job.params.logprobs is not None else None
        emit, matched = c.stop.feed(c.decoder.feed(tok))
        if emit or lp:
            self._out.put(job, ("text", c.index, emit, lp))
        if matched or (c.matcher is not None and c.matcher.is_complete):
            self._finish(slot, "stop")
        elif c.n_gen >= c.budget:
            self._finish(slot, "length")
        else:
            slot.pending = tok

    def _logprob(self, tok: int, logits: np.ndarray, k: int) -> TokenLogprob:
        x = logits
        m = float(x.max())
        logz = m + math.log(float(np.sum(np.exp(x - np.float32(m)), dtype=np.float64)))
        piece = self.tokenizer.token_to_piece(tok, special=False)
        top: list[tuple[int, bytes, float]] = []
        if k:
            ids, lps = top_logprobs(x, k)
            top = [(int(i), self.tokenizer.token_to_piece(int(i)), float(v)) for i, v in zip(ids, lps, strict=True)]
        return TokenLogprob(tok, piece, float(x[tok]) - logz, top)

    def _finish(self, slot: Slot, reason: str) -> None:
        job, c = slot.job, slot.choice
        assert job is not None and c is not None
        if not c.stop.matched:
            tail, _ = c.stop.feed(c.decoder.flush())
            rest = tail + c.stop.flush()
            if rest:
                self._out.put(job, ("text", c.index, rest, None))
        self._out.put(job, ("done", c.index, reason, c.n_gen))
        job.n_finished += 1
        self._release(slot)

    def _embed(self, slot: Slot, job: Job) -> None:
        """Mean of the normed final hidden states over each input's tokens, L2-normalized."""
        out: list[np.ndarray] = []
        n_tokens = 0
        try:
            for toks in job.inputs:
                ids = np.asarray(toks, np.int32)
                self.kv.truncate(0, slot.id)
                acc = np.zeros(self.model.hp.n_embd, np.float64)
                for i in range(0, ids.size, self.n_batch):
                    chunk = ids[i : i + self.n_batch]
                    pos = np.arange(i, i + chunk.size, dtype=np.int32)
                    h = self.model.forward(chunk, pos, self.s, self.kv, True, seq=slot.id, hidden=True)
                    acc += h.sum(axis=0, dtype=np.float64)
                v = acc / max(ids.size, 1)
                norm = float(np.linalg.norm(v))
                out.append((v / norm if norm > 0 else v).astype(np.float32))
                n_tokens += int(ids.size)
        except Exception as e:
            self._out.put(job, ("error", e))
        else:
            self._out.put(job, ("embeddings", out, n_tokens))
        finally:
            slot.n_past = 0  # its cells now hold the embedded text, not a cached prompt
            slot.prompt_len = -1
            slot.last_used = time.perf_counter()
