"""What every architecture shares: hparams from GGUF keys, weights by GGUF name, scratch buffers.

An architecture module (``llama.py``, ``gemma3.py``) is a short forward pass over
these pieces; the differences between architectures are data in ``HParams`` plus
the few lines of its own ``forward``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numba
import numpy as np

from .. import arena
from ..errors import GGUFError, UnsupportedModelError
from ..gguf import GGUFFile
from ..kernels import ops
from ..kernels.attention import AttentionScratch, attention_batch
from ..kernels.multivec import RowActs, attention_spans, matmul_rows, matmuls, on_team
from ..kv_cache import KVCache
from ..quants import ActScratch, QMatrix, panels
from ..residency import NO_RESIDENCY, NoResidency
from ..threads import blas_single

# Batches of at least this many queries attend through BLAS products; below it the per-query
# kernel wins (smollm2 head shapes, 512 cached cells: 8 queries 1.9 ms per-query vs 0.5 ms batched;
# 4 queries about even).
BATCH_ATTENTION = 8

# Prompt chunks of at most this many tokens take the decode path (int8 products on the team,
# each weight block rebuilt once per 4 tokens) instead of dequantized tiles and BLAS, whose
# dequantization of every matrix does not pay for few tokens. SmolLM2, 2 threads, a layer
# stack's Q/K/V/gate/up: 8 tokens 15 vs 77 ms, 64 tokens 132 vs 146 ms, 96 tokens 176 vs 193 ms.
TEAM_ROWS = 64
# Prompt batches of more rows than this take the integer panel GEMM where every matrix can:
# packing a panel costs the same for any row count, and at 16 rows it already matches the
# team's row kernels (SmolLM2, 2 threads: 26.9 vs 25.7 ms a forward; 49 rows: 33 vs 71 ms).
PANEL_ROWS = 16

# One token's attention goes to the team (its heads shared by the threads) when cached cells x
# query heads reaches this; below, a team job's hand-off costs about what it saves (SmolLM2, one
# layer, 2 threads: 64 cells 6.0 us serial vs 5.2 us team, 256 cells 19.8 vs 12.7, 1536 cells
# 100 vs 80).
TEAM_ATTENTION_WORK = 2048

# which sequences a batch's rows belong to (see Model.forward)
Seq = int | np.ndarray | None

# field -> (GGUF key with {arch} placeholder, required)
HPARAM_KEYS: dict[str, tuple[str, bool]] = {
    "n_ctx_train": ("{arch}.context_length", True),
    "n_embd": ("{arch}.embedding_length", True),
    "n_layer": ("{arch}.block_count", True),
    "n_ff": ("{arch}.feed_forward_length", True),
    "n_head": ("{arch}.attention.head_count", True),
    "n_head_kv": ("{arch}.attention.head_count_kv", False),
    "head_dim_k": ("{arch}.attention.key_length", False),
    "head_dim_v": ("{arch}.attention.value_length", False),
    "rms_eps": ("{arch}.attention.layer_norm_rms_epsilon", False),
    "rope_freq_base": ("{arch}.rope.freq_base", False),
    "rope_scaling_factor": ("{arch}.rope.scaling.factor", False),
    "rope_freq_base_swa": ("{arch}.rope.freq_base_swa", False),
    "n_rot": ("{arch}.rope.dimension_count", False),
    "n_vocab": ("{arch}.vocab_size", False),
    "sliding_window": ("{arch}.attention.sliding_window", False),
    "attn_softcap": ("{arch}.attn_logit_softcapping", False),
    "final_softcap": ("{arch}.final_logit_softcapping", False),
}


@dataclass
class HParams:
    arch: str
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int = 0
    head_dim_k: int = 0
    head_dim_v: int = 0
    rms_eps: float = 1e-5
    rope_freq_base: float = 10000.0
    rope_scaling_factor: float = 0.0
    rope_freq_base_swa: float = 10000.0  # sliding-window layers' rope base (llama.cpp's default)
    n_rot: int = 0
    n_vocab: int = 0
    sliding_window: int = 0
    attn_softcap: float = 0.0
    final_softcap: float = 0.0

    @classmethod
    def from_gguf(cls, g: GGUFFile) -> HParams:
        arch = g.architecture
        values: dict[str, object] = {"arch": arch}
        types = {f.name: f.type for f in fields(cls)}
        for name, (key_t, required) in HPARAM_KEYS.items():
            key = key_t.format(arch=arch)
            if key not in g.metadata:
                if required:
                    raise GGUFError(f"{g.path}: missing metadata key {key!r} needed by the {arch} architecture")
                continue
            v = g.metadata[key]
            if isinstance(v, np.ndarray):
                if v.size and np.all(v == v.flat[0]):
                    v = v.flat[0].item()  # per-layer array with one value
                else:
                    raise UnsupportedModelError(f"{g.path}: per-layer values in {key!r} are not supported yet")
            want = int if types[name] in ("int", int) else float
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise GGUFError(f"{g.path}: metadata key {key!r} should be a number, got {type(v).__name__}")
            values[name] = want(v)
        hp = cls(**values)  # type: ignore[arg-type]
        hp.n_head_kv = hp.n_head_kv or hp.n_head
        hp.head_dim_k = hp.head_dim_k or hp.n_embd // hp.n_head
        hp.head_dim_v = hp.head_dim_v or hp.head_dim_k
        hp.n_rot = hp.n_rot or hp.head_dim_k
        if not hp.n_vocab:
            tokens = g.metadata.get("tokenizer.ggml.tokens")
            hp.n_vocab = len(tokens) if tokens is not None else g.tensors["token_embd.weight"].shape[1]
        if hp.n_head % hp.n_head_kv:
            raise GGUFError(f"{g.path}: head_count {hp.n_head} is not a multiple of head_count_kv {hp.n_head_kv}")
        return hp

    @property
    def rope_freq_scale(self) -> float:
        return 1.0 / self.rope_scaling_factor if self.rope_scaling_factor else 1.0


class Weights:
    """Tensors of a GGUF file by GGUF name: matrices as :class:`QMatrix`, vectors as float32 views."""

    def __init__(self, g: GGUFFile) -> None:
        self.g = g

    def has(self, name: str) -> bool:
        return name in self.g.tensors

    def matrix(self, name: str) -> QMatrix:
        if name not in self.g.tensors:
            raise GGUFError(f"{self.g.path}: missing tensor {name!r}")
        return QMatrix(self.g.tensors[name], self.g.tensor(name))

    def vector(self, name: str) -> np.ndarray:
        if name not in self.g.tensors:
            raise GGUFError(f"{self.g.path}: missing tensor {name!r}")
        info = self.g.tensors[name]
        data = self.g.tensor(name).reshape(-1)
        if info.format.name == "F32":
            return data
        if info.format.name == "F16":
            return data.astype(np.float32)  # norms are tiny: one copy at load
        raise UnsupportedModelError(f"{self.g.path}: tensor {name!r} is {info.format.name}; vectors must be F32 or F16")


class Scratch:
    """Every activation buffer of a forward pass, allocated once for (n_batch, n_ctx).

    Shapes (B = n_batch): x, xb, xb2 [B, d]; q [B, H, hdk]; k [B, Hkv, hdk]; v [B, Hkv, hdv];
    att [B, H, hdv]; hb, hb2 [B, ff] (q to att and the prefill attention scratch share one arena
    with hb2 and hb, and xb2 overlays q and hb2 where it fits: lmap.arena); tile [T, max_cols]
    for prefill dequantization; xq [B, max_cols]; scores [threads, n_ctx] for attention; cos/sin
    [B, n_rot/2]; logits [B or 1, vocab]; spans [B, 2] and acts (n_seq activation rows) for
    batches with one row per sequence.
    """

    TILE_ELEMENTS = 1 << 20  # 4 MiB of float32 rows at least: enough for BLAS to run at speed
    # A whole layer matrix in one tile, where it fits under this: one product per matrix, not a
    # full tile and a thin remainder (gemma3's 2048 x 640 FFN matrices at 2 threads: 3.7 ms as
    # one sgemm, 4.4 ms as tiles of 1638 + 410 rows).
    TILE_MAX = 1 << 22

    @classmethod
    def tile_elements(cls, hp: HParams) -> int:
        """float32 elements of the prefill weight tile for a model of these hparams."""
        largest = hp.n_embd * max(hp.n_ff, hp.n_head * hp.head_dim_k, hp.n_head * hp.head_dim_v)
        return max(cls.TILE_ELEMENTS, min(largest, cls.TILE_MAX))

    def __init__(
        self,
        hp: HParams,
        n_batch: int,
        n_ctx: int,
        logits_rows: int,
        activations: str = "q8",
        n_seq: int = 1,
        tile: bool = True,
    ) -> None:
        B = n_batch
        d, H, Hkv = hp.n_embd, hp.n_head, hp.n_head_kv
        self.x = np.zeros((B, d), np.float32)
        self.xb = np.zeros((B, d), np.float32)
        # One arena for what attention uses and what the FFN uses: never live at the same time
        # (the attention's last reader, the output projection, runs before the FFN's first writer)
        attn, ffn = self.arena_shapes(hp, B, n_ctx)
        self.arena = np.zeros(max(arena.floats(attn), arena.floats(ffn)), np.float32)
        self.q, self.k, self.v, self.att, *attn_work = arena.carve(self.arena, attn)
        self.hb2, self.hb = arena.carve(self.arena, ffn)
        # xb2, the output of the attention and FFN down projections, is written when q (attention
        # done) and hb2 (folded into hb by the gated activation) are dead: where it fits, the two
        # arena regions at offset 0 hold it
        self.xb2 = self.arena[: B * d].reshape(B, d) if self.xb2_in_arena(hp) else np.zeros((B, d), np.float32)
        max_cols = max(d, hp.n_ff, H * hp.head_dim_v)
        # one row where no prompt product dequantizes weights (see needs_tile): a path that still
        # did would run, a row at a time, rather than fail
        self.tile = np.zeros(max(self.tile_elements(hp), max_cols) if tile else max_cols, np.float32)
        # xq [B * max_cols]: activations rounded as llama.cpp rounds them; None = exact float32 products
        self.xq = ActScratch(B, max_cols, None if tile else 0) if activations == "q8" else None
        self.scores = np.zeros((numba.config.NUMBA_NUM_THREADS, n_ctx), np.float32)
        self.cos = np.zeros((B, hp.n_rot // 2), np.float32)
        self.sin = np.zeros((B, hp.n_rot // 2), np.float32)
        self.cos2 = np.zeros((B, hp.n_rot // 2), np.float32)  # second rope base (gemma3 local layers)
        self.sin2 = np.zeros((B, hp.n_rot // 2), np.float32)
        self.cells = np.zeros(B, np.int32)  # KV cells of this batch in full-attention layers
        self.cells_swa = np.zeros(B, np.int32)  # and in sliding-window layers
        # batches of one row per sequence (the server's decode step): each row's cells span and,
        # for quantized products, up to n_seq activation vectors quantized at once
        self.spans = np.zeros((B, 2), np.int32)
        self.spans_swa = np.zeros((B, 2), np.int32)
        self.acts = RowActs(max(n_seq, min(B, TEAM_ROWS)), max_cols) if activations == "q8" else None
        self.logits = np.zeros((logits_rows, hp.n_vocab), np.float32)
        # prompt batches attend through BLAS products (kernels/attention.py); decode keeps ops.attention
        self.attn = (
            AttentionScratch(B, n_ctx, H, Hkv, hp.head_dim_k, hp.head_dim_v, buf=attn_work[0])
            if B >= BATCH_ATTENTION
            else None
        )
        self.attn_threads = 1  # threads sharing a prompt batch's attention (set by Model.forward)

    @staticmethod
    def xb2_in_arena(hp: HParams) -> bool:
        """Whether xb2 [B, d] fits in both q [B, H, hdk] and hb2 [B, ff] (it then shares their memory)."""
        return hp.n_embd <= min(hp.n_head * hp.head_dim_k, hp.n_ff)

    @staticmethod
    def arena_shapes(
        hp: HParams, n_batch: int, n_ctx: int, threads: int | None = None
    ) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
        """Shapes carved from the arena: attention's (q, k, v, att and, for prompt batches, the
        prefill attention scratch as one region) and the FFN's (hb2, hb)."""
        B, H, Hkv, hdk, hdv = n_batch, hp.n_head, hp.n_head_kv, hp.head_dim_k, hp.head_dim_v
        attn = [(B, H, hdk), (B, Hkv, hdk), (B, Hkv, hdv), (B, H, hdv)]
        if B >= BATCH_ATTENTION:
            attn.append((arena.floats(AttentionScratch.shapes(B, n_ctx, H, Hkv, hdk, hdv, threads)),))
        return attn, [(B, hp.n_ff), (B, hp.n_ff)]

    @property
    def nbytes(self) -> int:
        extra = (self.xq.nbytes if self.xq is not None else 0) + (self.acts.nbytes if self.acts is not None else 0)
        # views of the arena are counted once, as the arena
        return extra + sum(v.nbytes for v in vars(self).values() if isinstance(v, np.ndarray) and v.base is None)


