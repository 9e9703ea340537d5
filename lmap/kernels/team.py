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
import threading
import time

import numpy as np
from llvmlite import ir
from numba import carray, njit, types
from numba.extending import intrinsic

from ..quants.q8_k import quantize_q8_k
from . import chunks, ops
from .atomics import atomic_add, atomic_cas, atomic_load, atomic_or, atomic_store, cpu_relax, store_f32  # noqa: F401

_i64 = ir.IntType(64)
_f32 = ir.FloatType()


def _pointer_from(dtype):  # type: ignore[no-untyped-def]
    ptr_t = types.CPointer(dtype)

    @intrinsic
    def pointer(typingctx, addr):  # type: ignore[no-untyped-def]
        def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.inttoptr(args[0], context.get_value_type(ptr_t))

        return ptr_t(types.int64), codegen

    return pointer


_f32_ptr = _pointer_from(types.float32)
_u16_ptr = _pointer_from(types.uint16)
_i32_ptr = _pointer_from(types.int32)


# -- the job ----------------------------------------------------------------------------
MAX_MATS = 4

# ctrl: int64 words, each on its own 64-byte line so the threads do not false-share
# HELPED: chunks the helpers computed, ever; WAKES: times a sleeping helper was woken, ever
WORD, DONE, SLEEPERS, STOP, HELPED, WAKES = 0, 8, 16, 24, 32, 40
CTRL_WORDS = 48
# job: int64 fields
KERNEL, NB, NCHUNKS, CHUNK_ROWS, NSEQ, X, XD, XS, XSTRIDE, DSTRIDE, NMAT, KIND = range(12)
MAT0, MAT_FIELDS = 16, 8  # per matrix: w address, row stride, rows, out address, out row stride, first chunk
JOB_WORDS = MAT0 + MAT_FIELDS * MAX_MATS
# KIND: what a chunk is. PRODUCTS: rows of up to MAX_MATS matrices (the fields above);
# ATTENTION: one (query row, head) of decode attention over a half-precision cache, with these
# fields from MAT0 on (addresses; SCALE and SOFTCAP hold float64 bits)
PRODUCTS, ATTENTION = 0, 1
(A_Q, A_K, A_V, A_POS, A_CELL_POS, A_SPANS, A_SCORES, A_SCORES_STRIDE, A_OUT) = range(MAT0, MAT0 + 9)
(A_N, A_H, A_HKV, A_HD, A_C, A_WINDOW, A_SCALE, A_SOFTCAP) = range(MAT0 + 9, MAT0 + 17)


@intrinsic
def _call_chunk(typingctx, fn, w, ws, r0, r1, x, xd, xs, xst, dst, n, nb, out, ost):  # type: ignore[no-untyped-def]
    """Call the chunk kernel at address ``fn`` (a cfunc of chunks.py: void(int64 x 13))."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fnty = ir.FunctionType(ir.VoidType(), [_i64] * 13)
        builder.call(builder.inttoptr(args[0], fnty.as_pointer()), args[1:])
        return context.get_dummy_value()

    return types.void(*([types.int64] * 14)), codegen


@njit(cache=True, fastmath=True)  # ops.attention_spans' flags: the inlined _attend must compile alike
def _attend_chunk(job, c, tid):  # type: ignore[no-untyped-def]
    """Attention of query heads [c * per, (c + 1) * per): item i is row i // H, head i % H, over that
    row's span, with its scores in row ``tid`` of the scratch."""
    n, nh, nkv, hd, ncell = job[A_N], job[A_H], job[A_HKV], job[A_HD], job[A_C]
    q = carray(_f32_ptr(job[A_Q]), (n, nh, hd))
    k = carray(_u16_ptr(job[A_K]), (ncell, nkv, hd))
    v = carray(_u16_ptr(job[A_V]), (ncell, nkv, hd))
    pos = carray(_i32_ptr(job[A_POS]), (n,))
    cell_pos = carray(_i32_ptr(job[A_CELL_POS]), (ncell,))
    spans = carray(_i32_ptr(job[A_SPANS]), (n, 2))
    scores = carray(_f32_ptr(job[A_SCORES] + tid * job[A_SCORES_STRIDE]), (ncell,))
    out = carray(_f32_ptr(job[A_OUT]), (n, nh, hd))
    jf = job.view(np.float64)
    sc = np.float32(jf[A_SCALE])
    per = job[CHUNK_ROWS]
    for i in range(c * per, min((c + 1) * per, n * nh)):
        t = i // nh
        c0, c1 = spans[t, 0], spans[t, 1]
        ops._attend_item(q, k, v, pos, cell_pos, i, c0, c1, sc, job[A_WINDOW], jf[A_SOFTCAP], scores, out)


