"""Memory timeline: sample this process's resident memory while it works, and plot it.

``lmap run --memory-trace FILE`` writes one CSV row every ``interval`` seconds from a
background thread (reading ``/proc/self/status`` costs ~20 µs, so 100 ms sampling does not
disturb decoding); ``lmap plot-memory FILE`` draws the curve the seeds describe: a step while
the model maps in and the context is allocated, then a flat line while it talks. Events
(load done, first token, end) are rows with a label so the plot can mark them.

Columns: ``t_s`` (seconds since start), ``rss_kib`` (VmRSS), ``anon_kib`` (RssAnon: heap, KV
cache, scratch), ``file_kib`` (RssFile: mapped model pages and libraries), ``hwm_kib`` (VmHWM,
the peak), ``event``.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path
from typing import IO, Any

from .errors import InvalidParameterError, LmapError

__all__ = ["MemorySampler", "read_status", "read_trace", "plot_memory", "FIELDS"]

FIELDS = ("t_s", "rss_kib", "anon_kib", "file_kib", "hwm_kib", "event")
_KEYS = {"VmRSS:": "rss_kib", "RssAnon:": "anon_kib", "RssFile:": "file_kib", "VmHWM:": "hwm_kib"}


def read_status(path: str = "/proc/self/status") -> dict[str, int]:
    """VmRSS, RssAnon, RssFile and VmHWM in KiB (Linux; empty elsewhere)."""
    out: dict[str, int] = {}
    try:
        with open(path, "rb") as f:
            for line in f:
                key = _KEYS.get(line.split(b":", 1)[0].decode() + ":")
                if key is not None:
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


class MemorySampler:
    """Writes a row every ``interval`` seconds to ``path`` until closed; ``mark(label)`` adds an event row.

    Use as a context manager. Refuses to overwrite an existing file unless ``overwrite``.
    """

    def __init__(self, path: str | Path, interval: float = 0.1, overwrite: bool = False) -> None:
        if not interval > 0:
            raise InvalidParameterError(f"memory trace interval must be > 0 seconds, got {interval}")
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise InvalidParameterError(f"--memory-trace {self.path}: file exists (not overwritten)")
        try:
            self._file: IO[str] = open(self.path, "x" if not overwrite else "w", newline="")  # noqa: SIM115
        except OSError as e:
            raise InvalidParameterError(f"--memory-trace {self.path}: cannot create ({e.strerror})") from None
        self._w = csv.writer(self._file)
        self._w.writerow(FIELDS)
        self.interval = interval
        self._t0 = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmap-memtrace", daemon=True)
        self.samples = 0
        self._row("start")
        self._thread.start()

    def _row(self, event: str = "") -> None:
        s = read_status()
        t = time.perf_counter() - self._t0
        with self._lock:
            if self._file.closed:
                return
            self._w.writerow(
                (
                    f"{t:.3f}",
                    s.get("rss_kib", ""),
                    s.get("anon_kib", ""),
                    s.get("file_kib", ""),
                    s.get("hwm_kib", ""),
                    event,
                )
            )
            self.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._row()

    def mark(self, event: str) -> None:
        """Record a labelled sample now (e.g. "loaded", "first token")."""
        self._row(event.replace(",", " "))

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._row("end")
        with self._lock:
            self._file.close()

    def __enter__(self) -> MemorySampler:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_trace(path: str | Path) -> dict[str, list[Any]]:
    """Columns of a trace CSV: floats for t_s, KiB ints (None where missing), event strings."""
    p = Path(path)
    try:
        with open(p, newline="") as f:
            rows = list(csv.reader(f))
    except OSError as e:
        raise LmapError(f"{p}: cannot read the memory trace ({e.strerror})") from None
    if not rows or tuple(rows[0]) != FIELDS:
        raise LmapError(f"{p}: not an lmap memory trace (expected the header {','.join(FIELDS)})")
    cols: dict[str, list[Any]] = {k: [] for k in FIELDS}
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(FIELDS):
            raise LmapError(f"{p}: line {i} has {len(row)} fields, expected {len(FIELDS)}")
        try:
            cols["t_s"].append(float(row[0]))
            for k, v in zip(FIELDS[1:5], row[1:5], strict=True):
                cols[k].append(int(v) if v else None)
        except ValueError:
            raise LmapError(f"{p}: line {i}: not a number in {row[:5]}") from None
        cols["event"].append(row[5])
    return cols


def plot_memory(path: str | Path, out: str | Path, title: str | None = None) -> Path:
    """Draw RSS, its anonymous and file-backed parts over time, with event markers, into ``out`` (PNG/SVG/PDF)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise LmapError("plot-memory needs matplotlib: pip install 'lmap[plot]'") from None
    cols = read_trace(path)
    t = cols["t_s"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    for key, label in (
        ("rss_kib", "RSS"),
        ("anon_kib", "anonymous (KV cache, scratch, heap)"),
        ("file_kib", "file-backed (model pages, libraries)"),
    ):
        ys = [v / 1024 if v is not None else float("nan") for v in cols[key]]
        ax.plot(t, ys, label=label, linewidth=1.6 if key == "rss_kib" else 1.0)
    for ts, ev in zip(t, cols["event"], strict=True):
        if ev and ev not in ("start", "end"):
            ax.axvline(ts, color="grey", linestyle=":", linewidth=0.8)
            ax.annotate(ev, (ts, ax.get_ylim()[1]), rotation=90, va="top", ha="right", fontsize=7, color="grey")
    ax.set_xlabel("seconds")
    ax.set_ylabel("MiB")
    ax.set_ylim(bottom=0)
    ax.set_title(title or f"memory of {Path(path).name}")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out_p = Path(out)
    fig.savefig(out_p, dpi=120)
    plt.close(fig)
    return out_p
