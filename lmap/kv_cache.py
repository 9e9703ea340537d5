"""The key/value cache: one preallocated K and V array per layer, sized once per context.

Cells are addressed by index; ``cell_pos[c]`` is the position a cell holds (-1 when
empty), so attention masks by position rather than by index. Layers with full
attention keep position p in cell p. Sliding-window layers (gemma3's local layers)
keep only their window: a ring of ``window + chunk`` cells holding position p in
cell ``p % ring``, where chunk = min(n_batch, SWA_CHUNK). A batch of more than
``chunk`` tokens stores and attends in chunks, layer by layer: each chunk's first
query still sees ``window`` keys back while the chunk writes its own positions, and
the ring is ``n_batch - chunk`` cells smaller than one that holds a whole batch
(llama.cpp's: window + n_ubatch). gemma3 at n_batch 512 and a 2048 context: 15.4 MiB
of cache instead of 21. ``CellMap.chunk_pos`` gives each chunk's view of the ring.

Several sequences (the server's slots) share one cache: each owns a contiguous
region of cells per layer group, laid out exactly as a one-sequence cache would be.
A batch of rows from one sequence works on views of its region (so it runs the
same kernels, on the same cells, as :class:`~lmap.llama.Llama` alone); a batch
with one row per sequence gets global cell indices and, per row, the span of
cells its sequence owns.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import InvalidParameterError

# cache type name -> storage dtype (f16 is stored as uint16 bits: Numba has no float16;
# q8_0 as the raw bytes of Q8_0 blocks: per 32 values an f16 scale and 32 int8, 34 bytes)
CACHE_TYPES = {"f16": np.uint16, "f32": np.float32, "q8_0": np.uint8}
Q8_0_BLOCK, Q8_0_BYTES = 32, 34
# Tokens of a batch stored into a sliding-window ring at a time: the prefill attention's query
# block (kernels/attention.py MAX_BLOCK), so chunks change no block of its products.
SWA_CHUNK = 128


def ring_cells(n_ctx: int, window: int, n_batch: int, chunk: int = SWA_CHUNK) -> int:
    """Cells a sliding-window layer keeps: its window and one chunk of a batch (at most n_ctx)."""
    return min(n_ctx, window + min(n_batch, chunk))


def ring_chunks(n_batch: int, chunk: int = SWA_CHUNK) -> int:
    """Chunks a full batch is stored in, where a ring is smaller than the batch (0: stored whole)."""
    return -(-n_batch // chunk) if n_batch > chunk else 0


def row_width(type_: str, head_dim: int) -> int:
    """Array elements one head of one cell takes in a cache of ``type_`` (bytes for q8_0)."""
    return head_dim // Q8_0_BLOCK * Q8_0_BYTES if type_ == "q8_0" else head_dim


def row_bytes(type_: str, head_dim: int) -> int:
    """Bytes one head of one cell takes in a cache of ``type_``."""
    return row_width(type_, head_dim) * np.dtype(CACHE_TYPES[type_]).itemsize


class CellMap:
    """Which position each cell of one sequence's region (of one group of layers) holds.

    ``cell_pos`` is a view into the cache-wide array; cell ``c`` of the region is cell
    ``base + c`` of the layer arrays. A ring assigned a batch of more than ``chunk`` positions
    also keeps, per chunk, the positions its cells hold once that chunk is stored
    (``chunk_pos``, ``chunk_used``): the chunk's attention sees those, not the whole batch's.
    """

    def __init__(self, cell_pos: np.ndarray, base: int, ring: bool, chunk: int = 0, n_chunks: int = 0) -> None:
        self.ring = ring
        self.base = base
        self.cell_pos = cell_pos  # [n_cells] view
        self.n_used = 0  # cells [0, n_used) may be valid
        self.chunk = chunk
        # [n_chunks, n_cells] and [n_chunks]: set by assign for a batch stored chunk by chunk
        self.chunk_pos = np.zeros((n_chunks if ring else 0, cell_pos.shape[0]), np.int32)
        self.chunk_used = np.zeros(n_chunks if ring else 0, np.int64)
        self.n_chunks = 0  # chunks of the last batch assigned (0: it was stored whole)

    @property
    def n_cells(self) -> int:
        return self.cell_pos.shape[0]

    def assign(self, pos: np.ndarray, cells: np.ndarray) -> None:
        """Choose the region-local cells for positions ``pos`` (sorted ascending) and mark them used."""
        self.n_chunks = 0
        if not self.ring:
            cells[:] = pos
            self.n_used = max(self.n_used, int(pos[-1]) + 1)
            self.cell_pos[cells] = pos
            return
        np.remainder(pos, self.n_cells, out=cells)
        n = pos.shape[0]
        step = self.chunk if self.chunk_pos.shape[0] and n > self.chunk else n
        for c, c0 in enumerate(range(0, n, step)):
            c1 = min(c0 + step, n)
            last = int(pos[c1 - 1]) + 1
            self.n_used = self.n_cells if last >= self.n_cells else max(self.n_used, last)
            self.cell_pos[cells[c0:c1]] = pos[c0:c1]
            if step < n:
                self.chunk_pos[c] = self.cell_pos
                self.chunk_used[c] = self.n_used
                self.n_chunks = c + 1

    def truncate(self, n_keep: int) -> None:
        self.n_chunks = 0
        self.cell_pos[self.cell_pos >= n_keep] = -1
        if not self.ring:
            self.n_used = min(self.n_used, n_keep)

    def clear(self) -> None:
        self.n_chunks = 0
        self.cell_pos.fill(-1)
        self.n_used = 0


def _rows_to_f32(rows: np.ndarray, type_: str, width: int, head_dim: int) -> np.ndarray:
    """float32 [n, Hkv, head_dim] copy of cache rows [n, Hkv, width] of ``type_``."""
    if type_ == "f32":
        return rows.astype(np.float32)
    if type_ == "f16":
        return rows.view(np.float16).astype(np.float32)
    n, nh = rows.shape[0], rows.shape[1]
    b = rows.reshape(n, nh, width // Q8_0_BYTES, Q8_0_BYTES)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    q = b[..., 2:].view(np.int8).astype(np.float32)
    return (d * q).reshape(n, nh, head_dim)


def _regions(
    n_seq: int, n_cells: int, ring: bool, chunk: int = 0, n_chunks: int = 0
) -> tuple[np.ndarray, list[CellMap]]:
    cell_pos = np.full(n_seq * n_cells, -1, dtype=np.int32)
    return cell_pos, [
        CellMap(cell_pos[s * n_cells : (s + 1) * n_cells], s * n_cells, ring, chunk, n_chunks) for s in range(n_seq)
    ]


class KVCache:
    """K and V per layer ([n_seq * cells, n_head_kv, head_dim] in the cache type) and the cell maps.

    With ``n_seq == 1`` (one :class:`~lmap.llama.Llama`) ``full``/``swa`` are the maps and
    every method's ``seq`` is 0.
    """

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
        n_seq: int = 1,
        swa_chunk: int = SWA_CHUNK,
    ) -> None:
        for name, t in (("type_k", type_k), ("type_v", type_v)):
            if t not in CACHE_TYPES:
                raise InvalidParameterError(f"{name}={t!r}: supported cache types are {', '.join(CACHE_TYPES)}")
        for name, t, hd in (("type_k", type_k, head_dim_k), ("type_v", type_v, head_dim_v)):
            if t == "q8_0" and hd % Q8_0_BLOCK:
                raise InvalidParameterError(f"{name}=q8_0 needs a head dimension that is a multiple of 32, got {hd}")
        if n_seq < 1:
            raise InvalidParameterError(f"n_seq must be >= 1, got {n_seq}")
        self.n_ctx = n_ctx
        self.n_seq = n_seq
        self._head_dim_k = head_dim_k
        self.type_k, self.type_v = type_k, type_v
        self.window = window
        swa = swa_layers if (swa_layers is not None and window > 0) else [False] * n_layer
        ring = ring_cells(n_ctx, window, n_batch, swa_chunk)
        self.swa_chunk = min(n_batch, swa_chunk)
        self.full_pos, self.full_seqs = _regions(n_seq, n_ctx, ring=False)
        self.swa_pos: np.ndarray | None = None
        self.swa_seqs: list[CellMap] | None = None
        if any(swa):
            n_chunks = ring_chunks(n_batch, swa_chunk)
            self.swa_pos, self.swa_seqs = _regions(n_seq, ring, ring < n_ctx, self.swa_chunk, n_chunks)
        self.full = self.full_seqs[0]
        self.swa = self.swa_seqs[0] if self.swa_seqs is not None else None
        self.windowed = [bool(s) and self.swa is not None for s in swa]  # per layer
        self.maps = [self.swa if w else self.full for w in self.windowed]  # per layer, sequence 0
        wk, wv = row_width(type_k, head_dim_k), row_width(type_v, head_dim_v)
        self.k = [np.zeros((n_seq * m.n_cells, n_head_kv, wk), CACHE_TYPES[type_k]) for m in self.maps]
        self.v = [np.zeros((n_seq * m.n_cells, n_head_kv, wv), CACHE_TYPES[type_v]) for m in self.maps]

    @property
    def nbytes(self) -> int:
        maps = self.full_pos.nbytes + (self.swa_pos.nbytes if self.swa_pos is not None else 0)
        chunks = sum(m.chunk_pos.nbytes + m.chunk_used.nbytes for m in self.swa_seqs or [])
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v) + maps + chunks

    def _maps(self, seq: int) -> list[CellMap]:
        if not 0 <= seq < self.n_seq:
            raise InvalidParameterError(f"sequence {seq} is outside the cache's {self.n_seq} sequences")
        return [self.full_seqs[seq]] + ([self.swa_seqs[seq]] if self.swa_seqs is not None else [])

    def clear(self, seq: int | None = None) -> None:
        """Forget every position of sequence ``seq`` (all sequences when None)."""
        for s in range(self.n_seq) if seq is None else (seq,):
            for m in self._maps(s):
                m.clear()

    def truncate(self, n_keep: int, seq: int = 0) -> None:
        """Forget every position >= n_keep of ``seq`` (prefix reuse keeps the shared prefix)."""
        for m in self._maps(seq):
            m.truncate(n_keep)

    def reusable(self, n_keep: int, seq: int = 0) -> int:
        """How much of a cached prefix of n_keep positions of ``seq`` can be reused.

        A ring has overwritten positions older than its size, so resuming at n_keep needs the
        window before n_keep to be still there; otherwise the prefix is evaluated again.
        """
        self._maps(seq)
        if self.swa_seqs is None or not self.swa_seqs[seq].ring or n_keep == 0:
            return n_keep
        cp = self.swa_seqs[seq].cell_pos
        lo = max(0, n_keep - self.window)
        held = cp[(cp >= lo) & (cp < n_keep)]
        return n_keep if held.size == n_keep - lo else 0

    def shift(
        self,
        n_keep: int,
        n_discard: int,
        n_past: int,
        rotate: Callable[[int, np.ndarray, int], None],
        seq: int = 0,
    ) -> None:
        """Context shift of ``seq``: forget positions [n_keep, n_keep + n_discard) and move the
        positions after them, up to ``n_past``, down by ``n_discard``.

        Moved keys are converted to float32, turned by ``rotate(il, k, -n_discard)`` (in place,
        k: [n, Hkv, hd]) and stored back: RoPE is a rotation, so rotating a key by -n_discard
        positions gives the key of its new position. Moved rows land where ``assign`` would put
        their new positions (cell = position, or position % ring), so afterwards the cache is the
        one evaluating the kept tokens at their new positions gives, up to the rounding of the
        re-rotation (llama.cpp's K-shift re-rotates the same way).
        """
        from .kernels.ops import STORE_KV

        self.truncate(n_past, seq)
        d = n_discard
        for m in self._maps(seq):
            cp = m.cell_pos
            held = np.flatnonzero(cp >= 0)
            pos = cp[held]
            src = held[pos >= n_keep + d]
            newpos = cp[src] - d
            dst = (newpos % m.n_cells if m.ring else newpos).astype(np.int32)
            kept = held[pos < n_keep]
            for il in range(len(self.k)):
                if (self.swa_seqs is not None and m is self.swa_seqs[seq]) != self.windowed[il]:
                    continue
                k, v, _ = self.region(il, seq)
                kf = _rows_to_f32(k[src], self.type_k, self.k[il].shape[2], self._head_dim_k)
                rotate(il, kf, -d)
                STORE_KV[self.type_k](kf, k, dst)
                v[dst] = v[src]  # fancy indexing reads every source row before writing
            new = np.full_like(cp, -1)
            new[kept] = cp[kept]
            new[dst] = newpos
            cp[:] = new
            used = np.flatnonzero(cp >= 0)
            m.n_used = int(used[-1]) + 1 if used.size else 0

    def copy(self, src: int, dst: int, n_keep: int) -> None:
        """Make ``dst`` hold positions [0, n_keep) of ``src`` (its cells, K and V), and nothing else.

        ``n_keep`` must be reusable in ``src``. Sequences sharing a prompt (n > 1 choices, a chat
        resent with one more turn) start from a copy instead of evaluating it again.
        """
        if src == dst:
            self.truncate(n_keep, dst)
            return
        for a, b in zip(self._maps(src), self._maps(dst), strict=True):
            b.cell_pos[:] = a.cell_pos
            b.n_used = a.n_used
            b.truncate(n_keep)
        for il, m in enumerate(self.maps):
            n = m.n_cells
            held = self.swa_seqs if self.windowed[il] else self.full_seqs
            assert held is not None
            # the cells the kept positions occupy: a prefix of the region for full layers, any cell of a ring
            cells = np.flatnonzero(held[dst].cell_pos >= 0) if self.windowed[il] else np.arange(min(n_keep, n))
            self.k[il][dst * n + cells] = self.k[il][src * n + cells]
            self.v[il][dst * n + cells] = self.v[il][src * n + cells]

    def region(self, il: int, seq: int) -> tuple[np.ndarray, np.ndarray, CellMap]:
        """K and V views of the cells layer ``il`` keeps for ``seq``, and its cell map."""
        m = self.swa_seqs[seq] if self.windowed[il] and self.swa_seqs is not None else self.full_seqs[seq]
        return self.k[il][m.base : m.base + m.n_cells], self.v[il][m.base : m.base + m.n_cells], m

    def assign(self, pos: np.ndarray, cells_full: np.ndarray, cells_swa: np.ndarray, seq: int = 0) -> None:
        """Choose the region-local cells for positions ``pos`` of ``seq`` (written into the cell arrays)."""
        self.full_seqs[seq].assign(pos, cells_full)
        if self.swa_seqs is not None:
            self.swa_seqs[seq].assign(pos, cells_swa)

    def assign_rows(
        self,
        pos: np.ndarray,
        seqs: np.ndarray,
        cells_full: np.ndarray,
        cells_swa: np.ndarray,
        spans_full: np.ndarray,
        spans_swa: np.ndarray,
    ) -> None:
        """One row per sequence (row t is position pos[t] of sequence seqs[t], all distinct).

        Writes each row's global cell and the span [lo, hi) of cells its sequence may attend
        to (``spans_*``: [n, 2] int32), for full and for sliding-window layers.
        """
        for t in range(pos.shape[0]):
            s = int(seqs[t])
            for m, cells, spans in (
                (self.full_seqs[s], cells_full, spans_full),
                (self.swa_seqs[s] if self.swa_seqs is not None else None, cells_swa, spans_swa),
            ):
                if m is None:
                    continue
                m.assign(pos[t : t + 1], cells[t : t + 1])
                cells[t] += m.base
                spans[t, 0] = m.base
                spans[t, 1] = m.base + m.n_used
