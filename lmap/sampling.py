"""Token sampling: llama.cpp's default sampler chain as small composable stages, plus stop-string matching.

The chain is the one llama-cpp-python builds for ``create_completion`` (``Llama._init_sampler``)::

    logit bias -> penalties -> top-k -> typical -> top-p -> min-p -> temperature -> draw

with ``temperature == 0`` meaning greedy (argmax of the biased and penalized logits, no truncation).
llama-cpp-python applies ``logit_bias`` as a logits processor that runs before the penalties, so the
bias comes first here too; the order matters because the repeat penalty scales by sign.

Speed: :meth:`Sampler.sample` runs once per generated token on the full vocabulary (49152 entries for
SmolLM2, 262144 for Gemma 3). Only the top-k selection touches the whole vector, and it does so without
copying it: logit bias and penalties are kept as sparse edits (a few dozen ids) that are merged into the
top-k pool, and the top-k itself is found through per-group maxima (see :func:`_top_k_unordered`). Every
later stage works on the k survivors (with ``top_k=0`` there is no such cut, and the whole vocabulary goes
through the chain, at a few milliseconds per token).
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import InvalidParameterError

log = logging.getLogger("lmap")

__all__ = [
    "SamplingParams",
    "Candidates",
    "Stage",
    "LogitBias",
    "Penalties",
    "TopK",
    "TypicalP",
    "TopP",
    "MinP",
    "Temperature",
    "Sampler",
    "StopMatcher",
    "log_softmax",
    "top_logprobs",
]

# llama.cpp's min_keep as llama-cpp-python passes it (max(1, n_probs) with n_probs = 0)
_MIN_KEEP = 1
# Below this many candidates a full sort is cheaper than any partial scheme
_SMALL = 1024


def _is_int(x: object) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return isinstance(x, int | float | np.integer | np.floating) and not isinstance(x, bool)


@dataclass
class SamplingParams:
    """Sampling settings, with llama-cpp-python's ``create_completion`` defaults.

    ``penalty_last_n`` is llama.cpp's (and llama-cpp-python's ``last_n_tokens_size``) default of 64;
    ``-1`` means the whole history and ``0`` disables the penalties. ``seed=None`` (or ``-1``) draws a
    random seed. ``logit_bias`` maps token ids (ints, or strings of ints as JSON delivers them) to an
    additive bias; ``-inf`` bans a token.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None
    logit_bias: Mapping[int, float] | None = field(default=None)

    def validate(self) -> None:
        """Raise :class:`InvalidParameterError` naming the first parameter that is out of range."""

        def real(name: str, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise InvalidParameterError(f"{name} must be a finite number, got {v!r}")
            if lo is not None and (v < lo or (lo_open and v == lo)):
                bound = f"> {lo}" if lo_open else f">= {lo}"
                expected = f"in [{lo}, {hi}]" if hi is not None else bound
                raise InvalidParameterError(f"{name} must be {expected}, got {v!r}")
            if hi is not None and v > hi:
                raise InvalidParameterError(f"{name} must be in [{lo}, {hi}], got {v!r}")

        real("temperature", 0.0)
        real("top_p", 0.0, 1.0)
        real("min_p", 0.0, 1.0)
        real("typical_p", 0.0, 1.0)
        real("repeat_penalty", 0.0, lo_open=True)
        real("frequency_penalty")
        real("presence_penalty")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise InvalidParameterError(f"top_k must be an integer >= 0 (0 = whole vocabulary), got {self.top_k!r}")
        if not _is_int(self.penalty_last_n) or self.penalty_last_n < -1:
            raise InvalidParameterError(
                f"penalty_last_n must be an integer >= -1 (-1 = whole history, 0 = off), got {self.penalty_last_n!r}"
            )
        if self.seed is not None and (not _is_int(self.seed) or self.seed < -1):
            raise InvalidParameterError(f"seed must be None, -1 (random) or an integer >= 0, got {self.seed!r}")
        _normalize_bias(self.logit_bias)


def _normalize_bias(bias: Mapping[int, float] | None) -> dict[int, float]:
    if bias is None:
        return {}
    if not isinstance(bias, Mapping):
        raise InvalidParameterError(f"logit_bias must be a mapping of token id -> bias, got {type(bias).__name__}")
    out: dict[int, float] = {}
    for k, v in bias.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise InvalidParameterError(f"logit_bias key {k!r} must be an integer token id") from None
        if tok < 0:
            raise InvalidParameterError(f"logit_bias key {k!r} must be a token id >= 0")
        if not _is_real(v) or math.isnan(v) or v == math.inf:
            raise InvalidParameterError(f"logit_bias[{k!r}] must be a finite number or -inf, got {v!r}")
        out[tok] = out.get(tok, 0.0) + float(v)
    return out


# --------------------------------------------------------------------------- top-k selection


def _top_k_unordered(x: np.ndarray, k: int, gmax: np.ndarray | None = None) -> np.ndarray:
    """Indices of the ``k`` largest entries of 1-D ``x``, in no particular order.

    ``np.argpartition`` over 262144 floats costs ~0.5 ms. Instead, view ``x`` as a (b, g) matrix whose
    column j holds x[j], x[j+g], ..., a group of b entries. Every top-k entry is at most its group's max, so
    it lies in one of the k groups with the largest maxima (ties aside, which may go either way as in any
    top-k). One vectorized column-max pass over ``x`` (SIMD along contiguous rows), an argpartition over the
    g ~ sqrt(n*k) maxima and a look at the k chosen groups replace the full partition.
    """
    n = x.shape[0]
    if k >= n:
        return np.arange(n)
    b = int(math.sqrt(n / k))
    if b < 4 or n < 4096:
        return np.argpartition(x, n - k)[n - k :]
    g = n // b
    main = x[: g * b].reshape(b, g)
    if gmax is None or gmax.shape[0] != g:
        gmax = np.empty(g, dtype=x.dtype)
    np.max(main, axis=0, out=gmax)
    cols = np.argpartition(gmax, g - k)[g - k :]
    # every top-k entry is >= the smallest of the k chosen group maxima, and the chosen groups hold at
    # least k such entries; keep just those (usually little more than k) before the final partition
    threshold = gmax[cols].min()
    pool = main.take(cols, axis=1).ravel()
    hit = np.flatnonzero(pool >= threshold)
    idx = (hit // k) * g + cols[hit % k]
    if g * b < n:
        tail = np.flatnonzero(x[g * b :] >= threshold) + g * b
        idx = np.concatenate((idx, tail))
    if idx.shape[0] > k:
        idx = idx[np.argpartition(x[idx], idx.shape[0] - k)[idx.shape[0] - k :]]
    return idx


def _unique_counts(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_counts=True)`` for the few dozen ids of a penalty window, at a third of its cost."""
    s = np.sort(a)
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    return s[starts], np.diff(np.append(starts, s.shape[0]))


def _not_in_sorted(a: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """Mask of the entries of ``a`` absent from the sorted array ``sorted_ids`` (``~np.isin``, cheaper when small)."""
    pos = np.minimum(np.searchsorted(sorted_ids, a), sorted_ids.shape[0] - 1)
    return sorted_ids[pos] != a


def _order_desc(v: np.ndarray) -> np.ndarray:
    """Indices ordering ``v`` by descending value; stable (ties keep their order) unless ``v`` is vocabulary-sized,
    where a stable argsort costs ~45 ms at 262144 entries and an unstable one ~10."""
    return np.argsort(-v, kind="stable" if v.shape[0] <= 16 * _SMALL else None)


# --------------------------------------------------------------------------- stages


class Candidates:
    """The tokens still in the running: ids and their logits, plus whether they are sorted by logit.

    Logits are float64 for the usual few dozen top-k survivors and float32 for whole-vocabulary candidates
    (top_k = 0), where float64 would double the cost of every pass; sums are taken in float64 either way.

    Stages own and may modify these arrays; they never alias the caller's logits.
    """

    __slots__ = ("ids", "logits", "sorted")

    def __init__(self, ids: np.ndarray, logits: np.ndarray, sorted: bool = False) -> None:
        self.ids = ids
        self.logits = logits
        self.sorted = sorted

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def keep(self, sel: np.ndarray | slice, *, sorted: bool | None = None) -> None:
        """Keep the candidates picked by ``sel`` (an index array or slice)."""
        self.ids = self.ids[sel]
        self.logits = self.logits[sel]
        if sorted is not None:
            self.sorted = sorted

    def sort(self) -> None:
        """Order by descending logit (stable, so equal logits keep their order)."""
        if not self.sorted:
            self.keep(_order_desc(self.logits), sorted=True)

    def probs(self) -> np.ndarray:
        """Softmax of the current logits."""
        p = np.exp(self.logits - self.logits.max())
        p /= p.sum(dtype=np.float64)
        return p


class Stage(Protocol):
    """A filter or transform over :class:`Candidates` (top-k onwards)."""

    def apply(self, cand: Candidates) -> None: ...


class LogitBias:
    """Adds a fixed bias to some token ids (a sparse edit of the logits, applied before the penalties)."""

    def __init__(self, bias: Mapping[int, float] | None) -> None:
        b = _normalize_bias(bias)
        self.ids = np.fromiter(b.keys(), dtype=np.intp, count=len(b))
        self.values = np.fromiter(b.values(), dtype=np.float32, count=len(b))
        order = np.argsort(self.ids)
        self.ids, self.values = self.ids[order], self.values[order]
        self._checked_n = -1

    def __bool__(self) -> bool:
        return bool(self.ids.shape[0])

    def check(self, n_vocab: int) -> None:
        if n_vocab != self._checked_n:
            if self.ids.shape[0] and int(self.ids[-1]) >= n_vocab:
                raise InvalidParameterError(
                    f"logit_bias key {int(self.ids[-1])} is outside the vocabulary (token ids 0..{n_vocab - 1})"
                )
            self._checked_n = n_vocab


class Penalties:
    """llama.cpp's repeat / frequency / presence penalties over the last ``last_n`` tokens of the history.

    For each token that occurs ``c`` times in the window: a positive logit is divided by ``repeat``, a
    non-positive one multiplied (so the penalty always lowers it), then ``c * frequency + presence`` is
    subtracted.
    """

    def __init__(self, last_n: int, repeat: float, frequency: float, presence: float) -> None:
        self.last_n = last_n
        self.repeat = np.float32(repeat)
        self.frequency = np.float32(frequency)
        self.presence = np.float32(presence)
        self.enabled = last_n != 0 and not (repeat == 1.0 and frequency == 0.0 and presence == 0.0)

    def window(self, history: Sequence[int] | np.ndarray, n_vocab: int) -> tuple[np.ndarray, np.ndarray]:
        """The distinct token ids in the window and how often each occurs."""
        if not self.enabled:
            return np.empty(0, np.intp), np.empty(0, np.intp)
        if not isinstance(history, np.ndarray | list | tuple):
            history = list(history)
        if len(history) == 0:
            return np.empty(0, np.intp), np.empty(0, np.intp)
        arr = np.asarray(history if self.last_n < 0 else history[-self.last_n :])
        if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
            raise InvalidParameterError(f"history must be a 1-D sequence of token ids, got {arr.dtype} {arr.shape}")
        ids, counts = _unique_counts(arr)
        if ids.size and (ids[0] < 0 or ids[-1] >= n_vocab):
            bad = int(ids[0]) if ids[0] < 0 else int(ids[-1])
            raise InvalidParameterError(f"history holds token id {bad}, outside the vocabulary 0..{n_vocab - 1}")
        return ids.astype(np.intp, copy=False), counts

    def penalize(self, values: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Penalized copies of ``values`` (float32 logits of tokens seen ``counts`` times)."""
        v = np.where(values <= 0, values * self.repeat, values / self.repeat)
        return v - (counts.astype(np.float32) * self.frequency + self.presence)


class TopK:
    """Keep the ``k`` highest logits (``k <= 0``: keep all)."""

    def __init__(self, k: int) -> None:
        self.k = k

    def apply(self, cand: Candidates) -> None:
        n = len(cand)
        if self.k <= 0 or self.k >= n:
            return
        cand.keep(_top_k_unordered(cand.logits, self.k), sorted=False)


class TypicalP:
    """Locally typical sampling: keep the tokens whose surprise is closest to the entropy, up to mass ``p``."""

    def __init__(self, p: float, min_keep: int = _MIN_KEEP) -> None:
        self.p = p
        self.min_keep = min_keep

    def apply(self, cand: Candidates) -> None:
        if self.p >= 1.0 or len(cand) <= 1:
            return
        cand.sort()
        p = cand.probs()
        with np.errstate(divide="ignore", invalid="ignore"):
            logp = np.log(p)
            # 0 * log 0 is 0 in the entropy; letting it be NaN would poison every score
            plogp = np.where(p > 0, p * logp, 0.0)
        entropy = -plogp.sum(dtype=np.float64)
        order = np.argsort(np.abs(-logp - entropy), kind="stable")
        cum = np.cumsum(p[order], dtype=np.float64)
        # first i with cum > p (and at least min_keep kept)
        last = int(np.searchsorted(cum, self.p, side="right"))
        last = min(max(last + 1, self.min_keep), len(cand))
        cand.keep(order[:last], sorted=False)


class TopP:
    """Nucleus sampling: keep the most likely tokens until their mass reaches ``p``."""

    def __init__(self, p: float, min_keep: int = _MIN_KEEP) -> None:
        self.p = p
        self.min_keep = min_keep

    def apply(self, cand: Candidates) -> None:
        if self.p >= 1.0 or len(cand) <= 1:
            return
        n = len(cand)
        if not cand.sorted and n > _SMALL:
            self._apply_large(cand)
            return
        cand.sort()
        w = np.exp(cand.logits - cand.logits[0])
        cum = np.cumsum(w, dtype=np.float64)
        # first i whose cumulative probability reaches p (cum / total >= p), keeping at least min_keep
        last = int(np.searchsorted(cum, self.p * cum[-1], side="left"))
        cand.keep(slice(0, min(max(last + 1, self.min_keep), n)))

    def _apply_large(self, cand: Candidates) -> None:
        # Whole-vocabulary candidates (top_k = 0): the nucleus is usually small, so order only the best few
        # hundred, then a few thousand; failing that (a flat tail), a value sort of the weights (~3 ms, far
        # cheaper than an argsort of the vocabulary) gives the cut-off, and the nucleus is every token above
        # it, left unsorted
        n = len(cand)
        lg = cand.logits
        w = np.exp(lg - lg.max())
        total = float(w.sum(dtype=np.float64))
        head_n = 256
        while head_n < n // 4:
            head = _top_k_unordered(lg, head_n)
            head = head[_order_desc(lg[head])]
            cum = np.cumsum(w[head], dtype=np.float64)
            last = int(np.searchsorted(cum, self.p * total, side="left"))
            if last < head_n:
                cand.keep(head[: max(last + 1, self.min_keep)], sorted=True)
                return
            head_n *= 16
        desc = np.sort(w)[::-1]
        cum = np.cumsum(desc, dtype=np.float64)
        keep = min(max(int(np.searchsorted(cum, self.p * cum[-1], side="left")) + 1, self.min_keep), n)
        cut = desc[keep - 1]
        sel = np.flatnonzero(w > cut)
        if sel.shape[0] < keep:  # ties at the cut-off: take as many as the count asks for, lowest ids first
            sel = np.concatenate((sel, np.flatnonzero(w == cut)[: keep - sel.shape[0]]))
        cand.keep(sel, sorted=False)


class MinP:
    """Keep tokens whose probability is at least ``p`` times the most likely one's."""

    def __init__(self, p: float, min_keep: int = _MIN_KEEP) -> None:
        self.p = p
        self.min_keep = min_keep

    def apply(self, cand: Candidates) -> None:
        if self.p <= 0.0 or len(cand) <= 1:
            return
        # p_i >= p * p_max  <=>  logit_i >= logit_max + log p
        if cand.sorted:
            threshold = cand.logits[0] + math.log(self.p)
            n = int(np.count_nonzero(cand.logits >= threshold))
            cand.keep(slice(0, max(n, self.min_keep)))
            return
        mask = cand.logits >= cand.logits.max() + math.log(self.p)
        if int(np.count_nonzero(mask)) >= self.min_keep:
            cand.keep(mask)
        else:
            cand.sort()
            cand.keep(slice(0, self.min_keep))


class Temperature:
    """Divide the logits by ``t`` (``t <= 0``: keep only the best token, llama.cpp's greedy temperature)."""

    def __init__(self, t: float) -> None:
        self.t = t

    def apply(self, cand: Candidates) -> None:
        if self.t <= 0.0:
            best = int(np.argmax(cand.logits))
            cand.keep(slice(best, best + 1), sorted=True)
        elif self.t != 1.0:
            cand.logits = cand.logits / self.t


# --------------------------------------------------------------------------- the sampler


class Sampler:
    """The sampler chain for one generation, with its own seeded random generator.

    ``sample(logits, history)`` returns the next token id. ``logits`` (n_vocab floats) is never modified;
    ``history`` is the token ids so far (prompt and generated), of which the last ``penalty_last_n`` feed
    the penalties. The same seed and inputs give the same tokens.
    """

    def __init__(self, params: SamplingParams | None = None) -> None:
        self.params = params if params is not None else SamplingParams()
        self.params.validate()
        p = self.params
        self.bias = LogitBias(p.logit_bias)
        self.penalties = Penalties(p.penalty_last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty)
        self.greedy = p.temperature == 0.0
        self.top_k = TopK(p.top_k)
        # top-k is handled inside sample() (it needs the sparse edits); these run on its survivors
        self.stages: list[Stage] = [TypicalP(p.typical_p), TopP(p.top_p), MinP(p.min_p), Temperature(p.temperature)]
        # the common chain without edits goes through one compiled pass (lmap/kernels/sampling.py);
        # it needs only top_k > 0 and top_p < 1 (sorted survivors: the same order as the chain's)
        self._fast = (
            not self.greedy
            and p.top_k > 0
            and p.top_p < 1.0
            and p.typical_p >= 1.0
            and p.temperature > 0.0
            and not self.bias
            and not self.penalties.enabled
        )
        self._fast_buf: tuple[np.ndarray, ...] | None = None
        self._gmax: np.ndarray | None = None
        self._full_ids: np.ndarray | None = None
        self._full_buf = np.empty(0, dtype=np.float32)
        self._requested_seed: int | None = None
        self._seed = 0
        self._rng = np.random.default_rng(0)
        self.reseed(p.seed)

    # ---- randomness

    @property
    def seed(self) -> int:
        """The seed in use (drawn at random when the params asked for none), for reproducing a run."""
        return self._seed

    def reseed(self, seed: int | None) -> None:
        """Restart the random generator from ``seed`` (``None`` or ``-1``: a fresh random seed)."""
        if seed is not None and (not _is_int(seed) or seed < -1):
            raise InvalidParameterError(f"seed must be None, -1 (random) or an integer >= 0, got {seed!r}")
        self._requested_seed = None if seed is None or seed == -1 else int(seed)
        self.reset()

    def reset(self) -> None:
        """Restart the random generator from the seed (a new random one if none was given), as llama.cpp."""
        self._seed = self._requested_seed if self._requested_seed is not None else secrets.randbits(32)
        self._rng = np.random.default_rng(self._seed)

    # ---- sampling

    def _edits(self, logits: np.ndarray, history: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Token ids touched by the logit bias and the penalties, and their new logits (float32)."""
        n = logits.shape[0]
        self.bias.check(n)
        pen_ids, counts = self.penalties.window(history, n)
        if not pen_ids.size:
            if not self.bias:
                return pen_ids, np.empty(0, np.float32)
            return self.bias.ids, logits[self.bias.ids] + self.bias.values
        if not self.bias:
            return pen_ids, self.penalties.penalize(logits[pen_ids], counts)
        ids = _unique_counts(np.concatenate((self.bias.ids, pen_ids)))[0]
        vals = logits[ids].astype(np.float32, copy=True)
        vals[np.searchsorted(ids, self.bias.ids)] += self.bias.values
        at = np.searchsorted(ids, pen_ids)
        vals[at] = self.penalties.penalize(vals[at], counts)
        return ids, vals

    def _greedy(self, logits: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> int:
        best = int(np.argmax(logits))
        if not ids.size:
            return best
        j = int(np.argmax(vals))
        if np.searchsorted(ids, best) < ids.size and ids[np.searchsorted(ids, best)] == best:
            # the raw winner was edited: find the best untouched token among the top len(ids)+1
            top = _top_k_unordered(logits, min(ids.size + 1, logits.shape[0]), self._gmax)
            top = top[_not_in_sorted(top, ids)]
            if not top.size:
                return int(ids[j])
            top_v = logits[top]
            best = int(top[top_v == top_v.max()].min())
        # llama.cpp's greedy keeps the first (lowest id) of equal maxima
        if vals[j] > logits[best] or (vals[j] == logits[best] and ids[j] < best):
            return int(ids[j])
        return best

    def _candidates(self, logits: np.ndarray, ids: np.ndarray, vals: np.ndarray) -> Candidates:
        """The top-k candidates of the edited logits, without materializing the edited vector."""
        n = logits.shape[0]
        k = self.top_k.k
        if k <= 0 or k >= n:
            if self._full_ids is None or self._full_ids.shape[0] != n:
                self._full_ids = np.arange(n, dtype=np.intp)
                self._full_buf = np.empty(n, dtype=np.float32)
            full = self._full_buf
            np.copyto(full, logits)
            full[ids] = vals
            return Candidates(self._full_ids, full, sorted=False)
        if not ids.size:
            top = _top_k_unordered(logits, k, self._gmax_for(n, k))
            return Candidates(top, logits[top].astype(np.float64))
        # top k + |edited| of the raw logits hold at least k untouched tokens, so the best k untouched ones
        # plus every edited token hold the top k of the edited logits
        top = _top_k_unordered(logits, min(k + ids.size, n), self._gmax_for(n, k + ids.size))
        top = top[_not_in_sorted(top, ids)]
        pool_ids = np.concatenate((top, ids))
        pool_v = np.concatenate((logits[top].astype(np.float64), vals.astype(np.float64)))
        cand = Candidates(pool_ids, pool_v)
        self.top_k.apply(cand)
        return cand

    def _gmax_for(self, n: int, k: int) -> np.ndarray | None:
        b = int(math.sqrt(n / k)) if k < n else 0
        if b < 4:
            return None
        g = n // b
        if self._gmax is None or self._gmax.shape[0] != g:
            self._gmax = np.empty(g, dtype=np.float32)
        return self._gmax

    def _checked(self, logits: np.ndarray) -> np.ndarray:
        x = np.asarray(logits, dtype=np.float32)
        if x.ndim != 1 or x.shape[0] == 0:
            raise InvalidParameterError(f"logits must be a non-empty 1-D array of n_vocab floats, got shape {x.shape}")
        return x

    def _final(self, x: np.ndarray, history: Sequence[int] | np.ndarray) -> Candidates:
        ids, vals = self._edits(x, history)
        if self.greedy:
            best = self._greedy(x, ids, vals)
            return Candidates(np.array([best], dtype=np.intp), np.zeros(1), sorted=True)
        cand = self._candidates(x, ids, vals)
        for stage in self.stages:
            stage.apply(cand)
        return cand

    def sample(self, logits: np.ndarray, history: Sequence[int] | np.ndarray = ()) -> int:
        """The next token id, drawn from ``logits`` (n_vocab) given the token ``history``."""
        x = self._checked(logits)
        if self.greedy:
            ids, vals = self._edits(x, history)
            return self._greedy(x, ids, vals)
        if self._fast and self.params.top_k < x.shape[0]:
            return self._sample_fast(x)
        return self._draw(self._final(x, history))

    def _sample_fast(self, x: np.ndarray) -> int:
        from .kernels.sampling import CHUNK, sample_top_k

        p = self.params
        nch = -(-x.shape[0] // CHUNK)
        if self._fast_buf is None or self._fast_buf[3].shape[0] != nch:
            k = p.top_k
            ids, vals, cum = np.empty(k, np.int64), np.empty(k, np.float64), np.empty(k, np.float64)
            self._fast_buf = (ids, vals, cum, np.empty(nch, np.float32), np.empty(nch, np.float32))
        u = self._rng.random()  # drawn first, as in _draw
        return int(sample_top_k(x, p.top_k, p.top_p, p.min_p, p.temperature, u, *self._fast_buf))

    def distribution(
        self, logits: np.ndarray, history: Sequence[int] | np.ndarray = ()
    ) -> tuple[np.ndarray, np.ndarray]:
        """The token ids the draw would choose between and their probabilities (no randomness used)."""
        cand = self._final(self._checked(logits), history)
        m = cand.logits.max()
        p = np.exp(cand.logits - m) if m > -np.inf else np.full(len(cand), 1.0)
        return cand.ids.copy(), p / p.sum()

    def _draw(self, cand: Candidates) -> int:
        # one uniform per token even when a single candidate is left, so the random stream does not
        # depend on how much the filters cut (llama.cpp's dist sampler does the same)
        u = self._rng.random()
        if len(cand) == 1:
            return int(cand.ids[0])
        m = cand.logits.max()
        if m == -np.inf:  # everything banned: nothing to weigh, fall back to the first
            return int(cand.ids[0])
        cum = np.cumsum(np.exp(cand.logits - m), dtype=np.float64)
        i = int(np.searchsorted(cum, u * cum[-1], side="right"))
        return int(cand.ids[min(i, len(cand) - 1)])


# --------------------------------------------------------------------------- log-probabilities


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities of ``logits`` (float32 result, normalizer summed in float64)."""
    x = np.asarray(logits, dtype=np.float32)
    m = float(x.max())
    if not math.isfinite(m):
        m = 0.0
    with np.errstate(divide="ignore"):
        logz = m + math.log(float(np.sum(np.exp(x - np.float32(m)), dtype=np.float64)))
    return x - np.float32(logz)


def top_logprobs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most likely token ids (most likely first) and their log-probabilities (float64).

    Costs one exp-sum pass over the vocabulary, with no full log-softmax vector built.
    """
    x = np.asarray(logits, dtype=np.float32)
    if k <= 0:
        return np.empty(0, np.intp), np.empty(0, np.float64)
    k = min(k, x.shape[0])
    m = float(x.max())
    if not math.isfinite(m):
        m = 0.0
    with np.errstate(divide="ignore"):
        logz = m + math.log(float(np.sum(np.exp(x - np.float32(m)), dtype=np.float64)))
    ids = _top_k_unordered(x, k)
    lp = x[ids].astype(np.float64) - logz
    order = np.lexsort((ids, -lp))
    return ids[order], lp[order]


# --------------------------------------------------------------------------- stop strings


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    ``feed(piece)`` returns ``(text, matched)``: the text that is safe to emit now, and whether a stop
    string was found. Text that could still turn out to be the start of a stop string is held back; once a
    stop string is found, the text before it is released, everything from it on is dropped, and later feeds
    return ``("", True)``. ``flush()`` releases what is held back when the stream ends without a match.
    """

    def __init__(self, stop: str | Iterable[str] | None) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        for s in stops:
            if not isinstance(s, str):
                raise InvalidParameterError(f"stop must be a string or a list of strings, got an item {s!r}")
        self.stops = [s for s in dict.fromkeys(stops) if s]
        # every proper prefix of a stop string: a buffer ending in one of these might still become a match
        self._prefixes = {s[:i] for s in self.stops for i in range(1, len(s))}
        self._max_hold = max((len(s) - 1 for s in self.stops), default=0)
        self._held = ""
        self.matched: str | None = None

    @property
    def held(self) -> str:
        """Text received but not yet released (a possible start of a stop string)."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Add ``text``; return the text safe to emit and whether a stop string has matched."""
        if self.matched is not None:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        first, which = -1, None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (first < 0 or i < first):
                first, which = i, s
        if which is not None:
            self.matched = which
            self._held = ""
            return buf[:first], True
        hold = 0
        for n in range(min(self._max_hold, len(buf)), 0, -1):
            if buf[-n:] in self._prefixes:
                hold = n
                break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """Release the held-back text (the stream ended without a match); empty after a match."""
        out, self._held = self._held, ""
        return "" if self.matched is not None else out
