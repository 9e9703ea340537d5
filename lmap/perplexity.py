"""``lmap perplexity``: llama-perplexity's chunked perplexity and KL divergence, for lmap models.

The method is llama.cpp's (tools/perplexity/perplexity.cpp, ``perplexity`` and ``kl_divergence``),
so the numbers compare with llama-perplexity's on the same text and context:

- The whole text is tokenized once, with BOS when the model adds one (the CLI reads ``-f`` as
  llama.cpp does: raw bytes, one trailing newline dropped).
- It is cut into ``n_chunk = n_tokens // n_ctx`` chunks (``chunks`` caps it). Each chunk is evaluated
  from an empty KV cache in ``n_batch`` pieces; when the model adds BOS, the chunk's first token is
  replaced by BOS.
- Only the second half of each chunk is scored: the logits at positions ``first = n_ctx // 2`` to
  ``n_ctx - 2`` predict tokens ``first + 1`` to ``n_ctx - 1`` (``n_ctx - 1 - first`` per chunk), so every
  scored token sees at least ``n_ctx / 2`` tokens of context.
- Negative log-likelihoods use llama.cpp's log-softmax (float32 logits and ``exp``, float64 sums);
  PPL = exp(mean NLL) and its error is ``PPL * sqrt(var(NLL) / (count - 1))``, llama.cpp's formula.
- Running estimates after each chunk print as ``[1]17.7677,[2]12.6574,...`` and the end as
  ``Final estimate: PPL = X +/- Y``.

KL divergence (``kl_base``) compares a model's next-token distributions with a base model's, saved
before by a run with ``save_base``, over the same scored positions.

Base file format (``save_base`` / ``--kl-divergence-base``): byte for byte llama.cpp's
``--kl-divergence-base`` file, so either tool reads the other's, plus an lmap trailer llama.cpp ignores:

=========================  ====================================================================
``b"_logits_"``            8-byte magic
``uint32 n_ctx``           context of every chunk
``int32 n_vocab``
``int32 n_chunk``
``int32 tokens[n_chunk*n_ctx]``  the text's tokens (original ids; BOS replacement is not stored)
rows                       per chunk, ``n_ctx - 1 - n_ctx//2`` rows of ``nv = 2*((n_vocab+1)//2) + 4``
                           uint16: the first 4 hold float32 ``scale`` and ``min_log_prob``, then one
                           uint16 ``q`` per token with log p = scale*q + min_log_prob. The range covers
                           16 nats below the most likely token; anything lower is stored as q = 0.
trailer (lmap only)        UTF-8 JSON (tokenizer fingerprint, text sha256, model, PPL), its uint64
                           length, and the 8-byte magic ``b"lmapKLD1"``
=========================  ====================================================================

A 49152-token vocabulary costs 25 MB per 512-token chunk (262144 tokens: 134 MB); ``chunks`` bounds it.
A base file is refused when its vocabulary size, n_ctx, tokenizer (trailer) or text (the stored tokens
against the text's, and the trailer's text hash) differ from the run's.

Only the standard library is imported at the top: ``cli.build_parser`` imports this module for its
argument definitions, and NumPy / Numba load when a computation starts.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from .errors import ContextOverflowError, InvalidParameterError, LmapError, UnsupportedModelError

if TYPE_CHECKING:
    import numpy as np

    from .llama import Llama

DEFAULT_N_CTX = 512
BASE_MAGIC = b"_logits_"
TRAILER_MAGIC = b"lmapKLD1"
_HEADER = struct.Struct("<8sIii")  # magic, n_ctx, n_vocab, n_chunk
_TRAILER_LEN = struct.Struct("<Q")
# log-probs more than this many nats below the best token are not stored (llama.cpp's choice)
LOG_PROB_RANGE = 16.0
# bound on the float32 logits block handed to the log-softmax (rows x n_vocab x 4 bytes)
LOGITS_BLOCK_BYTES = 256 << 20
PERCENTILES = (0.999, 0.99, 0.95, 0.90, 0.10, 0.05, 0.01, 0.001)


# ---------------------------------------------------------------------- results
@dataclass
class KLDivergenceResult:
    """llama-perplexity's KL-divergence statistics (each ``*_err`` is one standard error)."""

    ppl_base: float
    ppl_base_err: float
    ln_ppl_ratio: float  # mean ln(PPL(Q) / PPL(base))
    ln_ppl_ratio_err: float
    ppl_correlation: float  # Cor(ln PPL(Q), ln PPL(base))
    kld_mean: float
    kld_err: float
    kld_percentiles: dict[str, float]  # "max", "99.9", "99", "95", "90", "median", "10", "5", "1", "0.1", "min"
    dp_mean: float  # mean of p(token) - p_base(token)
    dp_err: float
    dp_rms: float
    dp_rms_err: float
    dp_percentiles: dict[str, float]
    same_top: float  # fraction of positions where both models' most likely token is the same
    same_top_err: float


@dataclass
class PerplexityResult:
    """One ``perplexity()`` run. ``running[i]`` is the PPL estimate after chunk ``i + 1``."""

    model: str
    n_ctx: int
    n_batch: int
    n_tokens: int  # tokens of the text (BOS included) or of the base file
    n_chunks: int
    n_scored: int  # predictions scored: n_chunks * (n_ctx - 1 - n_ctx // 2)
    ppl: float
    ppl_err: float
    nll: float  # mean negative log-likelihood, nats per token
    running: list[float] = field(default_factory=list)
    seconds: float = 0.0
    kld: KLDivergenceResult | None = None

    @property
    def tokens_per_second(self) -> float:
        """Tokens evaluated (n_chunks x n_ctx) per second of the run."""
        return self.n_chunks * self.n_ctx / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_second"] = self.tokens_per_second
        return d