def needs_tile(layer_fids: list[int], output_fid: int, activations: str) -> bool:
    """Whether a prompt product may dequantize weight tiles for BLAS, given the panel ids
    (``panels.format_id``) of the layer matrices and of the output matrix: not when every one
    takes the integer panel GEMM (the output meets several rows with ``logits_all`` and in
    perplexity's projections)."""
    if activations != "q8" or not panels.VNNI512 or not layer_fids:
        return True
    return not all(f >= 0 for f in layer_fids) or output_fid < 0


def _team_rows(x: np.ndarray, s: Scratch, rows: bool) -> bool:
    n = x.shape[0]
    return s.acts is not None and (rows or n <= TEAM_ROWS) and n <= s.acts.q.shape[0]


def _panel_rows(x: np.ndarray, s: Scratch, rows: bool, ws: list[QMatrix]) -> bool:
    """A prompt batch past PANEL_ROWS whose matrices all take the integer panel GEMM (quants/panels.py)."""
    if rows or x.shape[0] <= PANEL_ROWS or s.xq is None or s.xq.panels is None:
        return False
    return all(w.fid >= 0 for w in ws)


def _matmul(w: QMatrix, x: np.ndarray, out: np.ndarray, s: Scratch, rows: bool) -> None:
    if _panel_rows(x, s, rows, [w]):
        w.matmul(x, out, s.tile, s.xq)  # prompt: int8 panel GEMM
    elif _team_rows(x, s, rows) and on_team(w, s.xq):
        matmuls([(w, out)], x, s.acts)  # type: ignore[arg-type]  # decode, short prompts: int8 on the team
    elif rows or x.shape[0] == 1:
        matmul_rows(w, x, out, s.acts, s.xq)  # float weights or exact float products, row by row
    else:
        w.matmul(x, out, s.tile, s.xq)  # prompt: dequantized tiles and BLAS


