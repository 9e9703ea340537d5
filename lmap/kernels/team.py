"""A team of spinning threads for decoding's many small mat-vecs.

Why not ``prange``: a decode step makes 120-210 mat-vecs of 5-80 µs each, and Numba's
pools put their threads to sleep between launches. Waking a sleeping thread costs
10-30 µs in a VM, so at ``-t 2`` decode was barely faster than at ``-t 1`` (SmolLM2:
77 vs 73 tok/s, every small launch slower with two threads than with one). llama.cpp
keeps its threads spinning between operations; this does the same, within Numba:

* each extra thread is a Python thread running a ``nogil`` compiled loop that spins on
  a shared job word and claims chunks of rows with compare-and-swap, so no launch ever
  waits for a thread: the caller works through the chunks too, and a thread that is
  late (or asleep) simply does fewer;
* a thread that has found no work for ~1 ms returns to Python and sleeps on an Event,
  so prompt processing (BLAS threads) and other processes get the core back;
* the products are the formats' own row-dot intrinsics with the same activation
  quantization, so the results are bit-for-bit those of the ``prange`` kernels.

A job is up to ``MAX_MATS`` matrices of one format sharing one input (Q/K/V, gate/up),
for ``n`` activation rows (the server's sequences: each weight row is read once for all).
"""

from __future__ import annotations

import atexit
import os
import platform
import threading
import time

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..quants.q8_k import quantize_q8_k
from . import chunks, ops

_i64 = ir.IntType(64)
_f32 = ir.FloatType()
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


# -- atomics (Numba has none; these are single LLVM instructions) -------------------------
@intrinsic
def atomic_load(typingctx, addr):  # type: ignore[no-untyped-def]
    """Acquire-load of the int64 at ``addr``."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.load_atomic(builder.inttoptr(args[0], _i64.as_pointer()), "acquire", 8)

    return types.int64(types.int64), codegen


@intrinsic
def atomic_store(typingctx, addr, value):  # type: ignore[no-untyped-def]
    """Release-store of ``value`` into the int64 at ``addr``."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.store_atomic(args[1], builder.inttoptr(args[0], _i64.as_pointer()), "release", 8)
        return context.get_dummy_value()

    return types.void(types.int64, types.int64), codegen


@intrinsic
def atomic_cas(typingctx, addr, expected, desired):  # type: ignore[no-untyped-def]
    """Compare-and-swap on the int64 at ``addr``; True when it held ``expected`` (now ``desired``)."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        ptr = builder.inttoptr(args[0], _i64.as_pointer())
        res = builder.cmpxchg(ptr, args[1], args[2], "acq_rel", "acquire")
        return builder.extract_value(res, 1)

    return types.boolean(types.int64, types.int64, types.int64), codegen


@intrinsic
def atomic_add(typingctx, addr, value):  # type: ignore[no-untyped-def]
    """Atomically add ``value`` to the int64 at ``addr``; returns the old value."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.atomic_rmw("add", builder.inttoptr(args[0], _i64.as_pointer()), args[1], "acq_rel")

    return types.int64(types.int64, types.int64), codegen


@intrinsic
def cpu_relax(typingctx):  # type: ignore[no-untyped-def]
    """The spin-wait hint (x86 ``pause``): frees the core's shared resources while spinning."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if _X86:
            mod = builder.module
            fn = mod.globals.get("llvm.x86.sse2.pause") or ir.Function(
                mod, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause"
            )
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def store_f32(typingctx, addr, value):  # type: ignore[no-untyped-def]
    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.store(args[1], builder.inttoptr(args[0], _f32.as_pointer()), align=4)
        return context.get_dummy_value()

    return types.void(types.int64, types.float32), codegen


# -- the job ----------------------------------------------------------------------------
MAX_MATS = 4

# ctrl: int64 words, each on its own 64-byte line so the threads do not false-share
# HELPED: chunks the helpers computed, ever; WAKES: times a sleeping helper was woken, ever
WORD, DONE, SLEEPERS, STOP, HELPED, WAKES = 0, 8, 16, 24, 32, 40
CTRL_WORDS = 48
# job: int64 fields
KERNEL, NB, NCHUNKS, CHUNK_ROWS, NSEQ, X, XD, XS, XSTRIDE, DSTRIDE, NMAT = range(11)
MAT0, MAT_FIELDS = 16, 8  # per matrix: w address, row stride, rows, out address, out row stride, first chunk
JOB_WORDS = MAT0 + MAT_FIELDS * MAX_MATS


@intrinsic
def _call_chunk(typingctx, fn, w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    """Call the chunk kernel at address ``fn`` (a cfunc of chunks.py: void(int64 x 13))."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.VoidType(), [_i64] * 13)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()

    return types.void(*([types.int64] * 14)), codegen


