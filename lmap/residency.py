"""Weight residency: keep the resident part of a mapped model file under a byte budget.

llama.cpp leaves a model larger than RAM to the kernel's page cache, which thrashes when the
weights cycle through more than fits (every token reads every byte, so LRU evicts each page just
before it is needed again). Here the forward pass tells the manager where it is, and the manager:

- copies the small vectors (norms) into anonymous memory, so layer ranges hold only matrices;
- pins (keeps mapped, never drops) as many whole layers, and then the output matrix, as fit in the
  budget after reserving the stream window;
- streams the rest in execution order through ``depth`` reusable slots of anonymous memory: a
  reader thread reads unit after unit (a layer's matrices, or a chunk of output rows) with large
  ``os.preadv`` calls, up to ``depth - 1`` units ahead of the layer that computes, and the streamed
  layer's matrices are pointed at the slot just before it runs;
- reads with ``O_DIRECT`` where the file system allows, so streamed bytes never enter the page
  cache (which a memory cgroup charges to this process); otherwise it evicts each range after
  reading it (``posix_fadvise(POSIX_FADV_DONTNEED)``);
- drops the pages of gathered embedding rows (``MADV_DONTNEED`` + ``POSIX_FADV_DONTNEED``) and
  of the parsed header right away, and reads embedding rows one page per fault (``MADV_RANDOM``).

A prompt batch runs layer-major (every row of the batch per layer), so each streamed unit is read
once per batch, not once per token.

Why a reader thread and not ``madvise(MADV_WILLNEED)`` on the mapping (measured here:
gemma3-270m with a 64 MiB budget, 185 MiB streamed per token, virtio disk ~1 GB/s cold):
- WILLNEED + MADV_DONTNEED + POSIX_FADV_DONTNEED per unit: 2.7 tok/s, 0.5 GB/s. One WILLNEED
  reads at most the device's read-ahead window (``read_ahead_kb``, 8 MiB here), the issuing and
  the evictions cost ~80 ms each per token in the compute thread, and pages not yet read when
  touched stall in major faults.
- reader thread + O_DIRECT into slots: 5.0 tok/s, 1.0 GB/s (the disk's cold sequential rate):
  ``preadv`` releases the GIL, so reads overlap the kernels, and nothing is faulted or evicted.
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import re
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InvalidParameterError, LmapError
from .gguf import TensorInfo
from .memtrace import read_status
from .quants import QMatrix

if TYPE_CHECKING:
    from .models.base import Model, Scratch

__all__ = ["NO_RESIDENCY", "NoResidency", "Residency", "ResidencyPlan", "parse_size", "plan_residency"]

PAGE = mmap.PAGESIZE
# one MADV_WILLNEED reads at most max(read_ahead_kb, io pages) of the device; ask in pieces below it
WILLNEED_PIECE = 4 << 20
# units kept in the stream window at most: the current one plus this many read ahead
MAX_READ_AHEAD = 2

Span = tuple[int, int]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str, name: str = "mem_budget") -> int:
    """Bytes from an int or a string such as ``"64M"``, ``"1.5G"``, ``"512MiB"`` (K/M/G/T are powers of 1024)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidParameterError(f"{name}: expected bytes (int) or a size string like '64M', got {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.match(value)
        if m is None:
            raise InvalidParameterError(
                f"{name}={value!r}: expected a size such as '64M', '1.5G' or a number of bytes "
                "(K, M, G, T = powers of 1024)"
            )
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise InvalidParameterError(f"{name}={value!r}: must be a positive number of bytes")
    return n


def format_size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def outer_span(start: int, end: int, page: int = PAGE) -> Span:
    """The page-aligned range covering [start, end): what becomes resident when it is read."""
    return start // page * page, -(-end // page) * page


def inner_span(start: int, end: int, page: int = PAGE) -> Span:
    """The whole pages inside [start, end) (empty when none): what can be dropped without touching a neighbour."""
    a, b = -(-start // page) * page, end // page * page
    return (a, b) if a < b else (a, a)


def merge_spans(spans: list[Span]) -> list[Span]:
    """Sorted, non-overlapping, non-empty ranges covering the same bytes (touching ranges join)."""
    out: list[Span] = []
    for a, b in sorted(s for s in spans if s[1] > s[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def span_bytes(spans: list[Span] | tuple[Span, ...]) -> int:
    return sum(b - a for a, b in spans)


@dataclass(frozen=True)
class ResidencyPlan:
    """What stays mapped and what streams, decided once from the sizes and the budget."""

    budget: int
    small_bytes: int  # vectors copied to anonymous memory
    pinned_layers: tuple[int, ...]
    output_pinned: bool
    pinned_bytes: int  # mapped and never dropped
    unit_bytes: int  # the largest streamed unit
    depth: int  # streamed units resident at once (1 = no read-ahead); 0 = nothing streams
    output_chunk_rows: int  # rows per streamed output chunk (0 when the output is pinned)
    streamed_bytes: int  # bytes read from disk per forward pass
    minimum: int  # the smallest budget that runs this model

    @property
    def peak_bytes(self) -> int:
        """Planned resident peak: small tensors + pinned + the stream window."""
        return self.small_bytes + self.pinned_bytes + self.depth * self.unit_bytes

    def describe(self) -> str:
        n_pin = len(self.pinned_layers)
        out = "pinned" if self.output_pinned else f"streamed in chunks of {self.output_chunk_rows} rows"
        return (
            f"mem budget {format_size(self.budget)}: {n_pin} layers pinned ({format_size(self.pinned_bytes)}), "
            f"output {out}, {format_size(self.streamed_bytes)} streamed per pass, "
            f"{self.depth} unit(s) of <= {format_size(self.unit_bytes)} in flight, "
            f"planned peak {format_size(self.peak_bytes)}"
        )


def plan_residency(
    layer_bytes: list[int],
    output_bytes: int,
    output_row_bytes: int,
    small_bytes: int,
    budget: int,
    *,
    path: str = "model",
    max_read_ahead: int = MAX_READ_AHEAD,
    row_multiple: int = 1,
) -> ResidencyPlan:
    """Decide pinning and streaming. ``layer_bytes``/``output_bytes`` are page-rounded resident sizes.

    Every weight byte is read once per forward pass, so each pinned byte saves one byte of disk
    traffic whatever it holds: pin whole layers in order, then the output if it fits, after
    reserving a window of ``depth`` units for streaming (the current unit plus read-ahead).
    Output chunks are a multiple of ``row_multiple`` rows where the window allows: the prefill
    product dequantizes tiles of that many rows, so aligned chunks make the same BLAS calls as
    the unchunked product and give bit-identical logits for every row of a batch.
    """
    n_rows = output_bytes // output_row_bytes if output_row_bytes else 0
    # a chunk of output rows starts and ends inside pages: reading it takes up to two pages more
    min_chunk = output_row_bytes + 2 * PAGE if output_bytes else 0
    unit = max(max(layer_bytes, default=0), min_chunk)
    minimum = small_bytes + unit
    if budget < minimum:
        raise InvalidParameterError(
            f"mem_budget={format_size(budget)} is too small for {path}: the minimum is {format_size(minimum)} "
            f"({format_size(small_bytes)} of small tensors kept in memory + {format_size(unit)} for the "
            f"largest layer or output chunk); raise --mem-budget to at least {-(-minimum // 2**20)}M"
        )
    total = sum(layer_bytes) + output_bytes
    if small_bytes + total <= budget:
        return ResidencyPlan(budget, small_bytes, tuple(range(len(layer_bytes))), True, total, 0, 0, 0, 0, minimum)
    avail = budget - small_bytes
    depth = max(1, min(1 + max_read_ahead, avail // unit))
    room = avail - depth * unit
    pinned: list[int] = []
    pinned_bytes = 0
    for i, nb in enumerate(layer_bytes):
        if pinned_bytes + nb <= room:
            pinned.append(i)
            pinned_bytes += nb
    output_pinned = pinned_bytes + output_bytes <= room
    if output_pinned:
        pinned_bytes += output_bytes
        chunk_rows = 0
        unit = max((nb for i, nb in enumerate(layer_bytes) if i not in pinned), default=0)
        depth = depth if unit else 0
    else:
        # the window's share left over after pinning goes to bigger output chunks (fewer syscalls)
        chunk = max(unit, (avail - pinned_bytes) // depth)
        chunk_rows = max(1, min(n_rows, (chunk - 2 * PAGE) // max(output_row_bytes, 1)))
        if row_multiple <= chunk_rows < n_rows:
            chunk_rows -= chunk_rows % row_multiple
        streamed_layer = max((nb for i, nb in enumerate(layer_bytes) if i not in pinned), default=0)
        unit = max(streamed_layer, chunk_rows * output_row_bytes + 2 * PAGE)
    streamed = total - pinned_bytes
    return ResidencyPlan(
        budget, small_bytes, tuple(pinned), output_pinned, pinned_bytes, unit, depth, chunk_rows, streamed, minimum
    )


class NoResidency:
    """The default: everything stays mapped and the kernel pages it (llama.cpp's behaviour). Costs a call."""

    def layer(self, i: int) -> None:
        """Layer ``i`` is about to compute."""

    def output(
        self,
        mm: Callable[[QMatrix, np.ndarray, np.ndarray, Scratch, bool], None],
        w: QMatrix,
        x: np.ndarray,
        out: np.ndarray,
        s: Scratch,
        rows: bool,
    ) -> None:
        """out = x @ w.T (the output projection) through the model's ``matmul``."""
        mm(w, x, out, s, rows)


NO_RESIDENCY = NoResidency()


class _DroppingEmbedding(QMatrix):
    """The token embedding when it is not pinned: gathered rows' pages are dropped right after the gather."""

    __slots__ = ("_residency", "_lo", "_hi", "_base", "_row_bytes")

    def __init__(self, q: QMatrix, residency: Residency, offset: int) -> None:
        for k in QMatrix.__slots__:
            setattr(self, k, getattr(q, k))
        self._residency = residency
        self._base = offset
        self._row_bytes = q.data.nbytes // max(q.rows, 1)
        self._lo, self._hi = inner_span(offset, offset + q.data.nbytes)

    def gather(self, ids: np.ndarray, out: np.ndarray) -> None:
        super().gather(ids, out)
        rb, base = self._row_bytes, self._base
        spans = []
        for i in ids:
            a, b = outer_span(base + int(i) * rb, base + (int(i) + 1) * rb)
            spans.append((max(a, self._lo), min(b, self._hi)))
        self._residency.drop(merge_spans(spans))


@dataclass
class _Unit:
    """A streamed unit: page-aligned file ranges read back to back into one slot, and the matrices in them."""

    name: str
    spans: tuple[Span, ...]
    members: list[tuple[str, TensorInfo, int]]  # (attribute, tensor, byte offset inside the slot)
    views: list[dict[str, QMatrix]] = dataclasses.field(default_factory=list)  # per slot: attribute -> matrix

    @property
    def nbytes(self) -> int:
        return span_bytes(self.spans)


class _Reader:
    """The reader thread: fills slots with the stream's units, in order, up to ``depth`` ahead of the consumer.

    Read number r holds unit r % len(units) in slot r % depth. ``using`` is the read the forward pass
    works on (every read before it is finished), so reads up to using + depth - 1 may be filled.
    ``os.preadv`` releases the GIL, so the reads overlap the kernels of the compute thread.
    """

    def __init__(self, fd: int, direct: bool, units: list[_Unit], slots: list[np.ndarray]) -> None:
        self.fd, self.direct, self.units, self.slots = fd, direct, units, slots
        self.cond = threading.Condition()
        self.using = 0
        self.filled = 0  # reads before this one are in their slots (or were skipped)
        self.stop = False
        self.error: BaseException | None = None
        self.read_bytes = 0
        self.read_s = 0.0
        self.thread = threading.Thread(target=self._run, name="lmap-weight-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n, depth = len(self.units), len(self.slots)
        r = 0
        try:
            while True:
                with self.cond:
                    while not self.stop and r >= self.using + depth:
                        self.cond.wait()
                    if self.stop:
                        return
                    if r < self.using:  # the pass skipped ahead (an interrupted pass, hidden states only)
                        r = self.filled = self.using
                u, buf = self.units[r % n], self.slots[r % depth]
                t = time.perf_counter()
                self._read(u, buf)
                dt = time.perf_counter() - t
                with self.cond:
                    self.read_s += dt
                    self.read_bytes += u.nbytes
                    self.filled = r + 1
                    self.cond.notify_all()
                r += 1
        except BaseException as e:  # reported to the forward pass, which raises it
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def _read(self, u: _Unit, buf: np.ndarray) -> None:
        pos = 0
        for a, b in u.spans:
            mv = memoryview(buf)[pos : pos + b - a]  # type: ignore[arg-type]
            got = 0
            while got < b - a:
                k = os.preadv(self.fd, [mv[got:]], a + got)
                if k <= 0:
                    break  # end of file inside the last page
                got += k
            if not self.direct:  # buffered reads leave the pages cached: evict them, they are ours now
                os.posix_fadvise(self.fd, a, b - a, os.POSIX_FADV_DONTNEED)
            pos += b - a

    def acquire(self, c: int) -> None:
        """Wait until read ``c`` is in its slot; every read before ``c`` is finished with."""
        with self.cond:
            self.using = c
            self.cond.notify_all()
            while self.filled <= c and self.error is None:
                self.cond.wait()
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        with self.cond:
            self.stop = True
            self.cond.notify_all()
        self.thread.join(timeout=10)


class Residency(NoResidency):
    """Keeps the resident part of ``model``'s mapped file under ``budget`` bytes (see the module doc).

    ``Residency.attach(model, budget)`` plans, installs the hooks and returns the manager; the
    model's ``forward`` calls :meth:`layer` before each layer and :meth:`output` for the logits.
    ``stats()`` reports bytes read, disk GB/s and the sampled RssFile peak.
    """

    def __init__(self, model: Model, budget: int) -> None:
        from .models.base import Scratch  # (models.base imports this module)

        g = model.g
        self.path = g.path
        mp = getattr(g, "_map", None)
        if mp is None:
            raise InvalidParameterError(
                f"mem_budget needs the model file mapped, but {g.path} was read into memory "
                "(drop --no-mmap / use_mmap=False)"
            )
        if getattr(g, "locked", False):
            raise InvalidParameterError("mem_budget and mlock exclude each other: --mlock pins the whole file")
        self._map: mmap.mmap = mp
        self._model = model
        self._g = g
        layers: list[Any] = model.layers  # type: ignore[attr-defined]
        self.small_bytes = self._copy_small_tensors(model)
        mats = [self._matrices(L) for L in layers]
        out_w = model.output
        out_info = g.tensors[out_w.name]
        row_bytes = out_info.nbytes // max(out_w.rows, 1)
        layer_spans = [merge_spans([outer_span(i.offset, i.offset + i.nbytes) for _, i in m]) for m in mats]
        self.plan = plan = plan_residency(
            [span_bytes(sp) for sp in layer_spans],
            span_bytes([outer_span(out_info.offset, out_info.offset + out_info.nbytes)]),
            row_bytes,
            self.small_bytes,
            budget,
            path=g.path,
            row_multiple=Scratch.tile_elements(model.hp) // max(out_w.cols, 1),
        )
        pinned = set(plan.pinned_layers)
        # the stream: units in the order a forward pass uses them; _layer_unit[i] = -1 for pinned layers
        self._units: list[_Unit] = []
        self._layer_unit: list[int] = []
        for i, m in enumerate(mats):
            if i in pinned:
                self._layer_unit.append(-1)
                continue
            self._layer_unit.append(len(self._units))
            self._units.append(self._unit(f"blk.{i}", layer_spans[i], m))
        self._first_chunk = len(self._units)
        self._n_chunks = 0
        if not plan.output_pinned:
            for r0 in range(0, out_w.rows, plan.output_chunk_rows):
                r1 = min(r0 + plan.output_chunk_rows, out_w.rows)
                sub = dataclasses.replace(
                    out_info,
                    name=f"{out_info.name}[{r0}:{r1}]",
                    shape=(out_w.cols, r1 - r0),
                    offset=out_info.offset + r0 * row_bytes,
                    nbytes=(r1 - r0) * row_bytes,
                )
                self._units.append(
                    self._unit(sub.name, [outer_span(sub.offset, sub.offset + sub.nbytes)], [("w", sub)])
                )
                self._n_chunks += 1
        self._tmp: np.ndarray | None = None
        self._next = 0  # the next read the forward pass will use
        # accounting
        self.passes = 0
        self.busy_s = 0.0
        self.wait_s = 0.0
        self._t_pass = 0.0
        self.peak_file_kib = 0
        self._reader: _Reader | None = None
        try:
            self._fd = os.open(g.path, os.O_RDONLY)
        except OSError as e:
            raise LmapError(f"{g.path}: cannot open for reading weights ({e.strerror})") from None
        self._finalizer = weakref.finalize(self, os.close, self._fd)
        # header pages (metadata, vocabulary) were parsed into Python objects: nothing reads them again
        self.drop([inner_span(0, g.data_offset)])
        tok = model.token_embd
        if not (plan.output_pinned and tok is out_w):
            emb = g.tensors[tok.name]
            model.token_embd = _DroppingEmbedding(tok, self, emb.offset)
            # a cold fault reads one page, not the device's whole read-ahead window around one row
            a, b = outer_span(emb.offset, emb.offset + emb.nbytes)
            self._map.madvise(mmap.MADV_RANDOM, a, min(b, len(self._map)) - a)
        # pinned ranges are read now, in large requests, instead of page by page in the first pass
        keep = [i for k in plan.pinned_layers for _, i in mats[k]] + ([out_info] if plan.output_pinned else [])
        self._prefetch(merge_spans([outer_span(i.offset, i.offset + i.nbytes) for i in keep]))
        if self._units:
            self._start_reader(g.path)

    # -- set-up ---------------------------------------------------------------------------
    def _matrices(self, layer: Any) -> list[tuple[str, TensorInfo]]:
        """The layer's matrices (attribute, tensor entry), in attribute order."""
        return [(k, self._g.tensors[v.name]) for k, v in vars(layer).items() if isinstance(v, QMatrix)]

    def _unit(self, name: str, spans: list[Span], members: list[tuple[str, TensorInfo]]) -> _Unit:
        placed = []
        pos = 0
        starts = []
        for a, b in spans:
            starts.append((a, b, pos))
            pos += b - a
        for attr, info in members:
            for a, b, p in starts:
                if a <= info.offset < b:
                    placed.append((attr, info, p + info.offset - a))
                    break
        return _Unit(name, tuple(spans), placed)

    def _start_reader(self, path: str) -> None:
        depth = min(self.plan.depth, len(self._units))
        slot_bytes = max(u.nbytes for u in self._units)
        self._slots_map = mmap.mmap(-1, depth * slot_bytes)  # page-aligned, as O_DIRECT wants
        whole = np.frombuffer(self._slots_map, np.uint8)
        slots = [whole[j * slot_bytes : (j + 1) * slot_bytes] for j in range(depth)]
        for u in self._units:
            u.views = [{attr: QMatrix(info, buf[p : p + info.nbytes]) for attr, info, p in u.members} for buf in slots]
        # O_DIRECT: the reads bypass the page cache, so nothing is cached (or charged to a memory cgroup)
        # twice; file systems without it (tmpfs) fall back to buffered reads evicted after each unit
        direct = False
        fd = self._fd
        if hasattr(os, "O_DIRECT"):
            try:
                dfd = os.open(path, os.O_RDONLY | os.O_DIRECT)
                a, b = self._units[0].spans[0]
                os.preadv(dfd, [memoryview(slots[0])[: min(b - a, PAGE)]], a)  # type: ignore[arg-type]
                fd, direct = dfd, True
                self._finalizer_direct = weakref.finalize(self, os.close, dfd)
            except OSError:
                pass
        self._reader = _Reader(fd, direct, self._units, slots)
        weakref.finalize(self, self._reader.close)

    def _copy_small_tensors(self, model: Model) -> int:
        """Replace vectors that view the mapping (norms) with copies; returns their bytes."""
        mapped = model.g._bytes  # noqa: SLF001
        n = 0
        for obj in [model, *model.layers]:  # type: ignore[attr-defined]
            for k, v in vars(obj).items():
                if isinstance(v, np.ndarray) and v.size and np.may_share_memory(v, mapped):
                    setattr(obj, k, v.copy())
                    n += v.nbytes
        return n

    # -- page operations ------------------------------------------------------------------
    def drop(self, spans: list[Span] | tuple[Span, ...]) -> None:
        """Unmap these page-aligned ranges from this process and evict them from the page cache."""
        size = len(self._map)
        for a, b in spans:
            b = min(b, size)
            if b > a:
                self._map.madvise(mmap.MADV_DONTNEED, a, b - a)
                os.posix_fadvise(self._fd, a, b - a, os.POSIX_FADV_DONTNEED)

    def _prefetch(self, spans: list[Span]) -> None:
        size = len(self._map)
        for a, b in spans:
            for p in range(a, min(b, size), WILLNEED_PIECE):
                self._map.madvise(mmap.MADV_WILLNEED, p, min(WILLNEED_PIECE, size - p, b - p))

    def _acquire(self, k: int) -> dict[str, QMatrix]:
        """The views of streamed unit ``k`` once it is read; the units before it are released."""
        assert self._reader is not None
        n = len(self._units)
        c = self._next + (k - self._next) % n  # normally _next itself; more after an interrupted pass
        t = time.perf_counter()
        self._reader.acquire(c)
        self.wait_s += time.perf_counter() - t
        self._next = c + 1
        return self._units[k].views[c % len(self._reader.slots)]

    # -- hooks ----------------------------------------------------------------------------
    def layer(self, i: int) -> None:
        """Layer ``i`` is about to compute: point its matrices at the slot its bytes were read into."""
        if i == 0:
            self._t_pass = time.perf_counter()
        k = self._layer_unit[i]
        if k >= 0:
            L = self._model.layers[i]  # type: ignore[attr-defined]
            for attr, q in self._acquire(k).items():
                setattr(L, attr, q)

    def output(
        self,
        mm: Callable[[QMatrix, np.ndarray, np.ndarray, Scratch, bool], None],
        w: QMatrix,
        x: np.ndarray,
        out: np.ndarray,
        s: Scratch,
        rows: bool,
    ) -> None:
        """The output projection, chunk by chunk when the output matrix streams."""
        if not self._n_chunks:
            mm(w, x, out, s, rows)
        else:
            m = x.shape[0]
            for j in range(self._n_chunks):
                sub = self._acquire(self._first_chunk + j)["w"]
                r0 = j * self.plan.output_chunk_rows
                r1 = r0 + sub.rows
                if rows and m > 1:
                    # the per-row kernels want dense outputs: compute into scratch, then copy the columns
                    if self._tmp is None or self._tmp.shape[0] < m:
                        self._tmp = np.zeros((m, self.plan.output_chunk_rows), np.float32)
                    tmp = self._tmp[:m, : r1 - r0]
                    mm(sub, x, tmp, s, rows)
                    out[:, r0:r1] = tmp
                else:
                    mm(sub, x, out[:, r0:r1], s, rows)
        self.passes += 1
        if self._t_pass:
            self.busy_s += time.perf_counter() - self._t_pass
            self._t_pass = 0.0
        self.peak_file_kib = max(self.peak_file_kib, read_status().get("file_kib", 0))

    # -- reporting ------------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Bytes read, disk GB/s while reading, time the passes waited for reads, sampled RssFile peak (KiB)."""
        rd = self._reader
        read_bytes, read_s = (rd.read_bytes, rd.read_s) if rd is not None else (0, 0.0)
        return {
            "passes": self.passes,
            "bytes_read": read_bytes,
            "read_s": read_s,
            "disk_gbps": read_bytes / read_s / 1e9 if read_s else 0.0,
            "busy_s": self.busy_s,
            "wait_s": self.wait_s,
            "direct_io": float(bool(rd is not None and rd.direct)),
            "peak_file_kib": self.peak_file_kib,
            "planned_peak_bytes": self.plan.peak_bytes,
        }

    def report(self) -> str:
        st = self.stats()
        io = "O_DIRECT" if st["direct_io"] else "buffered"
        return (
            f"{self.plan.describe()}; read {st['bytes_read'] / 1e9:.2f} GB ({io}) at {st['disk_gbps']:.2f} GB/s, "
            f"passes waited {st['wait_s']:.2f} s of {st['busy_s']:.2f} s; "
            f"RssFile peak {st['peak_file_kib'] / 1024:.0f} MiB (libraries included)"
        )

    def close(self) -> None:
        """Stop the reader thread (the model's streamed layers then point at stale slots: close the model too)."""
        if self._reader is not None:
            self._reader.close()

    @classmethod
    def attach(cls, model: Model, budget: int | str) -> Residency:
        """Plan for ``budget`` (bytes or '64M'), install the hooks on ``model`` and return the manager."""
        r = cls(model, parse_size(budget))
        model.residency = r
        return r
