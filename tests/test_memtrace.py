"""Memory timeline: the sampler's CSV, the CLI that writes it while generating, and the plot."""

from __future__ import annotations

import mmap
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lmap.errors import InvalidParameterError, LmapError
from lmap.memtrace import FIELDS, MemorySampler, read_status, read_trace


def test_status_fields_are_consistent() -> None:
    s = read_status()
    assert set(s) == {"rss_kib", "anon_kib", "file_kib", "hwm_kib"}
    assert s["anon_kib"] + s["file_kib"] <= s["rss_kib"] <= s["hwm_kib"]


def test_sampler_sees_an_allocation(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    with MemorySampler(path, interval=0.02) as trace:
        time.sleep(0.1)
        # a fresh anonymous mapping (np.ones may reuse heap pages earlier tests left resident), then touched
        buf = mmap.mmap(-1, 64 * 2**20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        a = np.frombuffer(buf, np.float64)
        a.fill(1.0)
        trace.mark("allocated")
        time.sleep(0.1)
        del a
        buf.close()
    cols = read_trace(path)
    assert cols["event"][0] == "start" and cols["event"][-1] == "end" and "allocated" in cols["event"]
    assert trace.samples == len(cols["t_s"]) >= 8
    assert cols["t_s"] == sorted(cols["t_s"])
    i = cols["event"].index("allocated")
    assert cols["anon_kib"][i] - cols["anon_kib"][0] >= 60 * 1024


def test_refuses_to_overwrite_and_bad_input(tmp_path: Path) -> None:
    p = tmp_path / "m.csv"
    p.write_text("precious")
    with pytest.raises(InvalidParameterError, match="exists"):
        MemorySampler(p)
    assert p.read_text() == "precious"
    with pytest.raises(InvalidParameterError, match="interval"):
        MemorySampler(tmp_path / "x.csv", interval=0)
    with pytest.raises(LmapError, match="not an lmap memory trace"):
        read_trace(p)
    bad = tmp_path / "bad.csv"
    bad.write_text(",".join(FIELDS) + "\n0.1,abc,1,1,1,\n")
    with pytest.raises(LmapError, match="line 2"):
        read_trace(bad)


@pytest.mark.slow
def test_run_writes_a_trace_and_plot_draws_it(tmp_path: Path, smollm2_path: Path) -> None:
    csv_path, png = tmp_path / "run.csv", tmp_path / "run.png"
    cmd = [sys.executable, "-m", "lmap", "run", "-m", str(smollm2_path), "-p", "Once upon a time", "--raw"]
    r = subprocess.run(
        [*cmd, "-n", "48", "--temp", "0", "--memory-trace", str(csv_path)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    cols = read_trace(csv_path)
    ev = [e for e in cols["event"] if e]
    assert ev[0] == "start" and ev[-1] == "end" and ev.index("loaded") < ev.index("first token")
    # the mapped model shows up as file-backed memory once loaded (Q4_1 SmolLM2: ~90 MiB of weights)
    loaded = cols["event"].index("loaded")
    assert cols["file_kib"][loaded] > 50 * 1024
    # an existing trace is not overwritten: one clear line, exit 1
    r2 = subprocess.run([*cmd, "-n", "4", "--memory-trace", str(csv_path)], capture_output=True, text=True)
    assert r2.returncode == 1 and "exists" in r2.stderr and "Traceback" not in r2.stderr
    assert read_trace(csv_path) == cols
    r3 = subprocess.run(
        [sys.executable, "-m", "lmap", "plot-memory", str(csv_path), "-o", str(png)], capture_output=True
    )
    assert r3.returncode == 0, r3.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