@njit(cache=True)
def _chunk(job, c):  # type: ignore[no-untyped-def]
    """Rows of chunk ``c``: out[j, r] = dot(row r, activations j) for every activation row j."""
    m = 0
    while m + 1 < job[NMAT] and c >= job[MAT0 + (m + 1) * MAT_FIELDS + 5]:
        m += 1
    f = MAT0 + m * MAT_FIELDS
    w, ws, rows, out, ost, c0 = job[f], job[f + 1], job[f + 2], job[f + 3], job[f + 4], job[f + 5]
    r0 = (c - c0) * job[CHUNK_ROWS]
    r1 = min(r0 + job[CHUNK_ROWS], rows)
    x, xd, xs, xst, dst, n, nb = job[X], job[XD], job[XS], job[XSTRIDE], job[DSTRIDE], job[NSEQ], job[NB]
    _call_chunk(job[KERNEL], w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost)


@njit(cache=True)
def _work(ctrl, job):  # type: ignore[no-untyped-def]
    """Claim and compute chunks of the current job until none is left; returns how many were done here."""
    word = ctrl.ctypes.data + 8 * WORD
    done = ctrl.ctypes.data + 8 * DONE
    did = 0
    v = atomic_load(word)
    while True:
        # fields read after the acquire-load belong to the job tagged in v, or to a later one:
        # then the CAS below fails, so a stale read is never acted on
        if (v & 0xFFFFFFFF) >= job[NCHUNKS]:
            return did
        if atomic_cas(word, v, v + 1):
            _chunk(job, v & 0xFFFFFFFF)
            atomic_add(done, 1)
            did += 1
        v = atomic_load(word)


@njit(cache=True, nogil=True)
def _serve(ctrl, job, spin_limit):  # type: ignore[no-untyped-def]
    """A team thread's loop: work while jobs come; returns 0 after ``spin_limit`` idle spins, 1 on stop."""
    stop = ctrl.ctypes.data + 8 * STOP
    idle = 0
    while True:
        if atomic_load(stop) != 0:
            return 1
        did = _work(ctrl, job)
        if did:
            atomic_add(ctrl.ctypes.data + 8 * HELPED, did)
            idle = 0
            continue
        idle += 1
        if idle >= spin_limit:
            atomic_add(ctrl.ctypes.data + 8 * SLEEPERS, 1)
            return 0
        cpu_relax()


@njit(cache=True, nogil=True)
def _spin(ctrl, n):  # type: ignore[no-untyped-def]
    """n idle spins (calibrates spin_limit to a duration)."""
    word = ctrl.ctypes.data + 8 * WORD
    s = 0
    for _ in range(n):
        s += atomic_load(word) & 1
        cpu_relax()
    return s