class Model:
    """Base of every architecture: weights common to all, shared blocks, and the chunking loop."""

    arch = ""
    neox_rope = False
    residency: NoResidency = NO_RESIDENCY  # weight streaming hooks (lmap/residency.py): no-op without a budget
    team_attention_work = TEAM_ATTENTION_WORK  # 0 while warming up: every kernel loaded before the first token

    def __init__(self, g: GGUFFile, hp: HParams) -> None:
        self.g = g
        self.hp = hp
        w = Weights(g)
        self.w = w
        self.token_embd = w.matrix("token_embd.weight")
        self.output_norm = w.vector("output_norm.weight")
        # tied output: reuse the embedding matrix when the file has no output.weight
        self.output = w.matrix("output.weight") if w.has("output.weight") else self.token_embd

    # -- shared blocks --------------------------------------------------------------
    def begin(self, pos: np.ndarray, s: Scratch, kv: KVCache, seq: Seq) -> bool:
        """Choose this batch's KV cells; True when its rows are separate sequences (one row each)."""
        n = pos.shape[0]
        if seq is None or isinstance(seq, int | np.integer):
            kv.assign(pos, s.cells[:n], s.cells_swa[:n], int(seq or 0))
            return False
        kv.assign_rows(pos, seq, s.cells[:n], s.cells_swa[:n], s.spans[:n], s.spans_swa[:n])
        return True

    @staticmethod
    def matmul(w: QMatrix, x: np.ndarray, out: np.ndarray, s: Scratch, rows: bool) -> None:
        """out = x @ W.T; with ``rows`` (one row per sequence) each row is computed exactly as if alone."""
        _matmul(w, x, out, s, rows)

    @staticmethod
    def matmuls(pairs: list[tuple[QMatrix, np.ndarray]], x: np.ndarray, s: Scratch, rows: bool) -> None:
        """out = x @ W.T for each (W, out) sharing the input ``x`` (Q/K/V, gate/up).

        Decode rows go out as one job per format: one activation quantization, one meeting of the threads.
        """
        panel = _panel_rows(x, s, rows, [w for w, _ in pairs])
        if not panel and _team_rows(x, s, rows) and all(on_team(w, s.xq) for w, _ in pairs):
            matmuls(pairs, x, s.acts)  # type: ignore[arg-type]
            return
        if not panel and (rows or x.shape[0] == 1 or s.xq is None or _team_rows(x, s, rows)):
            for w, out in pairs:
                _matmul(w, x, out, s, rows)
            return
        # prompt tiles: quantize or round the shared input once per kind, not once per matrix
        by_kind: dict[object, list[tuple[QMatrix, np.ndarray]]] = {}
        for w, out in pairs:
            integer = w.fid >= 0 and s.xq.panels is not None
            by_kind.setdefault(panels.act_class(w.fid) if integer else w.k.activation, []).append((w, out))
        for kind, group in by_kind.items():
            if kind is None or len(group) == 1:
                for w, out in group:
                    w.matmul(x, out, s.tile, s.xq)
            elif isinstance(kind, int):  # integer panel GEMM: one quantization for the group
                w0 = group[0][0]
                xq, dx, xs = s.xq.int8(x.shape[0], w0.cols, panels.FORMATS[w0.format.name][1])
                panels.quantize_rows(x, w0.fid, xq, dx, xs)
                for w, out in group:
                    w.matmul_q8(xq, dx, xs, out, s.xq)
            else:
                for r0, xr in s.xq.rounded(x, kind):  # type: ignore[arg-type]
                    for w, out in group:
                        w.matmul(xr, out[r0 : r0 + xr.shape[0]], s.tile, None)  # as w.matmul(x, ..., s.xq)

    def attention(
        self,
        il: int,
        s: Scratch,
        kv: KVCache,
        pos: np.ndarray,
        n: int,
        scale: float | None = None,
        seq: Seq = None,
        rows: bool = False,
    ) -> None:
        """Store this batch's K/V for layer ``il`` and attend: s.q, s.k, s.v -> s.att.

        Rows of one sequence work on views of that sequence's cells, as in a one-sequence cache;
        ``rows`` (one row per sequence) attend over their own spans of the shared cache.
        """
        hp = self.hp
        windowed = kv.windowed[il]
        cells = s.cells_swa[:n] if windowed else s.cells[:n]
        store_k, store_v = ops.STORE_KV[kv.type_k], ops.STORE_KV[kv.type_v]
        sc = scale if scale is not None else 1.0 / np.sqrt(hp.head_dim_k)
        window = kv.window if windowed else 0
        if rows:
            store_k(s.k[:n], kv.k[il], cells)
            store_v(s.v[:n], kv.v[il], cells)
            cell_pos = kv.swa_pos if windowed else kv.full_pos
            spans = s.spans_swa[:n] if windowed else s.spans[:n]
            attention_spans(
                s.q[:n], kv.k[il], kv.v[il], pos, cell_pos, spans, sc, window, hp.attn_softcap, s.scores, s.att[:n]
            )
            return
        k, v, m = kv.region(il, int(seq or 0))
        if m.n_chunks:  # a ring smaller than the batch: store and attend chunk by chunk (kv_cache.py)
            for c in range(m.n_chunks):
                c0, c1 = c * m.chunk, min((c + 1) * m.chunk, n)
                store_k(s.k[c0:c1], k, cells[c0:c1])
                store_v(s.v[c0:c1], v, cells[c0:c1])
                self._attend(s, k, v, pos[c0:c1], m.chunk_pos[c], int(m.chunk_used[c]), sc, window, c0, c1)
            return
        store_k(s.k[:n], k, cells)
        store_v(s.v[:n], v, cells)
        self._attend(s, k, v, pos, m.cell_pos, m.n_used, sc, window, 0, n)

    def _attend(
        self,
        s: Scratch,
        k: np.ndarray,
        v: np.ndarray,
        pos: np.ndarray,
        cell_pos: np.ndarray,
        n_used: int,
        sc: float,
        window: int,
        t0: int,
        t1: int,
    ) -> None:
        """Queries s.q[t0:t1] (at positions ``pos``) over the cells: s.att[t0:t1]."""
        hp, n = self.hp, t1 - t0
        q, att = s.q[t0:t1], s.att[t0:t1]
        if n >= BATCH_ATTENTION and s.attn is not None:
            attention_batch(q, k, v, pos, cell_pos, n_used, sc, window, hp.attn_softcap, s.attn, att, s.attn_threads)
        elif n == 1 and n_used * hp.n_head >= self.team_attention_work:
            # one token over a long context: its heads shared by the team (the same _attend per
            # head, so the same bits as the serial kernel), instead of one thread while one spins
            span = s.spans[:1]
            span[0, 0], span[0, 1] = 0, n_used
            attention_spans(q, k, v, pos, cell_pos, span, sc, window, hp.attn_softcap, s.scores, att, min_rows=1)
        else:
            ops.attention(q, k, v, pos, cell_pos, n_used, sc, window, hp.attn_softcap, s.scores, att)

    def warm_up_layers(self) -> int:
        """How many leading layers hold every kind of layer this model has (weight formats and
        shapes, attention window): a forward pass through those loads every kernel a full one needs."""
        swa = self.swa_layers
        first: dict[object, int] = {}
        for i, layer in enumerate(getattr(self, "layers", [])):
            first.setdefault((swa[i], tuple(sorted((n, _kind(v)) for n, v in vars(layer).items()))), i)
        return max(first.values(), default=-1) + 1

    @property
    def swa_layers(self) -> list[bool]:
        """Which layers use sliding-window attention (none, unless the architecture says so)."""
        return [False] * self.hp.n_layer

    def rope_params(self, il: int) -> tuple[float, float]:
        """(freq_base, freq_scale) of layer ``il``'s rope."""
        return self.hp.rope_freq_base, self.hp.rope_freq_scale

    def rotate_keys(self, il: int, k: np.ndarray, delta: int) -> None:
        """Rotate cached keys of layer ``il`` (float32 [n, Hkv, hd], in place) by ``delta`` positions.

        The context shift's K-shift: rope(p) then rope(delta) is rope(p + delta), with the angles
        of ``delta`` computed by the same rope cache as a forward pass.
        """
        hp = self.hp
        base, scale = self.rope_params(il)
        cos = np.zeros((1, hp.n_rot // 2), np.float32)
        sin = np.zeros((1, hp.n_rot // 2), np.float32)
        ops.rope_cache(np.array([delta], np.int32), hp.n_rot, base, scale, cos, sin)
        n = k.shape[0]
        ops.rope(k, np.repeat(cos, n, axis=0), np.repeat(sin, n, axis=0), self.neox_rope)

    def logits(self, s: Scratch, n: int, all_logits: bool, rows: bool = False, hidden: bool = False) -> np.ndarray:
        """Final norm and output projection; returns a view of s.logits ([n or 1, vocab]).

        With ``hidden`` the projection is skipped and the normed final hidden states are returned
        ([n or 1, n_embd], a view of s.xb): the embeddings the server pools.
        """
        hp = self.hp
        x = s.x[:n] if all_logits else s.x[n - 1 : n]
        m = x.shape[0]
        ops.rmsnorm(x, self.output_norm, hp.rms_eps, s.xb[:m])
        if hidden:
            return s.xb[:m]
        out = s.logits[:m]
        self.residency.output(self.matmul, self.output, s.xb[:m], out, s, rows)
        if hp.final_softcap:
            np.tanh(out / hp.final_softcap, out=out)
            out *= hp.final_softcap
        return out

    def forward(
        self,
        tokens: np.ndarray,
        pos: np.ndarray,
        s: Scratch,
        kv: KVCache,
        all_logits: bool,
        seq: Seq = None,
        hidden: bool = False,
    ) -> np.ndarray:
        """Run ``tokens`` ([n] int32 at positions ``pos``) through the model; n <= n_batch.

        ``seq``: None or an int — every token belongs to that sequence of ``kv`` (0 by default);
        an [n] int32 array of distinct sequence ids — token t is the next token of sequence
        seq[t] (a decode step of several sequences: one pass over the weights for all, each
        sequence's arithmetic exactly that of decoding it alone).
        Returns logits for every token (``all_logits``) or the last one, as a view of scratch
        (with ``hidden``: the normed final hidden states instead, see :meth:`logits`).

        A prompt batch whose products all run as integer panel GEMMs (quants/panels.py) keeps
        BLAS (left to attention) on one thread meanwhile: OpenBLAS's idle workers spin for
        ~0.1 s after each call, on the cores the panel GEMM's threads need (gemma3 pp512 at
        -t 2: 342 -> 250 ms).
        """
        if tokens.shape[0] > PANEL_ROWS and s.xq is not None and s.xq.panels is not None and self.integer_prompts:
            # ... and attention shares its blocks among the threads instead (kernels/attention.py)
            s.attn_threads = numba.get_num_threads()
            try:
                with blas_single():
                    return self._forward(tokens, pos, s, kv, all_logits, seq, hidden)
            finally:
                s.attn_threads = 1
        return self._forward(tokens, pos, s, kv, all_logits, seq, hidden)

    def _forward(
        self,
        tokens: np.ndarray,
        pos: np.ndarray,
        s: Scratch,
        kv: KVCache,
        all_logits: bool,
        seq: Seq = None,
        hidden: bool = False,
    ) -> np.ndarray:
        """The architecture's forward pass (see :meth:`forward`)."""
        raise NotImplementedError

    def layer_matrices(self) -> list[QMatrix]:
        """Every weight matrix of the layers (not the embedding or output)."""
        return [m for L in getattr(self, "layers", []) for m in vars(L).values() if isinstance(m, QMatrix)]

    def needs_tile(self, activations: str) -> bool:
        """Whether this model's Scratch needs the dequantized weight tile (module-level
        :func:`needs_tile` over its layer and output matrices)."""
        return needs_tile([w.fid for w in self.layer_matrices()], self.output.fid, activations)

    @functools.cached_property
    def integer_prompts(self) -> bool:
        """True when every layer matrix takes the integer panel GEMM in prompt batches."""
        mats = self.layer_matrices()
        return bool(mats) and all(m.fid >= 0 for m in mats)


def _kind(v: object) -> object:
    """What of a layer attribute decides the kernels it takes."""
    if isinstance(v, QMatrix):
        return ("matrix", v.format.name, v.rows, v.cols, v.fid)
    if isinstance(v, np.ndarray):
        return ("array", v.dtype.str, v.shape)
    return repr(v)


def check_tensor_shapes(model: Model) -> None:
    """Fail at load (not mid-generation) when a tensor's shape disagrees with the hparams."""
    hp = model.hp
    expect = {
        "token_embd.weight": (hp.n_embd, hp.n_vocab),
        "output_norm.weight": (hp.n_embd,),
    }
    for name, shape in expect.items():
        info = model.g.tensors.get(name)
        if info is not None and info.shape != shape:
            raise GGUFError(f"{model.g.path}: tensor {name!r} has shape {info.shape}, hparams imply {shape}")
