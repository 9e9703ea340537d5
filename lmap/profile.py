"""Where each millisecond of a token goes: a per-phase profile of decode and prompt passes.

``lmap bench --profile`` wraps the model's building blocks (every ``Model.matmul`` by tensor
role, attention with its KV store, norms, rope, the gated activation, residual adds, the
embedding gather) in timers for the duration of a run, then divides by the tokens evaluated.
What is not inside any block — the Python of the layer loop, argument checks, view slicing —
is reported as ``python glue`` (the forward pass's wall time minus the blocks), which is the
number that fused launches would remove.

The wrappers cost ~0.3 µs per call; with ~700 calls per token they add ~0.2 ms to the total,
which is reported as it is (the profile is for proportions, the bench table for speed).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

# ops functions timed, by the phase they are reported under
OPS_PHASES = {
    "rmsnorm": "norms",
    "rmsnorm_heads": "norms",
    "layernorm": "norms",
    "rope": "rope",
    "rope_cache": "rope",
    "swiglu": "activation",
    "geglu": "activation",
    "add_inplace": "residual adds",
    "scale_inplace": "residual adds",
}


@dataclass
class Profile:
    """Seconds and calls per phase over ``tokens`` evaluated tokens in ``wall`` seconds of forward passes."""

    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    calls: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    wall: float = 0.0
    tokens: int = 0

    def rows(self) -> list[tuple[str, float, float, int]]:
        """(phase, ms per token, share of the forward pass, calls per token), largest first, glue last."""
        n = max(self.tokens, 1)
        inside = sum(self.seconds.values())
        out = [
            (k, v * 1e3 / n, v / self.wall if self.wall else 0.0, self.calls[k] // n)
            for k, v in sorted(self.seconds.items(), key=lambda kv: -kv[1])
        ]
        glue = max(self.wall - inside, 0.0)
        out.append(("python glue", glue * 1e3 / n, glue / self.wall if self.wall else 0.0, 0))
        return out

    def table(self, title: str) -> str:
        n = max(self.tokens, 1)
        lines = [
            f"{title}: {self.wall * 1e3 / n:.3f} ms per token over {self.tokens} tokens",
            f"{'phase':<22}{'ms/token':>10}{'share':>8}{'calls/token':>13}",
        ]
        for name, ms, share, calls in self.rows():
            lines.append(f"{name:<22}{ms:>10.3f}{share * 100:>7.1f}%{calls:>13}")
        return "\n".join(lines)


def _role(tensor_name: str) -> str:
    # blk.3.attn_q.weight -> attn_q; output.weight -> output
    parts = tensor_name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


@contextmanager
def profiling(model: Any) -> Iterator[Profile]:
    """Time the blocks of ``model``'s forward passes while the ``with`` body runs.

    Every forward pass made inside the body (through any Llama holding this model) is counted;
    the wrappers are removed on exit, whatever happens.
    """
    from .kernels import ops
    from .models import base
    from .quants import QMatrix

    prof = Profile()
    saved: list[tuple[Any, str, Any]] = []

    def timed(owner: Any, name: str, phase: Callable[..., str] | str, static: bool = False) -> None:
        fn = getattr(owner, name)
        saved.append((owner, name, staticmethod(fn) if static else fn))

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            key = phase(*args) if callable(phase) else phase
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                prof.seconds[key] += time.perf_counter() - t
                prof.calls[key] += 1

        setattr(owner, name, staticmethod(wrapper) if static else wrapper)

    for name, phase in OPS_PHASES.items():
        if hasattr(ops, name):
            timed(ops, name, phase)
    timed(base.Model, "matmul", lambda w, *a: f"matmul {_role(w.name)}", static=True)
    timed(base.Model, "matmuls", lambda pairs, *a: "matmul " + "+".join(_role(w.name) for w, _ in pairs), static=True)
    timed(QMatrix, "gather", "embedding gather")
    timed(base.Model, "attention", "attention + kv store")
    cls = type(model)
    forward = cls.forward
    saved.append((cls, "forward", forward))

    def timed_forward(self: Any, tokens: Any, *args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return forward(self, tokens, *args, **kwargs)
        finally:
            prof.wall += time.perf_counter() - t
            prof.tokens += len(tokens)

    cls.forward = timed_forward
    try:
        yield prof
    finally:
        for owner, name, fn in reversed(saved):
            setattr(owner, name, fn)
