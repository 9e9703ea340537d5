"""Bounded load test of ``lmap serve``: many streaming clients, errors, server RSS over time, tok/s.

    python benchmarks/load_test.py [-m smollm2-135m] [--parallel 4] [--clients 16] [--duration 120]

Starts its own server on a free localhost port, then

1. single stream: one client sends streaming chat requests back to back for ``--single-duration``
   seconds (the rate one user sees);
2. load: ``--clients`` clients do the same at once for ``--duration`` seconds, against
   ``--parallel`` slots (the rest queue); the server's VmRSS is sampled every second;

and stops everything by itself. It reports errors, completed requests, aggregate completion
tokens/s against the single-stream rate, and RSS at the start / end / peak of the load phase with
its slope over the second half (flat means no growth per request). Rates count completion tokens
over wall time, prompt processing included, as a client experiences them. Only stdlib HTTP is used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = [
    "Tell me a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "Write a haiku about autumn, then explain it.",
    "List some facts about the moon.",
    "Describe a busy market in the morning.",
    "What makes a good cup of tea?",
    "Give advice to someone learning to cook.",
    "Describe the water cycle to a child.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def thread_cpu(pid: int) -> tuple[float, float]:
    """CPU seconds used so far by the process's main thread (the server's event loop) and by all its threads."""
    tick = os.sysconf("SC_CLK_TCK")
    main = total = 0.0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        sec = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        total += sec
        if task.name == str(pid):
            main = sec
    return main, total


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens = 0
        self.requests = 0
        self.errors: list[str] = []


def one_request(port: int, i: int, max_tokens: int, stats: Stats) -> None:
    body = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}: {r.read()[:200]!r}")
        n, done = 0, False
        for raw in r:
            line = raw.strip()
            if not line.startswith(b"data: "):
                continue
            data = line[6:]
            if data == b"[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                n = chunk["usage"]["completion_tokens"]
        if not done:
            raise RuntimeError("stream ended without [DONE]")
        with stats.lock:
            stats.tokens += n
            stats.requests += 1
    except Exception as e:  # every failure is counted and reported, none stops the test
        with stats.lock:
            stats.errors.append(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def run_clients(port: int, n_clients: int, duration: float, max_tokens: int) -> tuple[Stats, float]:
    stats = Stats()
    t_end = time.monotonic() + duration

    def client(c: int) -> None:
        i = c
        while time.monotonic() < t_end:
            one_request(port, i, max_tokens, stats)
            i += n_clients

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=120.0, help="seconds of load (default 120)")
    ap.add_argument("--single-duration", type=float, default=30.0, help="seconds of single-stream baseline")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("-c", "--ctx-size", type=int, default=1024)
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()

    port = free_port()
    cmd = [sys.executable, "-m", "lmap.server", "-m", args.model, "--port", str(port)]
    cmd += ["--parallel", str(args.parallel), "-c", str(args.ctx_size)]
    if args.threads:
        cmd += ["-t", str(args.threads)]
    srv = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if srv.poll() is not None:
                print(srv.stderr.read() if srv.stderr else "", file=sys.stderr)
                raise SystemExit("server exited before it came up")
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not come up in 300 s")
            time.sleep(0.5)

        one_request(port, 0, 8, Stats())  # first request pays for any lazy set-up
        single, t_single = run_clients(port, 1, args.single_duration, args.max_tokens)
        single_rate = single.tokens / t_single
        print(
            f"single stream: {single.requests} requests, {single.tokens} tokens in {t_single:.1f} s "
            f"= {single_rate:.1f} tok/s, errors {len(single.errors)}",
            flush=True,
        )

        samples: list[tuple[float, float]] = []
        stop = threading.Event()

        def sample() -> None:
            t0 = time.monotonic()
            while not stop.is_set():
                samples.append((time.monotonic() - t0, rss_mib(srv.pid)))
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        cpu0 = thread_cpu(srv.pid)
        load, t_load = run_clients(port, args.clients, args.duration, args.max_tokens)
        cpu1 = thread_cpu(srv.pid)
        stop.set()
        sampler.join()
        agg = load.tokens / t_load
        rss = [r for _, r in samples]
        half = [(t, r) for t, r in samples if t >= samples[-1][0] / 2]
        slope = statistics.linear_regression([t for t, _ in half], [r for _, r in half]).slope if len(half) > 2 else 0
        print(
            f"load: {args.clients} clients x {t_load:.0f} s on {args.parallel} slots: {load.requests} requests, "
            f"{load.tokens} tokens = {agg:.1f} tok/s aggregate ({agg / single_rate:.2f}x single stream), "
            f"errors {len(load.errors)}"
        )
        print(
            f"server RSS MiB: start {rss[0]:.1f}, end {rss[-1]:.1f}, peak {max(rss):.1f}; "
            f"slope over the second half {slope * 60:+.2f} MiB/min"
        )
        loop_cpu, all_cpu = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
        print(
            f"server CPU during the load: {all_cpu / t_load:.2f} cores, of which the HTTP event loop "
            f"{loop_cpu / t_load:.2f} ({loop_cpu / max(load.tokens, 1) * 1e6:.0f} us per token)"
        )
        for e in load.errors[:5] + single.errors[:5]:
            print("  error:", e)
        if args.json:
            Path(args.json).write_text(
                json.dumps(
                    {
                        "args": vars(args),
                        "single_tok_s": single_rate,
                        "aggregate_tok_s": agg,
                        "ratio": agg / single_rate,
                        "requests": load.requests,
                        "errors": len(load.errors) + len(single.errors),
                        "rss_mib": samples,
                        "rss_slope_mib_per_min": slope * 60,
                    },
                    indent=1,
                )
            )
        return 1 if load.errors or single.errors else 0
    finally:
        srv.terminate()
        try:
            srv.wait(timeout=20)
        except subprocess.TimeoutExpired:
            srv.kill()


if __name__ == "__main__":
    sys.exit(main())
