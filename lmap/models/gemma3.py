"""Gemma 3: llama's skeleton with gemma's differences.

    x = token_embd[tokens] * sqrt(n_embd)
    for each layer (5 of every 6 use a sliding window of `sliding_window` positions and rope base 10k;
                    every 6th attends globally with the file's rope base):
        h = attn_norm(x);  q, k, v = Wq h, Wk h, Wv h
        q, k = rope(q_norm(q)), rope(k_norm(k))                 (per-head RMSNorm, "neox" rope)
        x = x + post_attention_norm(Wo attention(q / sqrt(head_dim), K, V))
        h = ffn_norm(x);   x = x + post_ffw_norm(Wdown (gelu_tanh(Wgate h) * Wup h))
    logits = output(output_norm(x))                            (output tied to token_embd)

The GGUF converter already folded gemma's "1 + weight" into every norm weight.
"""

from __future__ import annotations

import math

import numpy as np

from ..gguf import GGUFFile
from ..kernels import ops
from ..kv_cache import KVCache
from .base import HParams, Model, Scratch, Seq

SWA_PATTERN = 6  # llama.cpp's default for gemma3: layers il % 6 < 5 are sliding-window


class Layer:
    def __init__(self, model: Model, i: int) -> None:
        w = model.w
        p = f"blk.{i}."
        self.attn_norm = w.vector(p + "attn_norm.weight")
        self.attn_q = w.matrix(p + "attn_q.weight")
        self.attn_k = w.matrix(p + "attn_k.weight")
        self.attn_v = w.matrix(p + "attn_v.weight")
        self.attn_q_norm = w.vector(p + "attn_q_norm.weight")
        self.attn_k_norm = w.vector(p + "attn_k_norm.weight")
        self.attn_output = w.matrix(p + "attn_output.weight")
        self.post_attention_norm = w.vector(p + "post_attention_norm.weight")
        self.ffn_norm = w.vector(p + "ffn_norm.weight")
        self.ffn_gate = w.matrix(p + "ffn_gate.weight")
        self.ffn_up = w.matrix(p + "ffn_up.weight")
        self.ffn_down = w.matrix(p + "ffn_down.weight")
        self.post_ffw_norm = w.vector(p + "post_ffw_norm.weight")


class Gemma3(Model):
    arch = "gemma3"
    neox_rope = True

    def __init__(self, g: GGUFFile, hp: HParams) -> None:
        super().__init__(g, hp)
        self.layers = [Layer(self, i) for i in range(hp.n_layer)]
        pattern = g.metadata.get(f"{hp.arch}.attention.sliding_window_pattern", SWA_PATTERN)
        if isinstance(pattern, np.ndarray):
            self._swa = [bool(b) for b in pattern[: hp.n_layer]]
        else:
            n = int(pattern)
            self._swa = [n == 0 or il % n < n - 1 for il in range(hp.n_layer)]
        if not hp.sliding_window:
            self._swa = [False] * hp.n_layer
        # gemma_pytorch: queries scaled by query_pre_attn_scalar**-0.5 = head_dim**-0.5 (27B: n_embd / n_head)
        head = hp.n_embd / hp.n_head if hp.n_layer == 62 else hp.head_dim_k
        self.attn_scale = 1.0 / math.sqrt(head)
        self.embd_scale = np.float32(math.sqrt(hp.n_embd))

    @property
    def swa_layers(self) -> list[bool]:
        return self._swa

    def rope_params(self, il: int) -> tuple[float, float]:
        # local layers rotate with their own base and no scaling (see forward)
        return (self.hp.rope_freq_base_swa, 1.0) if self._swa[il] else super().rope_params(il)

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
        hp = self.hp
        n = tokens.shape[0]
        x, xb, xb2 = s.x[:n], s.xb[:n], s.xb2[:n]
        q, k, v, att = s.q[:n], s.k[:n], s.v[:n], s.att[:n]
        hb, hb2 = s.hb[:n], s.hb2[:n]

        self.token_embd.gather(tokens, x)
        np.multiply(x, self.embd_scale, out=x)
        ops.rope_cache(pos, hp.n_rot, hp.rope_freq_base, hp.rope_freq_scale, s.cos[:n], s.sin[:n])
        ops.rope_cache(pos, hp.n_rot, hp.rope_freq_base_swa, 1.0, s.cos2[:n], s.sin2[:n])
        rows = self.begin(pos, s, kv, seq)
        mm = self.matmul
        for i, L in enumerate(self.layers):
            self.residency.layer(i)
            local = self._swa[i]
            cos, sin = (s.cos2[:n], s.sin2[:n]) if local else (s.cos[:n], s.sin[:n])
            ops.rmsnorm(x, L.attn_norm, hp.rms_eps, xb)
            self.matmuls(
                [(L.attn_q, q.reshape(n, -1)), (L.attn_k, k.reshape(n, -1)), (L.attn_v, v.reshape(n, -1))], xb, s, rows
            )
            ops.rmsnorm_heads(q, L.attn_q_norm, hp.rms_eps)
            ops.rmsnorm_heads(k, L.attn_k_norm, hp.rms_eps)
            ops.rope(q, cos, sin, self.neox_rope)
            ops.rope(k, cos, sin, self.neox_rope)
            self.attention(i, s, kv, pos, n, scale=self.attn_scale, seq=seq, rows=rows)
            mm(L.attn_output, att.reshape(n, -1), xb2, s, rows)
            ops.rmsnorm(xb2, L.post_attention_norm, hp.rms_eps, xb2)
            ops.add_inplace(x, xb2)

            ops.rmsnorm(x, L.ffn_norm, hp.rms_eps, xb)
            self.matmuls([(L.ffn_gate, hb), (L.ffn_up, hb2)], xb, s, rows)
            ops.geglu(hb, hb2, ops.gelu_f16_table() if s.xq is not None else ops.EXACT)  # xq: llama.cpp arithmetic
            mm(L.ffn_down, hb, xb2, s, rows)
            ops.rmsnorm(xb2, L.post_ffw_norm, hp.rms_eps, xb2)
            ops.add_inplace(x, xb2)
        return self.logits(s, n, all_logits, rows, hidden)
