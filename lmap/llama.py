"""The public API: :class:`Llama`, shaped like llama-cpp-python's so code moves over by changing an import.

One model, one context (KV cache + scratch planned once from n_ctx and n_batch),
and the loop that turns a prompt into tokens. The CLI and the server are thin
layers over this class.

Deliberate differences from llama-cpp-python (each for a reason):
- ``n_ctx`` defaults to 4096 clipped to the model's training context, not 512:
  512 tokens is too short for a chat, and the KV cache for 4096 is small for the
  models lmap targets. ``n_ctx=0`` means the model's full training context.
- ``n_threads`` defaults to every core this process may use (llama.cpp's CLI does
  the same); llama-cpp-python uses half.
- ``activations="q8"`` (default) rounds activations to 8-bit blocks before each quantized
  matrix product, exactly as llama.cpp does, so greedy output follows llama.cpp token for
  token; ``activations="f32"`` computes exact float32 products (what transformers computes
  from the same dequantized weights).
- Without ``logits_all`` the logits of the last evaluated token are still kept
  (``Llama.last_logits``), so sampling never needs the n_ctx x n_vocab ``scores`` array.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ContextOverflowError, InvalidParameterError
from .gguf import GGUFFile
from .kv_cache import KVCache
from .models import Scratch, load_model
from .plan import context_arrays, map_in_background, prefault_in_background
from .registry import resolve_model
from .residency import Residency
from .sampling import Sampler, SamplingParams, StopMatcher
from .threads import set_threads
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .chat import ChatTemplate
    from .grammar import Grammar, Matcher

log = logging.getLogger("lmap")

DEFAULT_N_CTX = 4096
LLAMA_DEFAULT_SEED = 0xFFFFFFFF


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


# llama-cpp-python passes KV cache types as GGML type ids
_GGML_CACHE_TYPES = {0: "f32", 1: "f16", 8: "q8_0"}


def _cache_type(t: str | int | None, name: str) -> str:
    if t is None:
        return "f16"
    if isinstance(t, int) and not isinstance(t, bool):
        if t not in _GGML_CACHE_TYPES:
            raise InvalidParameterError(f"{name}={t}: supported GGML cache types are 0 (f32), 1 (f16) and 8 (q8_0)")
        return _GGML_CACHE_TYPES[t]
    return str(t).lower()


class Llama:
    """A GGUF model with a context, ready to generate.

    ``model_path`` is a path to a .gguf file or a known model name (``smollm2-135m``,
    ``gemma3-270m``), pulled into the cache on first use.
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        n_ctx: int = DEFAULT_N_CTX,
        n_batch: int = 512,
        n_threads: int | None = None,
        seed: int = LLAMA_DEFAULT_SEED,
        use_mmap: bool = True,
        use_mlock: bool = False,
        logits_all: bool = False,
        type_k: str | int | None = None,
        type_v: str | int | None = None,
        activations: str = "q8",
        mem_budget: int | str | None = None,
        n_keep: int | None = None,
        verbose: bool = True,
        **kwargs: Any,
    ) -> None:
        t0 = time.perf_counter()
        for name in ("n_gpu_layers", "chat_format", "last_n_tokens_size", "n_ubatch", "flash_attn", "offload_kqv"):
            kwargs.pop(name, None)  # accepted for llama-cpp-python compatibility; meaningless here
        if kwargs:
            raise InvalidParameterError(f"unknown argument(s) to Llama(): {', '.join(sorted(kwargs))}")
        if n_ctx < 0:
            raise InvalidParameterError(f"n_ctx must be >= 0 (0 = the model's context length), got {n_ctx}")
        if n_batch < 1:
            raise InvalidParameterError(f"n_batch must be >= 1, got {n_batch}")
        if n_threads is not None and n_threads < 1:
            raise InvalidParameterError(f"n_threads must be >= 1, got {n_threads}")
        if n_keep is not None and n_keep < 0:
            raise InvalidParameterError(f"n_keep must be >= 0 (or None: no context shift), got {n_keep}")
        # n_keep (context shift): when generation fills the context, keep the first n_keep tokens and
        # drop the older half of the rest instead of stopping (llama.cpp's --keep / context shift)
        self._n_keep = n_keep
        self.verbose = verbose
        path = resolve_model(model_path)
        self.model_path = str(path)
        self.n_threads = n_threads or _default_threads()
        set_threads(self.n_threads, blas=False)

        self._gguf = GGUFFile(path, use_mmap=use_mmap)
        self.metadata: dict[str, Any] = self._gguf.metadata
        self._model = load_model(self._gguf)
        # mem_budget (bytes or "64M"): keep the resident part of the model file under it (lmap/residency.py)
        self.residency: Residency | None = None
        if mem_budget is not None:
            if use_mlock:
                raise InvalidParameterError("mem_budget and use_mlock exclude each other: mlock pins the whole file")
            self.residency = Residency.attach(self._model, mem_budget)
        hp = self._model.hp
        self._n_ctx = min(n_ctx, hp.n_ctx_train) if n_ctx else hp.n_ctx_train
        self.n_batch = min(n_batch, self._n_ctx)
        self._logits_all = logits_all
        type_k, type_v = _cache_type(type_k, "type_k"), _cache_type(type_v, "type_v")
        self._kv = KVCache(
            hp.n_layer,
            self._n_ctx,
            hp.n_head_kv,
            hp.head_dim_k,
            hp.head_dim_v,
            type_k,
            type_v,
            swa_layers=self._model.swa_layers,
            window=hp.sliding_window,
            n_batch=self.n_batch,
        )
        if activations not in ("q8", "f32"):
            raise InvalidParameterError(f"activations={activations!r}: expected 'q8' (as llama.cpp) or 'f32' (exact)")
        m = self._model
        tile = m.needs_tile(activations)
        rows = self.n_batch if logits_all else 1
        self._scratch = Scratch(hp, self.n_batch, self._n_ctx, rows, activations, tile=tile)
        # resident now rather than page by page as the context fills: RSS stays flat while it talks.
        # The pages are faulted in on other threads (page faults need no GIL) while the tokenizer is
        # built and the kernels load here: the scratch joined before the warm-up uses it, the
        # KV cache (~50 ms for SmolLM2's at n_ctx 4096) after.
        scratch_faults = prefault_in_background(context_arrays(self._scratch))
        kv_faults = prefault_in_background(self._kv.k + self._kv.v)
        # the mapped weights too, unless a memory budget decides what stays resident
        weights_mapped = map_in_background(self._gguf.data) if use_mmap and mem_budget is None else None
        self._tokenizer = Tokenizer.from_metadata(self.metadata)
        self.input_ids = np.zeros(self._n_ctx, dtype=np.intc)
        # np.zeros maps untouched pages lazily, so n_ctx x n_vocab costs only the rows evaluated
        self.scores = np.zeros((self._n_ctx if logits_all else 1, hp.n_vocab), dtype=np.single)
        # one row of scratch logits (no logits_all): that row is the last token's logits, kept until
        # the next evaluation writes it, so it serves as last_logits instead of a copy (1 MiB for gemma3)
        self.last_logits = self._scratch.logits[0] if rows == 1 else np.zeros(hp.n_vocab, dtype=np.single)
        # logits after the last prompt evaluated by generate(), and how many tokens that prompt had
        self._prompt_logits = np.zeros(hp.n_vocab, dtype=np.single)
        self._prompt_logits_len = -1
        self._pos = np.zeros(self.n_batch, dtype=np.int32)
        self._ids = np.zeros(self.n_batch, dtype=np.int32)
        self.n_tokens = 0
        self._seed = seed
        if use_mlock:
            self._gguf.lock()
        self.timings = {
            "load_ms": 0.0,
            "prompt_tokens": 0,
            "prompt_ms": 0.0,
            "eval_tokens": 0,
            "eval_ms": 0.0,
            "reused_tokens": 0,
        }
        scratch_faults.join()
        self._warm_up()
        kv_faults.join()
        if weights_mapped is not None:
            weights_mapped.join()
        self.timings["load_ms"] = (time.perf_counter() - t0) * 1e3
        self._chat_template: ChatTemplate | None = None  # compiled on first use (Jinja2: 10 ms of start-up)

    # ------------------------------------------------------------------ basics
    def _warm_up(self) -> None:
        """Compile (or load from Numba's cache) every kernel a forward pass uses, before timing starts."""
        t = time.perf_counter()
        m = self._model
        m.team_attention_work = 0  # also the team's one-token attention, which long contexts take
        # only as many leading layers as it takes to meet every kind of layer (all of them where
        # formats vary along the stack; one of SmolLM2's 30): the kernels are what is warmed
        layers = m.layers
        m.layers = layers[: m.warm_up_layers()]
        try:
            for n in (1, min(2, self.n_batch)):
                # the second pass's one row of logits takes the first's kernels again
                self._forward(np.zeros(n, np.int32), 0, hidden=n > 1 and not self._logits_all)
        finally:
            del m.team_attention_work
            m.layers = layers
        self._kv.clear()
        dt = time.perf_counter() - t
        if dt > 5:
            log.warning("compiled kernels in %.1f s (first run only; cached for next time)", dt)

    def n_ctx(self) -> int:
        return self._n_ctx

    def n_vocab(self) -> int:
        return self._model.hp.n_vocab

    def n_embd(self) -> int:
        return self._model.hp.n_embd

    def token_bos(self) -> int:
        return -1 if self._tokenizer.bos_id is None else self._tokenizer.bos_id

    def token_eos(self) -> int:
        return -1 if self._tokenizer.eos_id is None else self._tokenizer.eos_id

    @property
    def tokenizer_(self) -> Tokenizer:
        return self._tokenizer

    def tokenize(self, text: bytes | str, add_bos: bool = True, special: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_bos`` adds BOS only when the model's metadata asks for it (as llama.cpp)."""
        return self._tokenizer.encode(text, add_special=add_bos, parse_special=special)

    def detokenize(
        self, tokens: Sequence[int], prev_tokens: Sequence[int] | None = None, special: bool = False
    ) -> bytes:
        return self._tokenizer.decode(list(tokens), special=special)

    def set_seed(self, seed: int) -> None:
        self._seed = seed

    def reset(self) -> None:
        """Forget the evaluated tokens (the KV cache is overwritten from position 0 on the next eval)."""
        self.n_tokens = 0

    @property
    def _input_ids(self) -> np.ndarray:
        return self.input_ids[: self.n_tokens]

    @property
    def _scores(self) -> np.ndarray:
        return self.scores[: self.n_tokens, :] if self._logits_all else self.scores

    # ------------------------------------------------------------------ evaluation
    def _forward(self, ids: np.ndarray, start: int, hidden: bool = False) -> np.ndarray:
        n = ids.shape[0]
        self._ids[:n] = ids
        self._pos[:n] = np.arange(start, start + n, dtype=np.int32)
        s, kv = self._scratch, self._kv
        return self._model.forward(self._ids[:n], self._pos[:n], s, kv, self._logits_all, hidden=hidden)

    def eval(self, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after the ``n_tokens`` already in the context, n_batch at a time."""
        self._eval(tokens, "prompt" if len(tokens) > 1 else "eval")

    def _eval(self, tokens: Sequence[int], phase: str) -> None:
        toks = np.asarray(tokens, dtype=np.int32).reshape(-1)
        if toks.size == 0:
            return
        if self.n_tokens + toks.size > self._n_ctx and self._n_keep is not None:
            self._shift_context(int(toks.size))
        if self.n_tokens + toks.size > self._n_ctx:
            raise ContextOverflowError(
                f"{self.n_tokens + toks.size} tokens do not fit in the context of {self._n_ctx} "
                f"({self.n_tokens} already evaluated + {toks.size} new); raise n_ctx or shorten the prompt"
            )
        if toks.min() < 0 or toks.max() >= self.n_vocab():
            bad = int(toks[(toks < 0) | (toks >= self.n_vocab())][0])
            raise InvalidParameterError(f"token id {bad} is outside the vocabulary [0, {self.n_vocab()})")
        self._kv.truncate(self.n_tokens)
        if self.n_tokens < self._prompt_logits_len:
            self._prompt_logits_len = -1  # the positions those logits came from are being rewritten
        t = time.perf_counter()
        for i in range(0, toks.size, self.n_batch):
            batch = toks[i : i + self.n_batch]
            n_past, n = self.n_tokens, batch.size
            logits = self._forward(batch, n_past)
            self.input_ids[n_past : n_past + n] = batch
            if self._logits_all:
                self.scores[n_past : n_past + n] = logits
            self.last_logits[:] = logits[-1]
            self.n_tokens += n
        self.timings[f"{phase}_tokens"] += int(toks.size)
        self.timings[f"{phase}_ms"] += (time.perf_counter() - t) * 1e3

    def _shift_context(self, n_new: int) -> None:
        """Make room for ``n_new`` tokens: keep the first n_keep, drop the older half of the rest.

        The KV cache moves the later tokens down and re-rotates their keys (KVCache.shift), so
        nothing is evaluated again.
        """
        assert self._n_keep is not None
        while self.n_tokens + n_new > self._n_ctx:
            n_past = self.n_tokens
            n_keep = min(self._n_keep, n_past)
            n_discard = (n_past - n_keep) // 2
            if n_discard == 0:
                return  # nothing left to drop: the caller reports the overflow
            self._kv.shift(n_keep, n_discard, n_past, self._model.rotate_keys)
            ids = self.input_ids
            ids[n_keep : n_past - n_discard] = ids[n_keep + n_discard : n_past]  # NumPy copies overlaps safely
            if self._logits_all:
                self.scores[n_keep : n_past - n_discard] = self.scores[n_keep + n_discard : n_past]
            self.n_tokens = n_past - n_discard
            self._prompt_logits_len = -1
            log.debug("context shift: kept %d, dropped %d, %d tokens left", n_keep, n_discard, self.n_tokens)

    def reset_timings(self) -> None:
        for k in ("prompt_tokens", "prompt_ms", "eval_tokens", "eval_ms", "reused_tokens"):
            self.timings[k] = 0

    # ------------------------------------------------------------------ generation
    def _make_sampler(
        self,
        *,
        temp: float,
        top_k: int,
        top_p: float,
        min_p: float,
        typical_p: float,
        repeat_penalty: float,
        frequency_penalty: float,
        presence_penalty: float,
        seed: int | None,
        logit_bias: dict[int, float] | None,
    ) -> Sampler:
        s = self._seed if seed is None else seed
        params = SamplingParams(
            temperature=temp,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            seed=None if s in (LLAMA_DEFAULT_SEED, -1) else s,
            logit_bias=logit_bias,
        )
        params.validate()
        return Sampler(params)

    def generate(
        self,
        tokens: Sequence[int],
        top_k: int = 40,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        temp: float = 0.80,
        repeat_penalty: float = 1.0,
        reset: bool = True,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        seed: int | None = None,
        logit_bias: dict[int, float] | None = None,
        logits_processor: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        stopping_criteria: Callable[[np.ndarray, np.ndarray], bool] | None = None,
        grammar: Matcher | None = None,
        **_: Any,
    ) -> Iterator[int]:
        """Yield sampled token ids after ``tokens`` forever (the caller stops), as llama-cpp-python.

        With ``reset`` the longest prefix shared with the context is kept and only the rest is evaluated.
        ``grammar`` (a :class:`~lmap.grammar.Matcher`) constrains every token and is advanced past it.
        """
        sampler = self._make_sampler(
            temp=temp,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            seed=seed,
            logit_bias=logit_bias,
        )
        todo = list(tokens)
        if not todo:
            raise InvalidParameterError("generate() needs at least one prompt token")
        replay = False
        if reset:
            keep = self._kv.reusable(self._common_prefix(todo))
            if keep == len(todo) and self._prompt_logits_len == keep:
                # The same prompt again: sample from the logits saved when it was evaluated rather than
                # re-evaluating its last token alone, whose rounding differs from the batched run.
                replay = True
            elif keep == len(todo):
                keep -= 1  # re-evaluate one token so the logits belong to this prompt
            self.n_tokens = max(keep, 0)
            self.timings["reused_tokens"] = self.n_tokens
            todo = todo[self.n_tokens :]
        phase = "prompt"
        while True:
            if replay:
                self.last_logits[:] = self._prompt_logits
                replay = False
            else:
                self._eval(todo, phase)
                if phase == "prompt":
                    self._prompt_logits[:] = self.last_logits
                    self._prompt_logits_len = self.n_tokens
            phase = "eval"
            logits = self.last_logits
            if logits_processor is not None:
                logits = logits_processor(self._input_ids, logits)
            if grammar is not None:
                from .grammar import sample_with_grammar

                # sample freely, pay for the full-vocabulary mask only when the grammar rejects the choice
                tok = sample_with_grammar(lambda x, h=self._input_ids: sampler.sample(x, h), logits, grammar)
                grammar.accept(tok)
            else:
                tok = sampler.sample(logits, self._input_ids)
            if stopping_criteria is not None and stopping_criteria(self._input_ids, logits):
                return
            yield tok
            todo = [tok]

    def _common_prefix(self, toks: Sequence[int]) -> int:
        n = min(self.n_tokens, len(toks))
        if n == 0:
            return 0
        a = self.input_ids[:n]
        diff = np.nonzero(a != np.asarray(toks[:n], dtype=a.dtype))[0]
        return int(diff[0]) if diff.size else n

    def create_completion(
        self,
        prompt: str | list[int],
        suffix: str | None = None,
        max_tokens: int | None = 16,
        temperature: float = 0.8,
        top_p: float = 0.95,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        logprobs: int | None = None,
        echo: bool = False,
        stop: str | list[str] | None = None,
        frequency_penalty: float = 0.0,
        presence_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        top_k: int = 40,
        stream: bool = False,
        seed: int | None = None,
        model: str | None = None,
        stopping_criteria: Callable[[np.ndarray, np.ndarray], bool] | None = None,
        logits_processor: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        logit_bias: dict[int, float] | None = None,
        grammar: str | Grammar | None = None,
        response_format: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """An OpenAI ``text_completion`` dict, or with ``stream=True`` an iterator of chunks.

        ``grammar`` (GBNF text or a :class:`~lmap.grammar.Grammar`) or ``response_format``
        (``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"schema": ...}}``)
        constrains the output; generation ends as soon as the grammar is complete.
        """
        if suffix is not None:
            raise InvalidParameterError("suffix (fill-in-the-middle) is not supported")
        if logprobs is not None and logprobs < 0:
            raise InvalidParameterError(f"logprobs must be >= 0, got {logprobs}")
        gen = self._completion_chunks(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            logprobs=logprobs,
            echo=echo,
            stop=stop,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty,
            top_k=top_k,
            seed=seed,
            model=model,
            stopping_criteria=stopping_criteria,
            logits_processor=logits_processor,
            logit_bias=logit_bias,
            special=kwargs.pop("_special", False),
            grammar=self._grammar_matcher(grammar, response_format),
        )
        if stream:
            return gen
        text = []
        last: dict[str, Any] = {}
        lp: dict[str, list[Any]] | None = (
            {"tokens": [], "text_offset": [], "token_logprobs": [], "top_logprobs": []}
            if logprobs is not None
            else None
        )
        for chunk in gen:
            c = chunk["choices"][0]
            text.append(c["text"])
            if lp is not None and c["logprobs"]:
                for k in lp:
                    lp[k].extend(c["logprobs"][k])
            last = chunk
        choice = last["choices"][0]
        return {
            "id": last["id"],
            "object": "text_completion",
            "created": last["created"],
            "model": last["model"],
            "choices": [{"text": "".join(text), "index": 0, "logprobs": lp, "finish_reason": choice["finish_reason"]}],
            "usage": last["usage"],
        }

    __call__ = create_completion

    def _prompt_tokens(self, prompt: str | list[int], special: bool) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenize(prompt.encode("utf-8"), add_bos=True, special=special)
        return list(prompt)

    def _completion_chunks(
        self,
        prompt: str | list[int],
        *,
        max_tokens: int | None,
        temperature: float,
        top_p: float,
        min_p: float,
        typical_p: float,
        logprobs: int | None,
        echo: bool,
        stop: str | list[str] | None,
        frequency_penalty: float,
        presence_penalty: float,
        repeat_penalty: float,
        top_k: int,
        seed: int | None,
        model: str | None,
        stopping_criteria: Callable[[np.ndarray, np.ndarray], bool] | None,
        logits_processor: Callable[[np.ndarray, np.ndarray], np.ndarray] | None,
        logit_bias: dict[int, float] | None,
        special: bool,
        grammar: Matcher | None = None,
    ) -> Iterator[dict[str, Any]]:
        cid = f"cmpl-{uuid.uuid4()}"
        created = int(time.time())
        model_name = model or self.model_path
        prompt_tokens = self._prompt_tokens(prompt, special)
        if not prompt_tokens:
            bos = self.token_bos()
            prompt_tokens = [bos] if bos >= 0 else []
        if not prompt_tokens:
            raise InvalidParameterError("prompt is empty and the model has no BOS token to start from")
        if len(prompt_tokens) >= self._n_ctx:
            raise ContextOverflowError(
                f"prompt is {len(prompt_tokens)} tokens, the context holds {self._n_ctx}; raise n_ctx or shorten it"
            )
        if max_tokens is not None and max_tokens > 0:
            budget = min(max_tokens, self._n_ctx - len(prompt_tokens))
        else:
            budget = self._n_ctx - len(prompt_tokens)
        if self._n_keep is not None:  # context shift: the context no longer bounds the completion
            budget = max_tokens if max_tokens is not None and max_tokens > 0 else sys.maxsize
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        matcher = StopMatcher(stops)
        decoder = self._tokenizer.incremental_decoder()
        eog = self._tokenizer.eog_ids
        self.reset_timings()

        def chunk(text: str, finish: str | None, n_completion: int, lp: dict[str, Any] | None = None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": model_name,
                "choices": [{"text": text, "index": 0, "logprobs": lp, "finish_reason": finish}],
                "usage": {
                    "prompt_tokens": len(prompt_tokens),
                    "completion_tokens": n_completion,
                    "total_tokens": len(prompt_tokens) + n_completion,
                },
            }

        if echo:
            yield chunk(self.detokenize(prompt_tokens).decode("utf-8", errors="replace"), None, 0)
        finish = "length"
        n_done = 0
        offset = 0
        t_start = time.perf_counter()
        for tok in self.generate(
            prompt_tokens,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            temp=temperature,
            repeat_penalty=repeat_penalty,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            seed=seed,
            logit_bias=logit_bias,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            grammar=grammar,
        ):
            if n_done == 0:
                self.timings["ttft_ms"] = (time.perf_counter() - t_start) * 1e3
            if tok in eog:
                finish = "stop"
                break
            n_done += 1
            piece = decoder.feed(tok)
            emit, matched = matcher.feed(piece)
            lp = None
            if logprobs is not None:
                lp = self._logprobs_entry(tok, logprobs, offset)
            if emit or lp:
                offset += len(emit)
                yield chunk(emit, None, n_done, lp)
            if matched or (grammar is not None and grammar.is_complete):
                finish = "stop"
                break
            if n_done >= budget:
                break
        else:  # pragma: no cover - generate() never ends by itself
            pass
        if finish == "length" or not matcher.matched:
            tail, _ = matcher.feed(decoder.flush())
            rest = tail + (matcher.flush() if not matcher.matched else "")
            if rest:
                yield chunk(rest, None, n_done)
        yield chunk("", finish, n_done)

    def _grammar_matcher(self, grammar: str | Grammar | None, response_format: dict[str, Any] | None) -> Matcher | None:
        """A fresh matcher for ``grammar`` (GBNF text or Grammar), else for ``response_format``, else None."""
        if grammar is None and response_format is None:
            return None  # the grammar module (and its kernels) load with the first grammar
        from .grammar import Grammar, TokenVocab

        g = Grammar.from_gbnf(grammar) if isinstance(grammar, str) else grammar
        if g is None:
            g = Grammar.from_response_format(response_format)
        elif not isinstance(g, Grammar):
            raise InvalidParameterError(f"grammar must be GBNF text or a Grammar, got {type(g).__name__}")
        return None if g is None else g.matcher(TokenVocab.from_tokenizer(self._tokenizer))

    def _logprobs_entry(self, tok: int, k: int, offset: int) -> dict[str, list[Any]]:
        logits = self.last_logits.astype(np.float64)
        m = logits.max()
        logz = m + np.log(np.exp(logits - m).sum())
        lps = logits - logz
        top = np.argpartition(-lps, min(k, lps.size - 1))[: max(k, 1)] if k else np.empty(0, np.int64)
        top = top[np.argsort(-lps[top])]
        piece = self._tokenizer.token_to_piece(tok).decode("utf-8", errors="replace")
        return {
            "tokens": [piece],
            "text_offset": [offset],
            "token_logprobs": [float(lps[tok])],
            "top_logprobs": [
                {self._tokenizer.token_to_piece(int(i)).decode("utf-8", errors="replace"): float(lps[i]) for i in top}
            ]
            if k
            else [None],
        }

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Render ``messages`` with the model's chat template and tokenize it (specials parsed, no double BOS)."""
        if self._chat_template is None:
            from .chat import ChatTemplate

            template = self.metadata.get("tokenizer.chat_template")
            tok = self._tokenizer
            self._chat_template = (
                ChatTemplate(
                    template,
                    bos_token=tok.tokens[tok.bos_id] if tok.bos_id is not None and tok.bos_id >= 0 else "",
                    eos_token=tok.tokens[tok.eos_id] if tok.eos_id is not None and tok.eos_id >= 0 else "",
                )
                if template
                else ChatTemplate(None, bos_token="", eos_token="")
            )
        text = self._chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        toks = self.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        bos = self.token_bos()
        if len(toks) >= 2 and toks[0] == bos and toks[1] == bos:
            toks = toks[1:]  # the template wrote BOS itself and the tokenizer added another
        return toks

    def create_chat_completion(
        self,
        messages: list[dict[str, Any]],
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        min_p: float = 0.05,
        typical_p: float = 1.0,
        stream: bool = False,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        max_tokens: int | None = None,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        repeat_penalty: float = 1.0,
        model: str | None = None,
        logits_processor: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
        logit_bias: dict[int, float] | None = None,
        grammar: str | Grammar | None = None,
        response_format: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | Iterator[dict[str, Any]]:
        """An OpenAI ``chat.completion`` dict, or with ``stream=True`` an iterator of ``chat.completion.chunk``s.

        ``grammar`` / ``response_format`` constrain the reply as in :meth:`create_completion`.
        """
        if not messages:
            raise InvalidParameterError("messages must hold at least one message")
        prompt = self.apply_chat_template(messages)
        chunks = self._completion_chunks(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            min_p=min_p,
            typical_p=typical_p,
            logprobs=None,
            echo=False,
            stop=stop,
            frequency_penalty=frequency_penalty,
            presence_penalty=presence_penalty,
            repeat_penalty=repeat_penalty,
            top_k=top_k,
            seed=seed,
            model=model,
            stopping_criteria=None,
            logits_processor=logits_processor,
            logit_bias=logit_bias,
            special=True,
            grammar=self._grammar_matcher(grammar, response_format),
        )
        cid = f"chatcmpl-{uuid.uuid4()}"

        def stream_chunks() -> Iterator[dict[str, Any]]:
            first = True
            for c in chunks:
                ch = c["choices"][0]
                delta: dict[str, Any] = {}
                if first:
                    delta["role"] = "assistant"
                    first = False
                if ch["text"]:
                    delta["content"] = ch["text"]
                if not delta and ch["finish_reason"] is None:
                    continue
                out = {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": c["created"],
                    "model": c["model"],
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": ch["finish_reason"]}],
                }
                if ch["finish_reason"] is not None:
                    out["usage"] = c["usage"]
                yield out

        if stream:
            return stream_chunks()
        text: list[str] = []
        last: dict[str, Any] = {}
        for c in chunks:
            text.append(c["choices"][0]["text"])
            last = c
        return {
            "id": cid,
            "object": "chat.completion",
            "created": last["created"],
            "model": last["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "logprobs": None,
                    "finish_reason": last["choices"][0]["finish_reason"],
                }
            ],
            "usage": last["usage"],
        }

    # ------------------------------------------------------------------ misc
    @property
    def model_size_bytes(self) -> int:
        return sum(t.nbytes for t in self._gguf.tensors.values())

    def close(self) -> None:
        if self.residency is not None:
            self.residency.close()
        self._gguf.close()

    def __repr__(self) -> str:
        return f"Llama({Path(self.model_path).name!r}, n_ctx={self._n_ctx}, n_batch={self.n_batch})"