# ---------------------------------------------------------------------- statistics (llama.cpp's formulas)
def ppl_from_sums(sum_nll: float, sum_nll2: float, count: int) -> tuple[float, float]:
    """PPL and its standard error from the sum and sum of squares of ``count`` NLLs (nan error if undefined).

    As llama-perplexity: err = PPL * sqrt((E[nll^2] - E[nll]^2) / (count - 1)).
    """
    if count < 1:
        raise InvalidParameterError("perplexity needs at least one scored token")
    mean = sum_nll / count
    ppl = math.exp(mean)
    var = sum_nll2 / count - mean * mean
    if var <= 0 or count < 2:
        return ppl, math.nan
    return ppl, ppl * math.sqrt(var / (count - 1))


def mean_and_uncertainty(total: float, total2: float, count: int) -> tuple[float, float]:
    """Mean and its standard error, 0 below 11 samples (llama.cpp's ``mean_and_uncertainty`` in KL mode)."""
    if count < 1:
        return 0.0, 0.0
    f = total / count
    df = total2 / count - f * f
    return f, (math.sqrt(df / (count - 1)) if df > 0 and count > 10 else 0.0)


def _covariance(suma: float, sumb: float, sumab: float, count: int) -> float:
    if count < 10:
        return 0.0
    return (sumab / count - (suma / count) * (sumb / count)) / (count - 1)


def percentile(sorted_values: Sequence[float] | np.ndarray, fraction: float) -> float:
    """Linear-interpolated percentile of ascending values, as llama-perplexity computes it."""
    n = len(sorted_values)
    if n == 0:
        return math.nan
    if fraction <= 0:
        return float(sorted_values[0])
    if fraction >= 1:
        return float(sorted_values[n - 1])
    p = fraction * (n - 1)
    ip = int(p)
    p -= ip
    return float((1 - p) * sorted_values[ip] + p * sorted_values[min(ip + 1, n - 1)])


