"""A model larger than the memory it may use: lmap ``--mem-budget`` vs llama.cpp's plain mmap, same cgroup limit.

Both programs run in a fresh child memory cgroup whose limit (``--limit``) is smaller than the
model file, on a private copy of the file whose pages are evicted before each run (cold cache;
the machine's other caches are left alone). Same greedy prompt, same threads, alternating.
llama.cpp maps the file and lets the kernel page it through the limit; lmap pins what its
``--mem-budget`` allows and streams the rest with a reader thread (lmap/residency.py).

    sudo python benchmarks/mem_limit.py --model gemma3-270m --limit 224M --budget 24M -n 32

Needs root (to create the cgroup; v1 ``/sys/fs/cgroup/memory`` or v2 ``/sys/fs/cgroup``) and
llama.cpp's ``llama-completion`` (``$LMAP_LLAMA_BIN`` or ``--llama-bin``). Prints tok/s, wall
time, the cgroup's peak usage and OOM kills for each run, and the lmap / llama.cpp ratios.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmap.registry import resolve_model  # noqa: E402
from lmap.residency import parse_size  # noqa: E402


class MemCgroup:
    """A child memory cgroup of this process's own, with a hard limit; removed on exit."""

    def __init__(self, limit: int, name: str) -> None:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
        v1 = [ln.split(":", 2)[2] for ln in lines if ln.split(":", 2)[1] == "memory"]
        if v1 and Path("/sys/fs/cgroup/memory").is_dir():
            self.dir = Path("/sys/fs/cgroup/memory") / v1[0].lstrip("/") / name
            self.limit_file, self.peak_file, self.v2 = "memory.limit_in_bytes", "memory.max_usage_in_bytes", False
        else:
            v2 = [ln.split(":", 2)[2] for ln in lines if ln.startswith("0::")]
            if not v2 or not Path("/sys/fs/cgroup/cgroup.controllers").exists():
                raise SystemExit("no memory cgroup found (neither v1 /sys/fs/cgroup/memory nor v2 /sys/fs/cgroup)")
            self.dir = Path("/sys/fs/cgroup") / v2[0].lstrip("/") / name
            self.limit_file, self.peak_file, self.v2 = "memory.max", "memory.peak", True
        try:
            self.dir.mkdir()
            (self.dir / self.limit_file).write_text(str(limit))
        except OSError as e:
            raise SystemExit(f"cannot create the memory cgroup {self.dir} ({e.strerror}); run as root") from None

    def enter(self) -> None:
        """Move the calling process (a child, before exec) into the group."""
        (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        try:
            return int((self.dir / self.peak_file).read_text())
        except (OSError, ValueError):
            return 0

    def oom_kills(self) -> int:
        f = self.dir / ("memory.events" if self.v2 else "memory.oom_control")
        m = re.search(r"oom_kill (\d+)", f.read_text()) if f.exists() else None
        return int(m.group(1)) if m else 0

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.dir.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_in_cgroup(cmd: list[str], limit: int, name: str, timeout: float) -> dict[str, object]:
    cg = MemCgroup(limit, name)
    try:
        t = time.perf_counter()
        p = subprocess.run(
            cmd, preexec_fn=cg.enter, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        wall = time.perf_counter() - t
        return {"rc": p.returncode, "wall_s": wall, "out": p.stdout, "err": p.stderr, "peak": cg.peak(),
                "oom": cg.oom_kills()}  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"rc": -1, "wall_s": timeout, "out": "", "err": "timeout", "peak": cg.peak(), "oom": cg.oom_kills()}
    finally:
        cg.remove()


def parse_lmap(err: str) -> tuple[float, float]:
    """(prompt tok/s, decode tok/s) from ``lmap run``'s timing line."""
    m = re.search(r"prompt: \d+ tokens, \d+ ms, ([\d.]+) tok/s \| decode: \d+ tokens, \d+ ms, ([\d.]+) tok/s", err)
    return (float(m.group(1)), float(m.group(2))) if m else (0.0, 0.0)


def parse_llama(err: str) -> tuple[float, float]:
    pp = re.search(r"prompt eval time =.*?([\d.]+) tokens per second", err)
    tg = re.search(r"\beval time =.*?runs.*?([\d.]+) tokens per second", err)
    return (float(pp.group(1)) if pp else 0.0, float(tg.group(1)) if tg else 0.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--limit", default="224M", help="cgroup memory limit for each run (default 224M)")
    ap.add_argument("--budget", default="24M", help="lmap --mem-budget (default 24M)")
    ap.add_argument("-n", type=int, default=32, help="tokens to generate (default 32)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--prompt", default="The three primary colors are")
    ap.add_argument("--repeat", type=int, default=1, help="alternating runs of each (default 1)")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per run (default 900)")
    ap.add_argument("--llama-bin", default=os.environ.get("LMAP_LLAMA_BIN", ""))
    args = ap.parse_args()
    limit = parse_size(args.limit, "--limit")
    src = resolve_model(args.model)
    llama = Path(args.llama_bin) / "llama-completion"
    if not llama.exists():
        raise SystemExit(f"{llama}: not found (set $LMAP_LLAMA_BIN or --llama-bin)")
    with tempfile.TemporaryDirectory(prefix="lmap-memlimit-") as d:
        model = Path(d) / src.name  # a private copy: nobody else maps it, so evicting its pages works
        shutil.copyfile(src, model)
        size = model.stat().st_size
        print(f"model {src.name}: {size / 2**20:.0f} MiB; cgroup limit {limit / 2**20:.0f} MiB; lmap --mem-budget "
              f"{args.budget}; {args.n} tokens, {args.threads} threads, cold cache each run")  # fmt: skip
        if limit >= size:
            print("warning: the limit is not smaller than the model", file=sys.stderr)
        common = ["-p", args.prompt, "-n", str(args.n), "-t", str(args.threads), "-c", "256", "--temp", "0"]
        cmds = {
            "lmap": [sys.executable, "-m", "lmap", "run", "-m", str(model), "--raw", "--mem-budget", args.budget,
                     *common],
            "llama.cpp": [str(llama), "-m", str(model), "-no-cnv", *common],
        }  # fmt: skip
        results: dict[str, list[dict[str, object]]] = {k: [] for k in cmds}
        for i in range(args.repeat):
            for name, cmd in cmds.items():
                evict(model)
                r = run_in_cgroup(cmd, limit, f"lmap-bench-{os.getpid()}-{i}-{name.replace('.', '')}", args.timeout)
                r["pp"], r["tg"] = (parse_lmap if name == "lmap" else parse_llama)(str(r["err"]))
                results[name].append(r)
                text = str(r["out"]).replace("\n", " ")[len(args.prompt) : len(args.prompt) + 60]
                print(
                    f"{name:10s} rc={r['rc']} wall {r['wall_s']:.1f} s  prompt {r['pp']:.2f} tok/s  decode "
                    f"{r['tg']:.2f} tok/s  cgroup peak {int(r['peak']) / 2**20:.0f} MiB  oom kills {r['oom']}  "
                    f"text: {text!r}"
                )
                if name == "lmap":
                    for line in str(r["err"]).splitlines():
                        if line.startswith("mem budget"):
                            print(f"           {line}")
                if r["rc"] != 0:
                    print(str(r["err"])[-2000:], file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(float(r[key]) for r in results[name])  # type: ignore[arg-type]

    if all(r["rc"] == 0 for rs in results.values() for r in rs):
        tg = med("lmap", "tg") / med("llama.cpp", "tg")
        wall = med("lmap", "wall_s") / med("llama.cpp", "wall_s")
        print(
            f"ratio lmap / llama.cpp under {limit / 2**20:.0f} MiB: decode tok/s x{tg:.2f}, "
            f"wall time x{wall:.2f} (lower is faster)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