@njit(cache=True)
def _chunk(job, c, tid):  # type: ignore[no-untyped-def]
    """Rows of chunk ``c``: out[j, r] = dot(row r, activations j) for every activation row j."""
    if job[KIND] == ATTENTION:
        _attend_chunk(job, c, tid)
        return
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
def _work(ctrl, job, tid):  # type: ignore[no-untyped-def]
    """Claim and compute chunks of the current job until none is left; returns how many were done here.

    ``tid``: this thread's slot in the team (0: the caller), for per-thread scratch.
    """
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
            _chunk(job, v & 0xFFFFFFFF, tid)
            atomic_add(done, 1)
            did += 1
        v = atomic_load(word)


@njit(cache=True, nogil=True)
def _serve(ctrl, job, spin_limit, tid):  # type: ignore[no-untyped-def]
    """A team thread's loop: work while jobs come; returns 0 after ``spin_limit`` idle spins, 1 on stop."""
    stop = ctrl.ctypes.data + 8 * STOP
    idle = 0
    while True:
        if atomic_load(stop) != 0:
            return 1
        did = _work(ctrl, job, tid)
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
    _retire(ctrl)
    ws = (w0, w1, w2, w3)
    outs = (o0, o1, o2, o3)
    n, k = x.shape
    if q8_k:
        for j in range(n):
            quantize_q8_k(x[j], xq[j, :k], xd[j], xs[j])
        nb = k // 256
        dst = xd.strides[0]
    else:
        # block-major scales: a block's scales of all rows are adjacent (simd_multi._dots32)
        nb = k // 32
        rows = xd.shape[0]
        xdt = xd.reshape(-1)[: nb * rows].reshape(nb, rows)
        xst_ = xs.reshape(-1)[: nb * rows].reshape(nb, rows)
        for j in range(n):
            ops.quantize_q8(x[j], xq[j, :k], xdt[:, j], xst_[:, j])
        dst = 4 * rows
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
    job[DSTRIDE] = dst
    job[NMAT] = nmat
    job[KIND] = PRODUCTS
    _publish_and_work(ctrl, job, c0)


@njit(cache=True)
def _retire(ctrl):  # type: ignore[no-untyped-def]
    """Close the finished job to claims before its fields are rewritten.

    A helper may have loaded the job word just before the last chunk was claimed and act on it
    later: once the caller starts writing the next job's fields, that stale word plus a fresh
    chunk count would let its compare-and-swap claim a chunk of a half-written job (seen as a
    wrong first chunk on a fresh team, and as a miscounted ``done``). Saturating the chunk index
    (keeping the tag) makes every such compare-and-swap fail, and every fresh look find nothing
    to claim, until the next job is published. Acquire-release: none of the writes that follow
    can be moved before it.
    """
    atomic_or(ctrl.ctypes.data + 8 * WORD, 0xFFFFFFFF)


@njit(cache=True)
def _publish_and_work(ctrl, job, n_chunks):  # type: ignore[no-untyped-def]
    """Tag the filled-in job as new, work on it with the team, return when all chunks are done."""
    word = ctrl.ctypes.data + 8 * WORD
    done = ctrl.ctypes.data + 8 * DONE
    tag = ((atomic_load(word) >> 32) + 1) & 0x7FFFFFFF
    atomic_store(done, 0)
    atomic_store(word, tag << 32)  # release: the fields above are visible to whoever sees the tag
    _work(ctrl, job, 0)
    while atomic_load(done) < n_chunks:
        cpu_relax()