def _median(sorted_values: np.ndarray) -> float:
    n = len(sorted_values)
    if n % 2 == 0:
        return float(0.5 * (sorted_values[n // 2] + sorted_values[n // 2 - 1]))
    return float(sorted_values[n // 2])


def _pct_table(sorted_values: np.ndarray) -> dict[str, float]:
    t = {"max": float(sorted_values[-1])}
    for f in PERCENTILES[:4]:
        t[f"{100 * f:g}"] = percentile(sorted_values, f)
    t["median"] = _median(sorted_values)
    for f in PERCENTILES[4:]:
        t[f"{100 * f:g}"] = percentile(sorted_values, f)
    t["min"] = float(sorted_values[0])
    return t


# ---------------------------------------------------------------------- chunking
def scored_per_chunk(n_ctx: int) -> int:
    """Predictions scored in one chunk: positions n_ctx//2 .. n_ctx-2 predict the next token."""
    return n_ctx - 1 - n_ctx // 2


def plan_chunks(n_tokens: int, n_ctx: int, chunks: int | None = None) -> int:
    """Number of chunks llama-perplexity evaluates: ``n_tokens // n_ctx``, capped by ``chunks``.

    Raises like llama.cpp when the text has fewer than ``2 * n_ctx`` tokens.
    """
    if n_ctx < 3:
        raise InvalidParameterError(f"n_ctx must be >= 3 (the second half of each chunk is scored), got {n_ctx}")
    if chunks is not None and chunks < 1:
        raise InvalidParameterError(f"chunks must be >= 1 (or None for all), got {chunks}")
    if n_tokens < 2 * n_ctx:
        raise InvalidParameterError(
            f"the text tokenizes to only {n_tokens} tokens; perplexity with n_ctx={n_ctx} needs at least "
            f"{2 * n_ctx} (use a longer text or a smaller -c)"
        )
    n_chunk = n_tokens // n_ctx
    return n_chunk if chunks is None else min(chunks, n_chunk)


def chunk_inputs(tokens: np.ndarray, index: int, n_ctx: int, bos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The ids evaluated for chunk ``index`` (first one BOS when ``bos`` is given) and the scored targets."""
    start = index * n_ctx
    ids = tokens[start : start + n_ctx].copy()
    if bos is not None:
        ids[0] = bos
    first = n_ctx // 2
    return ids, tokens[start + first + 1 : start + n_ctx]


# ---------------------------------------------------------------------- kernels (compiled on first use)
@functools.cache
def _kernels() -> SimpleNamespace:
    import numba
    import numpy as np

    from . import kernels  # noqa: F401  # picks Numba's threading layer before the first parallel launch

    f32 = np.float32

    @numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
    def nll_rows(logits: Any, targets: Any, nll: Any) -> None:
        """nll[r] = -log softmax(logits[r])[targets[r]]; float32 exp, float64 sum (llama.cpp's log_softmax)."""
        m, nv = logits.shape
        for r in numba.prange(m):
            row = logits[r]
            mx = row[0]
            for i in range(1, nv):
                mx = max(mx, row[i])
            s = 0.0
            for i in range(nv):
                s += math.exp(row[i] - mx)
            nll[r] = mx + math.log(s) - row[targets[r]]

    @numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
    def nll_rows_q16(logits: Any, targets: Any, nll: Any, q16: Any, hdr: Any) -> None:
        """As nll_rows, and store each row's log-probs as llama.cpp's uint16 base-file row.

        q16 [m, nv16] uint16 and hdr [m, nv16 // 2] float32 view the same memory: hdr[r, 0] = scale,
        hdr[r, 1] = min_log_prob, then q16[r, 4 + i] = round((logit_i - min_logit) / scale).
        """
        m, nv = logits.shape
        width = q16.shape[1]
        for r in numba.prange(m):
            row = logits[r]
            mx = row[0]
            mn = row[0]
            for i in range(1, nv):
                mx = max(mx, row[i])
                mn = min(mn, row[i])
            mn = max(mn, mx - f32(LOG_PROB_RANGE))
            s = 0.0
            for i in range(nv):
                s += math.exp(row[i] - mx)
            lse = f32(math.log(s))
            scale = f32((mx - mn) / f32(65535.0))
            hdr[r, 0] = scale
            hdr[r, 1] = f32(mn - mx - lse)
            if scale > 0:
                inv = f32(1.0) / scale
                for i in range(nv):
                    v = row[i]
                    q = np.rint(inv * (v - mn)) if v > mn else f32(0.0)
                    q16[r, 4 + i] = np.uint16(min(q, f32(65535.0)))
            else:
                for i in range(nv):
                    q16[r, 4 + i] = 0
            for i in range(4 + nv, width):
                q16[r, i] = 0
            nll[r] = f32(mx + lse - row[targets[r]])

    @numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
    def kld_rows(
        logits: Any, targets: Any, q16: Any, hdr: Any, nll: Any, nll_base: Any, kld: Any, p_diff: Any, same: Any
    ) -> None:
        """Per row: NLL under both models, KL(base || model) over base log-probs > -16, Δp, same argmax."""
        m, nv = logits.shape
        for r in numba.prange(m):
            row = logits[r]
            mx = row[0]
            imax = 0
            for i in range(1, nv):
                if row[i] > mx:
                    mx = row[i]
                    imax = i
            s = 0.0
            for i in range(nv):
                s += math.exp(row[i] - mx)
            lse = f32(math.log(s))
            scale = hdr[r, 0]
            min_lp = hdr[r, 1]
            t = targets[r]
            nll_q = f32(mx + lse - row[t])
            nll_b = -(scale * f32(q16[r, 4 + t]) + min_lp)
            norm = f32(mx + lse)
            acc = 0.0
            best_b = scale * f32(q16[r, 4]) + min_lp
            imax_b = 0
            for i in range(nv):
                lpb = scale * f32(q16[r, 4 + i]) + min_lp
                if lpb > best_b:
                    best_b = lpb
                    imax_b = i
                if lpb > f32(-LOG_PROB_RANGE):
                    acc += math.exp(lpb) * (lpb - row[i] + norm)
            nll[r] = nll_q
            nll_base[r] = nll_b
            kld[r] = acc
            p_diff[r] = f32(math.exp(-nll_q)) - f32(math.exp(-nll_b))
            same[r] = imax == imax_b

    return SimpleNamespace(nll_rows=nll_rows, nll_rows_q16=nll_rows_q16, kld_rows=kld_rows)


# ---------------------------------------------------------------------- base file
def row_width(n_vocab: int) -> int:
    """uint16 entries per stored row: 4 for two float32 (scale, min_log_prob), the vocab rounded up to even."""
    return 2 * ((n_vocab + 1) // 2) + 4


def tokenizer_fingerprint(metadata: dict[str, Any]) -> str:
    """sha256 of the tokenizer's model, pre-tokenizer, BOS behaviour and token strings."""
    h = hashlib.sha256()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token"):
        h.update(f"{key}={metadata.get(key)!r}\0".encode())
    for t in metadata.get("tokenizer.ggml.tokens", []):
        h.update(t.encode("utf-8", "surrogatepass") if isinstance(t, str) else bytes(t))
        h.update(b"\0")
    return h.hexdigest()


def _text_bytes(text: str | bytes) -> bytes:
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


class BaseLogProbs:
    """A base file opened for reading: header, tokens, trailer and a read-only map of the rows."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import numpy as np

        self.path = Path(path)
        name = f"KL-divergence base file {str(self.path)!r}"
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(_HEADER.size)
                if len(head) < _HEADER.size or head[:8] != BASE_MAGIC:
                    raise InvalidParameterError(
                        f"{name} does not hold log-probabilities (expected the {BASE_MAGIC.decode()} header "
                        "written by `lmap perplexity --kl-divergence-base` or llama-perplexity)"
                    )
                _, n_ctx, n_vocab, n_chunk = _HEADER.unpack(head)
                if n_ctx < 3 or n_vocab < 1 or n_chunk < 1:
                    raise InvalidParameterError(
                        f"{name}: invalid header (n_ctx={n_ctx}, n_vocab={n_vocab}, n_chunk={n_chunk})"
                    )
                self.n_ctx, self.n_vocab, self.n_chunk = int(n_ctx), int(n_vocab), int(n_chunk)
                self.width = row_width(n_vocab)
                self.rows_per_chunk = scored_per_chunk(n_ctx)
                tok_bytes = 4 * n_ctx * n_chunk
                self._rows_offset = _HEADER.size + tok_bytes
                body = self._rows_offset + 2 * self.width * self.rows_per_chunk * n_chunk
                if size < body:
                    raise InvalidParameterError(
                        f"{name} is truncated: {size} bytes, its header ({n_chunk} chunks of {n_ctx}, "
                        f"vocab {n_vocab}) needs {body} (was the run that wrote it interrupted?)"
                    )
                self.tokens = np.frombuffer(f.read(tok_bytes), dtype="<i4").astype(np.int32)
                self.trailer: dict[str, Any] = {}
                if size >= body + 16:
                    f.seek(size - 16)
                    tail = f.read(16)
                    if tail[8:] == TRAILER_MAGIC:
                        (n,) = _TRAILER_LEN.unpack(tail[:8])
                        if n <= size - 16 - body:
                            f.seek(size - 16 - n)
                            self.trailer = json.loads(f.read(n).decode("utf-8"))
        except FileNotFoundError:
            raise InvalidParameterError(f"{name} does not exist") from None
        except (OSError, ValueError) as e:
            raise InvalidParameterError(f"{name} cannot be read ({e})") from None
        if self.tokens.size and (self.tokens.min() < 0 or self.tokens.max() >= self.n_vocab):
            raise InvalidParameterError(f"{name} holds token ids outside its vocabulary of {self.n_vocab}")
        self.rows = np.memmap(
            self.path,
            dtype=np.uint16,
            mode="r",
            offset=self._rows_offset,
            shape=(self.n_chunk, self.rows_per_chunk, self.width),
        )

    def check_compatible(
        self, *, n_vocab: int, tokenizer_sha256: str, n_ctx: int | None, text: bytes | None, tokens: np.ndarray | None
    ) -> None:
        """Refuse (InvalidParameterError naming the file) a base made with another vocab, tokenizer, n_ctx or text."""
        import numpy as np

        name = f"KL-divergence base file {str(self.path)!r}"
        if self.n_vocab != n_vocab:
            raise InvalidParameterError(
                f"{name} was made with a vocabulary of {self.n_vocab} tokens, this model has {n_vocab}"
            )
        fp = self.trailer.get("tokenizer_sha256")
        if fp is not None and fp != tokenizer_sha256:
            raise InvalidParameterError(
                f"{name} was made with a different tokenizer (model {self.trailer.get('model', '?')}); "
                "KL divergence needs the same tokenizer"
            )
        if n_ctx is not None and n_ctx != self.n_ctx:
            raise InvalidParameterError(f"{name} was made with n_ctx={self.n_ctx}, this run asks for -c {n_ctx}")
        th = self.trailer.get("text_sha256")
        if text is not None and th is not None and hashlib.sha256(text).hexdigest() != th:
            raise InvalidParameterError(f"{name} was made from a different text (sha256 {th[:12]}...)")
        if tokens is not None:
            n = self.tokens.size
            mine = tokens[:n]
            if mine.size < n or not np.array_equal(mine, self.tokens):
                diff = np.nonzero(mine != self.tokens[: mine.size])[0]
                at = int(diff[0]) if diff.size else mine.size
                raise InvalidParameterError(
                    f"{name} was made from a different text or tokenizer: its tokens differ from this text's "
                    f"at token {at} of {n}"
                )

    def close(self) -> None:
        mm = getattr(self.rows, "_mmap", None)
        self.rows = None  # type: ignore[assignment]
        if mm is not None:
            mm.close()


class _BaseWriter:
    """Writes a base file as chunks are scored; the file appears under its name only when complete."""

    def __init__(self, path: str | os.PathLike[str], n_ctx: int, n_vocab: int, n_chunk: int, tokens: np.ndarray):
        import numpy as np

        self.path = Path(path)
        self._tmp = self.path.with_name(self.path.name + ".partial")
        try:
            self._f = open(self._tmp, "wb")  # noqa: SIM115  # closed in finish()/abort()
            self._f.write(_HEADER.pack(BASE_MAGIC, n_ctx, n_vocab, n_chunk))
            self._f.write(np.ascontiguousarray(tokens[: n_ctx * n_chunk], dtype="<i4").tobytes())
        except OSError as e:
            raise InvalidParameterError(f"--kl-divergence-base {str(self.path)!r}: cannot write ({e})") from None

    def write(self, rows: np.ndarray) -> None:
        try:
            rows.tofile(self._f)
        except OSError as e:
            self.abort()
            raise InvalidParameterError(f"--kl-divergence-base {str(self.path)!r}: cannot write ({e})") from None

    def finish(self, trailer: dict[str, Any]) -> None:
        blob = json.dumps(trailer, sort_keys=True).encode("utf-8")
        try:
            self._f.write(blob + _TRAILER_LEN.pack(len(blob)) + TRAILER_MAGIC)
            self._f.close()
            os.replace(self._tmp, self.path)
        except OSError as e:
            self.abort()
            raise InvalidParameterError(f"--kl-divergence-base {str(self.path)!r}: cannot write ({e})") from None

    def abort(self) -> None:
        self._f.close()
        self._tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------- evaluation
class ChunkEvaluator:
    """Evaluates one chunk from an empty KV cache and yields the logits of the scored positions in blocks.

    With a :class:`Llama` built without ``logits_all`` (the default here) only the scored rows go through
    the output projection: after each forward pass the model's scratch still holds every position's final
    hidden state, so the output norm and matrix run on rows ``first .. n_ctx-2`` alone, in blocks of at most
    ``LOGITS_BLOCK_BYTES``. That skips half the output matrix products (about a third of gemma3-270m's
    compute, whose 262144 x 640 output matrix dominates) and the n_ctx x n_vocab copy into ``Llama.scores``.
    The first forward pass checks that path against the model's own logits of its last position.
    A ``Llama`` made with ``logits_all=True`` is read through its public ``scores`` instead.
    """

    def __init__(self, llm: Llama, n_ctx: int, n_batch: int) -> None:
        import numpy as np

        from .models.base import Model

        self.llm = llm
        self.n_ctx = n_ctx
        self.n_batch = max(1, min(n_batch, llm.n_batch, n_ctx))
        self.first = n_ctx // 2
        n_vocab = llm.n_vocab()
        model = getattr(llm, "_model", None)
        self.direct = (
            not getattr(llm, "_logits_all", True)
            and model is not None
            and type(model).logits is Model.logits
            and hasattr(llm, "_scratch")
        )
        if not self.direct and not getattr(llm, "_logits_all", False):
            raise InvalidParameterError(
                f"{llm!r}: this architecture's logits cannot be read row by row; build the Llama with logits_all=True"
            )
        rows = scored_per_chunk(n_ctx)
        self.block_rows = max(1, min(rows, self.n_batch, LOGITS_BLOCK_BYTES // (4 * n_vocab)))
        self._buf = np.zeros((self.block_rows, n_vocab), np.float32) if self.direct else None
        self._verified = not self.direct

    def _project(self, r0: int, r1: int, out: np.ndarray) -> None:
        """Final norm + output matrix for rows r0..r1 of the last forward pass (Model.logits on a row range)."""
        import numpy as np

        from .kernels import ops

        llm = self.llm
        model, s = llm._model, llm._scratch
        hp = model.hp
        m = r1 - r0
        xb = s.xb[:m]
        ops.rmsnorm(s.x[r0:r1], model.output_norm, hp.rms_eps, xb)
        model.output.matmul(xb, out, s.tile, s.xq)
        if hp.final_softcap:
            np.tanh(out / hp.final_softcap, out=out)
            out *= hp.final_softcap

    def _verify(self, n: int) -> None:
        import numpy as np

        r0 = max(0, n - 2)  # two rows, so the batched matmul path is the one checked
        out = np.zeros((n - r0, self.llm.n_vocab()), np.float32)
        self._project(r0, n, out)
        ref = self.llm.last_logits
        err = float(np.max(np.abs(out[-1] - ref)))
        if not err <= 1e-2 * max(1.0, float(np.max(np.abs(ref)))):
            raise LmapError(
                f"internal: output rows recomputed from the model's scratch differ from its logits by {err:g}; "
                "pass a Llama built with logits_all=True to perplexity()"
            )
        self._verified = True

    def __call__(self, ids: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (offset of the block among the scored rows, logits [rows, n_vocab]) for chunk ``ids``."""
        llm, n_ctx, first = self.llm, self.n_ctx, self.first
        last = n_ctx - 1  # logits at position n_ctx - 1 predict past the chunk: not scored
        llm.reset()
        for b0 in range(0, n_ctx, self.n_batch):
            b1 = min(b0 + self.n_batch, n_ctx)
            llm.eval(ids[b0:b1])  # <= llm.n_batch tokens: exactly one forward pass
            lo, hi = max(b0, first), min(b1, last)
            if lo >= hi:
                continue
            if not self.direct:
                yield lo - first, llm.scores[lo:hi]
                continue
            if not self._verified:
                self._verify(b1 - b0)
            assert self._buf is not None
            for r0 in range(lo, hi, self.block_rows):
                r1 = min(r0 + self.block_rows, hi)
                out = self._buf[: r1 - r0]
                self._project(r0 - b0, r1 - b0, out)
                yield r0 - first, out


class _Accumulator:
    """Running sums over scored positions, in float64, and the per-position KL values for percentiles."""

    def __init__(self, rows_total: int, kl: bool) -> None:
        import numpy as np

        self.count = 0
        self.sum_nll = self.sum_nll2 = 0.0
        self.kl = kl
        if kl:
            self.sum_base = self.sum_base2 = self.sum_cross = 0.0
            self.sum_kld = self.sum_kld2 = 0.0
            self.sum_dp = self.sum_dp2 = self.sum_dp4 = 0.0
            self.n_same = 0
            self.kld_values = np.zeros(rows_total, np.float32)
            self.dp_values = np.zeros(rows_total, np.float32)

    def add(self, nll: np.ndarray) -> None:
        self.sum_nll += float(nll.sum())
        self.sum_nll2 += float((nll * nll).sum())
        self.count += nll.size

    def add_kl(self, nll: np.ndarray, base: np.ndarray, kld: np.ndarray, dp: np.ndarray, same: np.ndarray) -> None:
        i = self.count
        self.add(nll)
        self.sum_base += float(base.sum())
        self.sum_base2 += float((base * base).sum())
        self.sum_cross += float((nll * base).sum())
        self.sum_kld += float(kld.sum())
        self.sum_kld2 += float((kld * kld).sum())
        dp2 = dp * dp
        self.sum_dp += float(dp.sum())
        self.sum_dp2 += float(dp2.sum())
        self.sum_dp4 += float((dp2 * dp2).sum())
        self.n_same += int(same.sum())
        self.kld_values[i : i + kld.size] = kld
        self.dp_values[i : i + dp.size] = dp

    def ppl(self) -> tuple[float, float]:
        return ppl_from_sums(self.sum_nll, self.sum_nll2, self.count)

    def kl_result(self, *, full: bool) -> KLDivergenceResult:
        import numpy as np

        n = self.count
        lq, lq_err = mean_and_uncertainty(self.sum_nll, self.sum_nll2, n)
        lb, lb_err = mean_and_uncertainty(self.sum_base, self.sum_base2, n)
        cov = _covariance(self.sum_nll, self.sum_base, self.sum_cross, n)
        kl, kl_err = mean_and_uncertainty(self.sum_kld, self.sum_kld2, n)
        dp, dp_err = mean_and_uncertainty(self.sum_dp, self.sum_dp2, n)
        mse, mse_err = mean_and_uncertainty(self.sum_dp2, self.sum_dp4, n)
        rms = math.sqrt(mse)
        same = self.n_same / n
        kl_pct: dict[str, float] = {}
        dp_pct: dict[str, float] = {}
        if full:
            kl_pct = _pct_table(np.sort(self.kld_values[:n]))
            dp_pct = _pct_table(np.sort(self.dp_values[:n]))
        den = lq_err * lb_err
        return KLDivergenceResult(
            ppl_base=math.exp(lb),
            ppl_base_err=math.exp(lb) * lb_err,
            ln_ppl_ratio=lq - lb,
            ln_ppl_ratio_err=math.sqrt(max(0.0, lq_err**2 + lb_err**2 - 2 * cov)),
            ppl_correlation=cov / den if den > 0 else math.nan,
            kld_mean=kl,
            kld_err=kl_err,
            kld_percentiles=kl_pct,
            dp_mean=dp,
            dp_err=dp_err,
            dp_rms=rms,
            dp_rms_err=0.5 / rms * mse_err if rms > 0 else 0.0,
            dp_percentiles=dp_pct,
            same_top=same,
            same_top_err=math.sqrt(same * (1 - same) / (n - 1)) if n > 1 else 0.0,
        )


def load_text(path: str | os.PathLike[str]) -> bytes:
    """A text file as llama.cpp's ``-f`` reads it: raw bytes with one trailing newline removed."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InvalidParameterError(f"-f {str(path)!r}: no such file") from None
    except OSError as e:
        raise InvalidParameterError(f"-f {str(path)!r}: cannot read ({e})") from None
    return data[:-1] if data.endswith(b"\n") else data


def _open_model(
    model: Llama | str | os.PathLike[str] | None, n_ctx: int, n_batch: int, n_threads: int | None, use_mmap: bool
) -> Llama:
    from .llama import Llama

    if isinstance(model, Llama):
        llm = model
    else:
        llm = Llama(
            model, n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_threads=n_threads, use_mmap=use_mmap, verbose=False
        )
    if llm.n_ctx() < n_ctx:
        train = llm._model.hp.n_ctx_train if hasattr(llm, "_model") else llm.n_ctx()
        raise ContextOverflowError(
            f"n_ctx={n_ctx} is more than {Path(llm.model_path).name} holds (context {llm.n_ctx()}, "
            f"trained on {train}); use a smaller -c"
        )
    if llm.tokenizer_.add_eos:
        raise UnsupportedModelError(
            f"{llm.model_path}: the tokenizer appends EOS to every text; llama-perplexity refuses such models too"
        )
    return llm


def perplexity(
    model: Llama | str | os.PathLike[str] | None,
    text: str | bytes | None = None,
    *,
    n_ctx: int | None = None,
    n_batch: int = 512,
    chunks: int | None = None,
    n_threads: int | None = None,
    use_mmap: bool = True,
    save_base: str | os.PathLike[str] | None = None,
    kl_base: str | os.PathLike[str] | None = None,
    on_chunk: Callable[[PerplexityResult], None] | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text``, computed exactly as llama-perplexity does.

    ``model`` is a path, a model name or an open :class:`~lmap.Llama` (reused as is; its n_ctx must
    hold ``n_ctx``). ``text`` is tokenized with BOS as llama.cpp does (pass :func:`load_text`'s bytes for
    llama.cpp's ``-f`` behaviour). ``n_ctx`` defaults to 512, or to the base file's in KL mode.

    ``save_base=FILE`` also writes the model's log-probabilities at every scored position to FILE (see the
    module docstring for the format; llama-perplexity reads it too). ``kl_base=FILE`` compares the model
    with such a file instead and fills ``result.kld``; the tokens come from the file, and ``text``, if
    given, must be the one the file was made from. ``on_chunk`` gets the running result after each chunk.

    For a table over quantizations::

        base = perplexity("f16.gguf", text, chunks=20, save_base="base.kld")
        for q in ("q8_0.gguf", "q4_k_m.gguf"):
            r = perplexity(q, text, kl_base="base.kld")
            print(q, r.ppl, r.kld.kld_mean, r.kld.same_top)
    """
    import numpy as np

    if save_base is not None and kl_base is not None:
        raise InvalidParameterError("save_base and kl_base are exclusive: write a base file or compare with one")
    if n_batch < 1:
        raise InvalidParameterError(f"n_batch must be >= 1, got {n_batch}")
    if chunks is not None and chunks < 1:
        raise InvalidParameterError(f"chunks must be >= 1 (or None for all), got {chunks}")
    if n_ctx is not None and n_ctx < 3:
        raise InvalidParameterError(f"n_ctx must be >= 3 (the second half of each chunk is scored), got {n_ctx}")
    if text is None and kl_base is None:
        raise InvalidParameterError("perplexity needs a text (or a KL-divergence base file that holds one)")
    raw = None if text is None else _text_bytes(text)
    base = BaseLogProbs(kl_base) if kl_base is not None else None
    try:
        ctx = n_ctx if n_ctx is not None else (base.n_ctx if base is not None else DEFAULT_N_CTX)
        if base is not None and n_ctx is not None and n_ctx != base.n_ctx:
            raise InvalidParameterError(
                f"KL-divergence base file {str(base.path)!r} was made with n_ctx={base.n_ctx}, "
                f"this run asks for -c {n_ctx}"
            )
        llm = _open_model(model, ctx, n_batch, n_threads, use_mmap)
        return _run(llm, raw, ctx, n_batch, chunks, base, save_base, on_chunk, np)
    finally:
        if base is not None:
            base.close()


def _run(
    llm: Llama,
    raw: bytes | None,
    n_ctx: int,
    n_batch: int,
    chunks: int | None,
    base: BaseLogProbs | None,
    save_base: str | os.PathLike[str] | None,
    on_chunk: Callable[[PerplexityResult], None] | None,
    np: Any,
) -> PerplexityResult:
    k = _kernels()
    n_vocab = llm.n_vocab()
    fingerprint = tokenizer_fingerprint(llm.metadata)
    tokens = None if raw is None else np.asarray(llm.tokenize(raw, add_bos=True, special=False), dtype=np.int32)
    if base is not None:
        base.check_compatible(n_vocab=n_vocab, tokenizer_sha256=fingerprint, n_ctx=n_ctx, text=raw, tokens=tokens)
        tokens = base.tokens
        n_chunk = base.n_chunk if chunks is None else min(chunks, base.n_chunk)
    else:
        assert tokens is not None
        n_chunk = plan_chunks(tokens.size, n_ctx, chunks)
    bos = llm.token_bos() if llm.tokenizer_.add_bos else None
    if bos is not None and bos < 0:
        raise UnsupportedModelError(f"{llm.model_path}: the tokenizer adds BOS but has no BOS id")
    rows = scored_per_chunk(n_ctx)
    evaluator = ChunkEvaluator(llm, n_ctx, n_batch)
    acc = _Accumulator(rows * n_chunk, kl=base is not None)
    nll = np.zeros(rows, np.float64)
    writer = None
    q16 = None
    if save_base is not None:
        writer = _BaseWriter(save_base, n_ctx, n_vocab, n_chunk, tokens)
        q16 = np.zeros((rows, row_width(n_vocab)), np.uint16)
    if base is not None:
        nll_b = np.zeros(rows, np.float64)
        kld = np.zeros(rows, np.float64)
        dp = np.zeros(rows, np.float64)
        same = np.zeros(rows, np.bool_)
    name = Path(llm.model_path).name
    result = PerplexityResult(name, n_ctx, evaluator.n_batch, int(tokens.size), n_chunk, 0, math.nan, math.nan, 0.0)
    t0 = time.perf_counter()
    try:
        for c in range(n_chunk):
            ids, targets = chunk_inputs(tokens, c, n_ctx, bos)
            for off, logits in evaluator(ids):
                m = logits.shape[0]
                tg = targets[off : off + m]
                if base is not None:
                    q = np.asarray(base.rows[c, off : off + m])
                    k.kld_rows(
                        logits, tg, q, q.view(np.float32), nll[off : off + m], nll_b[off : off + m],
                        kld[off : off + m], dp[off : off + m], same[off : off + m],
                    )  # fmt: skip
                elif q16 is not None:
                    qb = q16[off : off + m]
                    k.nll_rows_q16(logits, tg, nll[off : off + m], qb, qb.view(np.float32))
                else:
                    k.nll_rows(logits, tg, nll[off : off + m])
            if not np.all(np.isfinite(nll)):
                raise LmapError(f"{name}: non-finite logits in chunk {c + 1} (tokens {c * n_ctx}..{(c + 1) * n_ctx})")
            if base is not None:
                acc.add_kl(nll, nll_b, kld, dp, same)
            else:
                acc.add(nll)
            if writer is not None:
                assert q16 is not None
                writer.write(q16)
            result.running.append(math.exp(acc.sum_nll / acc.count))
            result.n_scored = acc.count
            result.seconds = time.perf_counter() - t0
            result.nll = acc.sum_nll / acc.count
            result.ppl, result.ppl_err = acc.ppl()
            if base is not None:
                result.kld = acc.kl_result(full=c == n_chunk - 1)
            if on_chunk is not None:
                on_chunk(result)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.finish(
            {
                "format": "llama.cpp kl-divergence-base + lmap trailer",
                "model": name,
                "tokenizer_sha256": fingerprint,
                "text_sha256": hashlib.sha256(raw).hexdigest() if raw is not None else None,
                "n_ctx": n_ctx,
                "n_chunk": n_chunk,
                "ppl": result.ppl,
                "ppl_err": result.ppl_err,
            }
        )
    llm.reset()
    return result


# ---------------------------------------------------------------------- CLI
def format_kl_row(index: int, r: PerplexityResult) -> str:
    """One row of llama-perplexity's per-chunk KL table."""
    k = r.kld
    assert k is not None
    return (
        f"{index:4d}    {r.ppl:9.4f} ± {r.ppl * _kl_ln_err(r):9.4f}"
        f"    {k.ln_ppl_ratio:10.5f} ± {k.ln_ppl_ratio_err:10.5f}"
        f"    {k.kld_mean:10.5f} ± {k.kld_err:10.5f}    {100 * k.dp_rms:6.3f} ± {100 * k.dp_rms_err:6.3f} %"
        f"    {100 * k.same_top:6.3f} ± {100 * k.same_top_err:6.3f} %"
    )


def _kl_ln_err(r: PerplexityResult) -> float:
    # KL mode reports the PPL error with the count > 10 rule of mean_and_uncertainty, as llama.cpp does
    if r.n_scored <= 10 or not math.isfinite(r.ppl_err):
        return 0.0
    return r.ppl_err / r.ppl


def format_kl_summary(r: PerplexityResult) -> list[str]:
    """llama-perplexity's closing statistics for a KL-divergence run."""
    k = r.kld
    assert k is not None
    ln_err = _kl_ln_err(r)
    ppl_unc = r.ppl * ln_err
    cov = k.ppl_correlation * ln_err * (k.ppl_base_err / k.ppl_base) if k.ppl_base > 0 else 0.0
    cov = cov if math.isfinite(cov) else 0.0
    ratio = math.exp(k.ln_ppl_ratio)
    diff_unc = math.sqrt(max(0.0, ppl_unc**2 + k.ppl_base_err**2 - 2 * r.ppl * k.ppl_base * cov))
    lines = [
        "====== Perplexity statistics ======",
        f"Mean PPL(Q)                   : {r.ppl:10.6f} ± {ppl_unc:10.6f}",
        f"Mean PPL(base)                : {k.ppl_base:10.6f} ± {k.ppl_base_err:10.6f}",
        f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * k.ppl_correlation:6.2f}%",
        f"Mean ln(PPL(Q)/PPL(base))     : {k.ln_ppl_ratio:10.6f} ± {k.ln_ppl_ratio_err:10.6f}",
        f"Mean PPL(Q)/PPL(base)         : {ratio:10.6f} ± {ratio * k.ln_ppl_ratio_err:10.6f}",
        f"Mean PPL(Q)-PPL(base)         : {r.ppl - k.ppl_base:10.6f} ± {diff_unc:10.6f}",
        "",
        "====== KL divergence statistics ======",
        f"Mean    KLD: {k.kld_mean:10.6f} ± {k.kld_err:10.6f}",
    ]
    labels = {"max": "Maximum", "median": "Median ", "min": "Minimum"}
    for key, v in k.kld_percentiles.items():
        lines.append(f"{labels.get(key, f'{float(key):4.1f}%  ')} KLD: {v:10.6f}")
    lines += ["", "====== Token probability statistics ======"]
    lines.append(f"Mean    Δp: {100 * k.dp_mean:6.3f} ± {100 * k.dp_err:5.3f} %")
    for key, v in k.dp_percentiles.items():
        lines.append(f"{labels.get(key, f'{float(key):4.1f}%  ')} Δp: {100 * v:6.3f}%")
    lines.append(f"RMS Δp    : {100 * k.dp_rms:6.3f} ± {100 * k.dp_rms_err:5.3f} %")
    lines.append(f"Same top p: {100 * k.same_top:6.3f} ± {100 * k.same_top_err:5.3f} %")
    return lines


def cmd_perplexity(args: argparse.Namespace) -> int:
    if args.kl_divergence and not args.kl_divergence_base:
        raise InvalidParameterError("--kl-divergence needs --kl-divergence-base FILE (the base model's log-probs)")
    if args.file is None and not args.kl_divergence:
        raise InvalidParameterError("-f FILE is required: the text to measure perplexity on")
    if args.threads is not None and args.threads < 1:
        raise InvalidParameterError(f"--threads must be >= 1, got {args.threads}")
    text = load_text(args.file) if args.file is not None else None
    kl = bool(args.kl_divergence)
    out = sys.stdout
    err = sys.stderr

    def on_chunk(r: PerplexityResult) -> None:
        i = len(r.running)
        if i == 1:
            eta = r.seconds * r.n_chunks
            print(
                f"perplexity: {r.n_tokens} tokens, {r.n_chunks} chunks, n_ctx={r.n_ctx}, batch_size={r.n_batch}; "
                f"{r.seconds:.2f} seconds per pass - ETA {eta / 60:.2f} minutes",
                file=err,
                flush=True,
            )
            if kl:
                out.write(
                    "\nchunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence"
                    "              Δp RMS            Same top p\n"
                )
        if kl:
            out.write(format_kl_row(i, r) + "\n")
        else:
            out.write(f"[{i}]{r.running[-1]:.4f},")
        out.flush()

    res = perplexity(
        args.model,
        text,
        n_ctx=args.ctx_size,
        n_batch=args.batch_size,
        chunks=args.chunks,
        n_threads=args.threads,
        use_mmap=not args.no_mmap,
        save_base=None if kl else args.kl_divergence_base,
        kl_base=args.kl_divergence_base if kl else None,
        on_chunk=on_chunk,
    )
    out.write("\n")
    if kl:
        if res.n_scored >= 100:  # llama.cpp does no statistics on fewer values
            out.write("\n".join(format_kl_summary(res)) + "\n")
    else:
        if math.isfinite(res.ppl_err):
            out.write(f"Final estimate: PPL = {res.ppl:.4f} +/- {res.ppl_err:.5f}\n")
        else:
            out.write(f"Final estimate: PPL = {res.ppl:.4f} (no error estimate: the NLLs have no spread)\n")
    if args.kl_divergence_base and not kl:
        print(f"perplexity: saved log-probs of {res.n_scored} positions to {args.kl_divergence_base}", file=err)
    print(
        f"perplexity: {res.n_chunks * res.n_ctx} tokens evaluated in {res.seconds:.1f} s "
        f"({res.tokens_per_second:.1f} tok/s)",
        file=err,
    )
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(res.to_json(), indent=1) + "\n")
        except OSError as e:
            raise InvalidParameterError(f"--json {args.json!r}: cannot write ({e})") from None
    return 0


def add_perplexity_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``lmap perplexity`` on the CLI's subparsers (argparse only: nothing heavy is imported here)."""
    p: argparse.ArgumentParser = sub.add_parser(
        "perplexity",
        help="llama-perplexity's chunked perplexity (and KL divergence against a base model's saved log-probs)",
        description="Perplexity of a model on a text, computed as llama-perplexity does: chunks of -c tokens, "
        "each from an empty cache, the second half of each scored.",
    )
    p.add_argument("-m", "--model", default=None, help="path to a .gguf file or a model name (default smollm2-135m)")
    p.add_argument("-f", "--file", default=None, help="the text (UTF-8; one trailing newline is dropped, as llama.cpp)")
    p.add_argument(
        "-c",
        "--ctx-size",
        type=int,
        default=None,
        help=f"tokens per chunk (default {DEFAULT_N_CTX}; with --kl-divergence, the base file's)",
    )
    p.add_argument("-b", "--batch-size", type=int, default=512, help="tokens per forward pass (default 512)")
    p.add_argument("-t", "--threads", type=int, default=None, help="threads (default: all cores)")
    p.add_argument("--chunks", type=int, default=None, help="evaluate at most N chunks (default: the whole text)")
    p.add_argument(
        "--kl-divergence-base",
        metavar="FILE",
        default=None,
        help="without --kl-divergence: save the model's log-probs here (llama.cpp's format, 25 MB per chunk for a "
        "49152-token vocabulary); with it: the base model's log-probs to compare with",
    )
    p.add_argument(
        "--kl-divergence",
        action="store_true",
        help="compare with --kl-divergence-base: KL divergence, Δp, same top token, both PPLs",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="also write the result as JSON to FILE")
    p.add_argument("--no-mmap", action="store_true", help="read the model into memory instead of mapping it")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_perplexity)
    return p
