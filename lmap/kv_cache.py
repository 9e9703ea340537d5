"""The key/value cache: one preallocated K and V array per layer, sized once per context.

Cells are addressed by index; ``cell_pos[c]`` is the position a cell holds (-1 when
empty), so attention masks by position rather than by index. Layers with full
attention keep position p in cell p. Sliding-window layers (gemma3's local layers)
keep only their window: a ring of ``window + n_batch`` cells holding position p in
cell ``p % ring`` — a batch's first query still sees ``window`` keys back while the
batch writes its own ``n_batch`` positions.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidParameterError

# cache type name -> storage dtype (f16 is stored as uint16 bits: Numba has no float16)
CACHE_TYPES = {"f16": np.uint16, "f32": np.float32}


class CellMap:
    """Which position each cell of one group of layers holds."""

    def __init__(self, n_cells: int, ring: bool) -> None:
        self.ring = ring
        self.cell_pos = np.full(n_cells, -1, dtype=np.int32)  # [n_cells]
        self.n_used = 0  # cells [0, n_used) may be valid

    @property
    def n_cells(self) -> int:
        return self.cell_pos.shape[0]

    def assign(self, pos: np.ndarray, cells: np.ndarray) -> None:
        if self.ring:
            np.remainder(pos, self.n_cells, out=cells)
            self.n_used = self.n_cells if int(pos[-1]) + 1 >= self.n_cells else max(self.n_used, int(pos[-1]) + 1)
        else:
            cells[:] = pos
            self.n_used = max(self.n_used, int(pos[-1]) + 1)
        self.cell_pos[cells] = pos

    def truncate(self, n_keep: int) -> None:
        self.cell_pos[self.cell_pos >= n_keep] = -1
        if not self.ring:
            self.n_used = min(self.n_used, n_keep)

    def clear(self) -> None:
        self.cell_pos.fill(-1)
        self.n_used = 0


class KVCache:
    """K and V per layer ([cells, n_head_kv, head_dim] in the cache type) and the cell maps."""

    def __init__(
        self,
        n_layer: int,
        n_ctx: int,
        n_head_kv: int,
        head_dim_k: int,
        head_dim_v: int,
        type_k: str = "f16",
        type_v: str = "f16",
        *,
        swa_layers: list[bool] | None = None,
        window: int = 0,
        n_batch: int = 512,
    ) -> None:
        for name, t in (("type_k", type_k), ("type_v", type_v)):
            if t not in CACHE_TYPES:
                raise InvalidParameterError(f"{name}={t!r}: supported cache types are {', '.join(CACHE_TYPES)}")
        self.n_ctx = n_ctx
        self.type_k, self.type_v = type_k, type_v
        self.window = window
        swa = swa_layers if (swa_layers is not None and window > 0) else [False] * n_layer
        ring = min(n_ctx, window + n_batch)
        self.full = CellMap(n_ctx, ring=False)
        self.swa = CellMap(ring, ring=ring < n_ctx) if any(swa) else None
        self.maps = [self.swa if s and self.swa is not None else self.full for s in swa]
        self.k = [np.zeros((m.n_cells, n_head_kv, head_dim_k), CACHE_TYPES[type_k]) for m in self.maps]
        self.v = [np.zeros((m.n_cells, n_head_kv, head_dim_v), CACHE_TYPES[type_v]) for m in self.maps]

    @property
    def nbytes(self) -> int:
        maps = self.full.cell_pos.nbytes + (self.swa.cell_pos.nbytes if self.swa else 0)
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v) + maps

    def clear(self) -> None:
        self.full.clear()
        if self.swa is not None:
            self.swa.clear()

    def truncate(self, n_keep: int) -> None:
        """Forget every position >= n_keep (prefix reuse keeps the shared prefix)."""
        self.full.truncate(n_keep)
        if self.swa is not None:
            self.swa.truncate(n_keep)

    def reusable(self, n_keep: int) -> int:
        """How much of a cached prefix of n_keep positions can be reused.

        A ring has overwritten positions older than its size, so resuming at n_keep needs the
        window before n_keep to be still there; otherwise the prefix is evaluated again.
        """
        if self.swa is None or not self.swa.ring or n_keep == 0:
            return n_keep
        lo = max(0, n_keep - self.window)
        held = self.swa.cell_pos[(self.swa.cell_pos >= lo) & (self.swa.cell_pos < n_keep)]
        return n_keep if held.size == n_keep - lo else 0

    def assign(self, pos: np.ndarray, cells_full: np.ndarray, cells_swa: np.ndarray) -> None:
        """Choose the cells for positions ``pos`` (written into the cell arrays) and mark them used."""
        self.full.assign(pos, cells_full)
        if self.swa is not None:
            self.swa.assign(pos, cells_swa)
