"""Scalar helpers of llama.cpp's quantizers (ggml-quants.c), ported step for step to Numba.

Every function here works on one small group of float32 values and reproduces the C
reference bit for bit: all arithmetic stays in float32 in the C order of operations
(fastmath off, so LLVM neither reassociates sums nor fuses multiply-adds, like GCC at -O3
without -march), ints are converted to float only where C converts them, and
``nearest_int`` is the C's own 1.5 * 2^23 trick (round half to even, wrapping past 2^22 as
the C does) through a bit cast.

Groups are passed as (array, offset, n) so the callers can work in place on a row.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ..kernels.half import float_to_half, half_to_float

F0 = np.float32(0.0)
F1 = np.float32(1.0)
GROUP_MAX_EPS = np.float32(1e-15)
_MAGIC = np.float32(12582912.0)  # 1.5 * 2^23


@intrinsic
def f32_bits(typingctx, x):  # type: ignore[no-untyped-def]
    """int32 whose bits are those of the float32 ``x`` (C's memcpy(&i, &f, 4))."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@njit(cache=True, inline="always")
def nearest_int(v: float) -> int:
    """llama.cpp's nearest_int: v + 1.5 * 2^23 in float32, then the low mantissa bits."""
    i = f32_bits(np.float32(np.float32(v) + _MAGIC))
    return np.int32((i & 0x007FFFFF) - 0x00400000)


@njit(cache=True, inline="always")
def fp16_round(v: float) -> np.float32:
    """The float32 value of v stored as IEEE half (GGML_FP16_TO_FP32(GGML_FP32_TO_FP16(v)))."""
    return half_to_float(float_to_half(np.float32(v)))


@njit(cache=True, inline="always")
def store_f16(out: np.ndarray, r: int, o: int, v: float) -> None:
    """Write v as little-endian IEEE half bytes at out[r, o : o + 2]."""
    h = float_to_half(np.float32(v))
    out[r, o] = np.uint8(h & 0xFF)
    out[r, o + 1] = np.uint8(h >> 8)


@njit(cache=True, inline="always")
def load_f16(out: np.ndarray, r: int, o: int) -> np.float32:
    """The float32 value of the half stored at out[r, o : o + 2]."""
    return half_to_float(np.uint16(out[r, o]) | (np.uint16(out[r, o + 1]) << np.uint16(8)))


@njit(cache=True)
def make_qx_quants(
    n: int, nmax: int, x: np.ndarray, L: np.ndarray, qw: np.ndarray, qo: int, use_qw: bool
) -> np.float32:
    """Symmetric scale for x[:n] with levels -nmax..nmax-1; L[i] = level + nmax. Returns the scale.

    The C's rmse_type 1 (the only one its quantizers use): weights qw[qo : qo + n] when
    ``use_qw``, else x^2; the start iscale = -nmax / max and 18 neighbours are tried.
    """
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = np.float32(-nmax) / mx
    sumlx = F0
    suml2 = F0
    for i in range(n):
        q = nearest_int(iscale * x[i])
        q = max(-nmax, min(nmax - 1, q))
        L[i] = q + nmax
        w = qw[qo + i] if use_qw else x[i] * x[i]
        fl = np.float32(q)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != 0 else F0
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(np.float32(nmax) + np.float32(0.1) * np.float32(step)) / mx
        sumlx = F0
        suml2 = F0
        for i in range(n):
            q = nearest_int(iscale * x[i])
            q = max(-nmax, min(nmax - 1, q))
            w = qw[qo + i] if use_qw else x[i] * x[i]
            fl = np.float32(q)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                q = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, q))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def make_q3_quants(n: int, nmax: int, x: np.ndarray, L: np.ndarray, do_rmse: bool) -> np.float32:
    """Q3_K's symmetric group search (weights x^2, coordinate descent); L[i] = level + nmax."""
    mx = F0
    amax = F0
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            mx = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = np.float32(-nmax) / mx
    if do_rmse:
        sumlx = F0
        suml2 = F0
        for i in range(n):
            q = nearest_int(iscale * x[i])
            q = max(-nmax, min(nmax - 1, q))
            L[i] = q
            w = x[i] * x[i]
            fl = np.float32(q)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for _itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                fli = np.float32(L[i])
                slx = sumlx - w * x[i] * fli
                if slx > 0:
                    sl2 = suml2 - w * fli * fli
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fn = np.float32(new_l)
                        slx += w * x[i] * fn
                        sl2 += w * fn * fn
                        if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > 0 else F0
    for i in range(n):
        q = nearest_int(iscale * x[i])
        q = max(-nmax, min(nmax - 1, q))
        L[i] = q + nmax
    return F1 / iscale


