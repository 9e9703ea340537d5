"""Prompt products sharing an input (Q/K/V, gate/up) round the activations once per rounding kind.

``Model.matmuls`` on the tiles + BLAS path rounds the shared input once for every matrix whose
format rounds the same way (llama.cpp's vec_dot_type) and multiplies the rest as before; each
product must equal the matrix's own ``QMatrix.matmul`` with the activation scratch, bit for bit.
"""

from __future__ import annotations

import numpy as np
from test_team import matrix

from lmap.models.base import TEAM_ROWS, HParams, Model, Scratch


def test_shared_rounding_gives_each_matrix_its_own_product() -> None:
    cols = 512
    hp = HParams(arch="t", n_ctx_train=256, n_embd=cols, n_layer=1, n_ff=1024, n_head=8, n_head_kv=2)
    hp.head_dim_k = hp.head_dim_v = hp.n_rot = cols // 8
    hp.n_vocab = 64
    s = Scratch(hp, 128, 128, 1)
    # two Q8_0-rounded formats, one Q8_K-rounded, one on its own
    ws = [matrix(f, 96 + 8 * i, cols, i) for i, f in enumerate(["Q5_0", "Q4_K", "Q8_0", "Q6_K", "Q4_1"])]
    n = TEAM_ROWS + 36  # past the team's rows: the tiles path
    x = np.random.default_rng(1).standard_normal((n, cols)).astype(np.float32)
    got = [np.full((n, w.rows), np.nan, np.float32) for w in ws]
    Model.matmuls(list(zip(ws, got, strict=True)), x, s, False)
    for w, out in zip(ws, got, strict=True):
        want = np.zeros((n, w.rows), np.float32)
        w.matmul(x, want, s.tile, s.xq)
        np.testing.assert_array_equal(out, want, err_msg=w.format.name)
