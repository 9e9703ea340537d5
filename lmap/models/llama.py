"""Llama (and the many models that share its graph: SmolLM2, Mistral, TinyLlama ...).

x = token_embd[tokens]
for each layer:
    h = attn_norm(x);  q, k, v = Wq h, Wk h, Wv h;  rope(q, k)  (adjacent-pair "norm" rope)
    x = x + Wo attention(q, K, V)                               (grouped-query, causal)
    h = ffn_norm(x);   x = x + Wdown (silu(Wgate h) * Wup h)
logits = output(output_norm(x))
"""

from __future__ import annotations

import numpy as np

from ..gguf import GGUFFile
from ..kernels import ops
from ..kv_cache import KVCache
from .base import HParams, Model, Scratch, Seq


class Layer:
    def __init__(self, model: Model, i: int) -> None:
        w = model.w
        p = f"blk.{i}."
        self.attn_norm = w.vector(p + "attn_norm.weight")
        self.attn_q = w.matrix(p + "attn_q.weight")
        self.attn_k = w.matrix(p + "attn_k.weight")
        self.attn_v = w.matrix(p + "attn_v.weight")
        self.attn_output = w.matrix(p + "attn_output.weight")
        self.ffn_norm = w.vector(p + "ffn_norm.weight")
        self.ffn_gate = w.matrix(p + "ffn_gate.weight")
        self.ffn_up = w.matrix(p + "ffn_up.weight")
        self.ffn_down = w.matrix(p + "ffn_down.weight")


class Llama(Model):
    arch = "llama"
    neox_rope = False

    def __init__(self, g: GGUFFile, hp: HParams) -> None:
        super().__init__(g, hp)
        self.layers = [Layer(self, i) for i in range(hp.n_layer)]

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
        cos, sin = s.cos[:n], s.sin[:n]

        self.token_embd.gather(tokens, x)
        ops.rope_cache(pos, hp.n_rot, hp.rope_freq_base, hp.rope_freq_scale, cos, sin)
        rows = self.begin(pos, s, kv, seq)
        mm = self.matmul
        for i, L in enumerate(self.layers):
            self.residency.layer(i)
            ops.rmsnorm(x, L.attn_norm, hp.rms_eps, xb)
            self.matmuls(
                [(L.attn_q, q.reshape(n, -1)), (L.attn_k, k.reshape(n, -1)), (L.attn_v, v.reshape(n, -1))], xb, s, rows
            )
            ops.rope(q, cos, sin, self.neox_rope)
            ops.rope(k, cos, sin, self.neox_rope)
            self.attention(i, s, kv, pos, n, seq=seq, rows=rows)
            mm(L.attn_output, att.reshape(n, -1), xb2, s, rows)
            ops.add_inplace(x, xb2)

            ops.rmsnorm(x, L.ffn_norm, hp.rms_eps, xb)
            self.matmuls([(L.ffn_gate, hb), (L.ffn_up, hb2)], xb, s, rows)
            ops.swiglu(hb, hb2)
            mm(L.ffn_down, hb, xb2, s, rows)
            ops.add_inplace(x, xb2)
        return self.logits(s, n, all_logits, rows, hidden)
