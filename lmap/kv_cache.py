"""The key/value cache: one preallocated K and V array per layer, sized once per context.

Cells are addressed by index; ``cell_pos[c]`` is the position a cell holds (-1 when
empty), so attention masks by position rather than by index. Today cell c holds
position c; context shift and sliding-window rings only change that mapping.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidParameterError

# cache type name -> (storage dtype, bytes per element)
CACHE_TYPES = {"f16": np.uint16, "f32": np.float32}


class KVCache:
    def __init__(
        self,
        n_layer: int,
        n_ctx: int,
        n_head_kv: int,
        head_dim_k: int,
        head_dim_v: int,
        type_k: str = "f16",
        type_v: str = "f16",
    ) -> None:
        for name, t in (("type_k", type_k), ("type_v", type_v)):
            if t not in CACHE_TYPES:
                raise InvalidParameterError(f"{name}={t!r}: supported cache types are {', '.join(CACHE_TYPES)}")
        self.n_ctx = n_ctx
        self.type_k, self.type_v = type_k, type_v
        # k[l], v[l]: [n_ctx, n_head_kv, head_dim] in the cache type (f16 stored as uint16 bits)
        self.k = [np.zeros((n_ctx, n_head_kv, head_dim_k), CACHE_TYPES[type_k]) for _ in range(n_layer)]
        self.v = [np.zeros((n_ctx, n_head_kv, head_dim_v), CACHE_TYPES[type_v]) for _ in range(n_layer)]
        self.cell_pos = np.full(n_ctx, -1, dtype=np.int32)  # [n_ctx] position held by each cell
        self.n_used = 0  # cells [0, n_used) may be valid

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v) + self.cell_pos.nbytes

    def clear(self) -> None:
        self.cell_pos.fill(-1)
        self.n_used = 0

    def truncate(self, n_keep: int) -> None:
        """Forget every position >= n_keep (prefix reuse keeps the shared prefix)."""
        self.cell_pos[n_keep:] = -1
        self.n_used = min(self.n_used, n_keep)

    def assign(self, pos: np.ndarray, cells: np.ndarray) -> None:
        """Choose the cells for positions ``pos`` (written into ``cells``) and mark them used."""
        cells[:] = pos
        self.cell_pos[pos] = pos
        self.n_used = max(self.n_used, int(pos[-1]) + 1)