@njit(cache=True, nogil=True)
def _run_attention(ctrl, job, q, k, v, pos, cell_pos, spans, scale, window, softcap, scores, out, n_threads):  # type: ignore[no-untyped-def]
    """ops.attention_spans over a half-precision cache, its (row, head) pairs shared by the team.

    Each pair is ops._attend_item with the same arguments the serial kernel gives it, so the
    result is bit for bit the same. Compiled code does not check bounds, so the shapes and strides
    are checked here first: returns False, having done nothing, when the arrays do not fit.
    """
    n, nh, hd = q.shape
    ncell, nkv = k.shape[0], k.shape[1]
    fits = (
        v.shape == k.shape
        and k.shape[2] == hd
        and nkv > 0
        and nh % nkv == 0
        and out.shape == q.shape
        and pos.shape[0] >= n
        and spans.shape[0] >= n
        and spans.shape[1] == 2
        and cell_pos.shape[0] >= ncell
        and scores.shape[0] >= n_threads
        and q.strides[2] == 4
        and q.strides[1] == 4 * hd
        and q.strides[0] == 4 * hd * nh
        and out.strides == q.strides
        and k.strides[2] == 2
        and k.strides[1] == 2 * hd
        and k.strides[0] == 2 * hd * nkv
        and v.strides == k.strides
        and spans.strides[1] == 4
        and spans.strides[0] == 8
        and pos.strides[0] == 4
        and cell_pos.strides[0] == 4
        and scores.strides[1] == 4
    )
    for t in range(n):
        if not fits:
            break
        fits = 0 <= spans[t, 0] <= spans[t, 1] <= ncell and spans[t, 1] - spans[t, 0] <= scores.shape[1]
    if not fits:
        return False
    _retire(ctrl)
    job[A_Q] = q.ctypes.data
    job[A_K] = k.ctypes.data
    job[A_V] = v.ctypes.data
    job[A_POS] = pos.ctypes.data
    job[A_CELL_POS] = cell_pos.ctypes.data
    job[A_SPANS] = spans.ctypes.data
    job[A_SCORES] = scores.ctypes.data
    job[A_SCORES_STRIDE] = scores.strides[0]
    job[A_OUT] = out.ctypes.data
    job[A_N] = n
    job[A_H] = nh
    job[A_HKV] = k.shape[1]
    job[A_HD] = hd
    job[A_C] = k.shape[0]
    job[A_WINDOW] = window
    jf = job.view(np.float64)
    jf[A_SCALE] = scale
    jf[A_SOFTCAP] = softcap
    # a few chunks per thread: an item is ~1 us at short contexts, and every claim is a contended
    # cache line (one item per chunk made the team slower than one thread)
    items = n * nh
    per = max(1, (items + 4 * n_threads - 1) // (4 * n_threads))
    n_chunks = (items + per - 1) // per
    job[CHUNK_ROWS] = per
    job[NCHUNKS] = n_chunks
    job[KIND] = ATTENTION
    _publish_and_work(ctrl, job, n_chunks)
    return True


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
        if self.n_threads > 1:
            # The helpers' own kernels are loaded here, before they start: loaded on a helper, the
            # load's ~50 calls into LLVM each waited for the GIL this thread holds (30 ms instead
            # of 2), and this thread's next kernel waited for Numba's compiler lock meanwhile.
            self.ctrl[STOP] = 1
            _serve(self.ctrl, self.job, self.spin_limit, 1)  # returns at once: told to stop
            self.ctrl[STOP] = 0
            atomic_add_py(self.ctrl, WAKES, 0)
        for i in range(self.n_threads - 1):
            ev = threading.Event()
            t = threading.Thread(target=self._loop, args=(ev, i + 1), name=f"lmap-team-{i + 1}", daemon=True)
            self.wake.append(ev)
            self.threads.append(t)
            t.start()

    def _calibrate(self) -> int:
        _spin(self.ctrl, 1000)
        t0 = time.perf_counter()
        _spin(self.ctrl, 20000)
        per_spin = max((time.perf_counter() - t0) / 20000, 1e-9)
        return max(1000, int(self.IDLE_SECONDS / per_spin))

    def _loop(self, ev: threading.Event, tid: int) -> None:
        while _serve(self.ctrl, self.job, self.spin_limit, tid) == 0:
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

    def attention(self, q, k, v, pos, cell_pos, spans, scale, window, softcap, scores, out) -> None:  # type: ignore[no-untyped-def]
        """ops.attention_spans (half-precision cache: k, v uint16) with its (row, head) pairs shared by the team."""
        if self.ctrl[SLEEPERS] > 0:
            for ev in self.wake:
                ev.set()
        if not _run_attention(
            self.ctrl, self.job, q, k, v, pos, cell_pos, spans, scale, window, softcap, scores, out, self.n_threads
        ):
            raise ValueError("team attention: the arrays do not have the shapes the kernel needs")

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