@njit(cache=True, nogil=True)
def _run(ctrl, job, kernel, q8_k, x, xq, xd, xs, w0, o0, w1, o1, w2, o2, w3, o3, nmat, n_threads):  # type: ignore[no-untyped-def]
    """Quantize x [n, k] (to Q8_K if ``q8_k``, else Q8_0/Q8_1), publish the job and work on it until done.

    ``kernel``: address of the format's chunk kernel (chunks.py).

    w0..w3: weight views [rows, bytes]; o0..o3: outputs [n, rows]; the first ``nmat`` are used.
    (Separate arguments, not tuples: Numba types a tuple of arrays in Python, ~1 µs per array.)
    """
    ws = (w0, w1, w2, w3)
    outs = (o0, o1, o2, o3)
    n, k = x.shape
    if q8_k:
        for j in range(n):
            quantize_q8_k(x[j], xq[j, :k], xd[j], xs[j])
        nb = k // 256
    else:
        for j in range(n):
            ops.quantize_q8(x[j], xq[j, :k], xd[j], xs[j])
        nb = k // 32
    total = 0
    for m in range(nmat):
        total += ws[m].shape[0]
    # ~8 chunks per thread balance a late thread; at least 16 rows keep the claim cost (a contended
    # cache line) small next to the rows' work
    chunk = max(16, (total + 8 * n_threads - 1) // (8 * n_threads))
    c0 = 0
    for m in range(nmat):
        f = MAT0 + m * MAT_FIELDS
        w, out = ws[m], outs[m]
        job[f] = w.ctypes.data
        job[f + 1] = w.strides[0]
        job[f + 2] = w.shape[0]
        job[f + 3] = out.ctypes.data
        job[f + 4] = out.strides[0]
        job[f + 5] = c0
        c0 += (w.shape[0] + chunk - 1) // chunk
    job[KERNEL] = kernel
    job[NB] = nb
    job[NCHUNKS] = c0
    job[CHUNK_ROWS] = chunk
    job[NSEQ] = n
    job[X] = xq.ctypes.data
    job[XD] = xd.ctypes.data
    job[XS] = xs.ctypes.data
    job[XSTRIDE] = xq.strides[0]
    job[DSTRIDE] = xd.strides[0]
    job[NMAT] = nmat
    word = ctrl.ctypes.data + 8 * WORD
    done = ctrl.ctypes.data + 8 * DONE
    tag = ((atomic_load(word) >> 32) + 1) & 0x7FFFFFFF
    atomic_store(done, 0)
    atomic_store(word, tag << 32)  # release: the fields above are visible to whoever sees the tag
    _work(ctrl, job)
    while atomic_load(done) < c0:
        cpu_relax()


class Team:
    """``n_threads - 1`` spinning helpers plus the calling thread; see the module docstring."""

    IDLE_SECONDS = 1e-3  # spin this long without work before sleeping

    def __init__(self, n_threads: int) -> None:
        self.n_threads = max(1, int(n_threads))
        self.ctrl = np.zeros(CTRL_WORDS, np.int64)
        self.job = np.zeros(JOB_WORDS, np.int64)
        self.lock = threading.Lock()  # one caller at a time; a second one uses its own helper-less team
        self.pid = os.getpid()
        self.wake: list[threading.Event] = []
        self.threads: list[threading.Thread] = []
        self.spin_limit = self._calibrate()
        for i in range(self.n_threads - 1):
            ev = threading.Event()
            t = threading.Thread(target=self._loop, args=(ev,), name=f"lmap-team-{i + 1}", daemon=True)
            self.wake.append(ev)
            self.threads.append(t)
            t.start()

    def _calibrate(self) -> int:
        _spin(self.ctrl, 1000)
        t0 = time.perf_counter()
        _spin(self.ctrl, 20000)
        per_spin = max((time.perf_counter() - t0) / 20000, 1e-9)
        return max(1000, int(self.IDLE_SECONDS / per_spin))

    def _loop(self, ev: threading.Event) -> None:
        while _serve(self.ctrl, self.job, self.spin_limit) == 0:
            ev.wait()
            ev.clear()
            atomic_add_py(self.ctrl, SLEEPERS, -1)
            atomic_add_py(self.ctrl, WAKES, 1)

    def run(self, fmt: str, x: np.ndarray, acts: object, ws: list, outs: list) -> None:
        """outs[m][j] = ws[m] @ x[j] for all weights of format ``fmt`` (at most MAX_MATS); acts: RowActs."""
        if self.ctrl[SLEEPERS] > 0:
            for ev in self.wake:
                ev.set()
        q, d, s = acts.q, acts.d, acts.s  # type: ignore[attr-defined]
        if x.shape[0] > q.shape[0] or x.shape[1] > q.shape[1]:  # compiled code does not check bounds
            raise ValueError(f"activations {x.shape} exceed the quantized scratch {q.shape}")
        kernel, q8_k = chunks.address(fmt), chunks.CHUNKS[fmt][1]
        n = len(ws)
        w0, o0 = ws[0], outs[0]
        w1, o1 = (ws[1], outs[1]) if n > 1 else (w0, o0)
        w2, o2 = (ws[2], outs[2]) if n > 2 else (w0, o0)
        w3, o3 = (ws[3], outs[3]) if n > 3 else (w0, o0)
        _run(self.ctrl, self.job, kernel, q8_k, x, q, d, s, w0, o0, w1, o1, w2, o2, w3, o3, n, self.n_threads)

    def stop(self) -> None:
        self.ctrl[STOP] = 1
        for ev in self.wake:
            ev.set()
        for t in self.threads:
            t.join(timeout=1.0)
        self.threads = []


@njit(cache=True)
def _add(ctrl, i, v):  # type: ignore[no-untyped-def]
    atomic_add(ctrl.ctypes.data + 8 * i, v)


def atomic_add_py(ctrl: np.ndarray, i: int, v: int) -> None:
    _add(ctrl, i, v)


_team: Team | None = None
_team_lock = threading.Lock()


def team(n_threads: int) -> Team:
    """The process's team, (re)started when the thread count changes or after a fork."""
    global _team
    t = _team
    if t is not None and t.n_threads == n_threads and t.pid == os.getpid():
        return t
    with _team_lock:
        t = _team
        if t is None or t.n_threads != n_threads or t.pid != os.getpid():
            if t is not None and t.pid == os.getpid():
                t.stop()
            t = _team = Team(n_threads)
    return t


@atexit.register
def _stop_team() -> None:
    if _team is not None and _team.pid == os.getpid():
        _team.stop()