@njit(cache=True)
def make_qkx2_quants(
    n: int,
    nmax: int,
    x: np.ndarray,
    weights: np.ndarray,
    L: np.ndarray,
    Laux: np.ndarray,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.float32, np.float32]:
    """Asymmetric (scale, min) search for x[:n], levels 0..nmax; returns (scale, -min) as C (ret, *the_min)."""
    rmin32 = np.float32(rmin)
    rdelta32 = np.float32(rdelta)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F0
    if mx == mn:
        for i in range(n):
            L[i] = 0
        return F0, -mn
    iscale = np.float32(nmax) / (mx - mn)
    scale = F1 / iscale
    best_error = F0
    for i in range(n):
        q = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, q))
        diff = scale * np.float32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error += weights[i] * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin32 + rdelta32 * np.float32(step) + np.float32(nmax)) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            q = nearest_int(iscale * (x[i] - mn))
            q = max(0, min(nmax, q))
            Laux[i] = q
            w = weights[i]
            fl = np.float32(q)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            cur_error = F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error += weights[i] * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True)
def make_qkx3_quants(
    n: int,
    nmax: int,
    x: np.ndarray,
    weights: np.ndarray,
    use_w: bool,
    L: np.ndarray,
    Laux: np.ndarray,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
) -> tuple[np.float32, np.float32]:
    """make_qkx2_quants with optional weights (x^2 unless ``use_w``) and a ``max <= min`` test; -> (scale, -min)."""
    rmin32 = np.float32(rmin)
    rdelta32 = np.float32(rdelta)
    mn = x[0]
    mx = x[0]
    sum_w = weights[0] if use_w else x[0] * x[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < mn:
            mn = x[i]
        if x[i] > mx:
            mx = x[i]
        w = weights[i] if use_w else x[i] * x[i]
        sum_w += w
        sum_x += w * x[i]
    if mn > 0:
        mn = F0
    if mx <= mn:
        for i in range(n):
            L[i] = 0
        return F0, -mn
    iscale = np.float32(nmax) / (mx - mn)
    scale = F1 / iscale
    best_mad = F0
    for i in range(n):
        q = nearest_int(iscale * (x[i] - mn))
        L[i] = max(0, min(nmax, q))
        diff = scale * np.float32(L[i]) + mn - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i] if use_w else x[i] * x[i]
        best_mad += w * diff
    if nstep < 1:
        return scale, -mn
    for step in range(nstep + 1):
        iscale = (rmin32 + rdelta32 * np.float32(step) + np.float32(nmax)) / (mx - mn)
        sum_l = F0
        sum_l2 = F0
        sum_xl = F0
        for i in range(n):
            q = nearest_int(iscale * (x[i] - mn))
            q = max(0, min(nmax, q))
            Laux[i] = q
            w = weights[i] if use_w else x[i] * x[i]
            fl = np.float32(q)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F0
                this_scale = sum_xl / sum_l2
            mad = F0
            for i in range(n):
                diff = this_scale * np.float32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i] if use_w else x[i] * x[i]
                mad += w * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                mn = this_min
    return scale, -mn


@njit(cache=True)
def make_qp_quants(n: int, nmax: int, x: np.ndarray, L: np.ndarray, qw: np.ndarray) -> np.float32:
    """Scale for non-negative x[:n] (sub-block scales or mins) with levels 0..nmax, weighted by qw."""
    mx = F0
    for i in range(n):
        mx = max(mx, x[i])
    if mx < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return F0
    iscale = np.float32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF  # L is uint8_t in the C: a negative level wraps
    scale = F1 / iscale
    best_mse = F0
    for i in range(n):
        diff = x[i] - scale * np.float32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (np.float32(0.1) * np.float32(step) + np.float32(nmax)) / mx
        scale_is = F1 / iscale_is
        mse = F0
        for i in range(n):
            q = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * np.float32(q)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = F0
    suml2 = F0
    for i in range(n):
        q = min(nmax, nearest_int(iscale * x[i]))
        L[i] = q & 0xFF
        w = qw[i]
        fl = np.float32(q)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for _itry in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            fli = np.float32(L[i])
            slx = sumlx - w * x[i] * fli
            sl2 = suml2 - w * fli * fli
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = np.float32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else F0
