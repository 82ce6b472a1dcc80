"""Decay shapes after warmup: each maps the decay phase to an LR multiplier ending at ``end``.

Every function takes ``t`` (steps since the end of warmup, 0-based), ``n`` (steps of the decay
phase; step ``n − 1`` is the last one of the run) and ``end`` = lr_end / peak LR, and returns a
multiplier of the peak LR that is 1 at ``t = 0`` and ``end`` at ``t = n − 1`` (``constant`` stays at
1; ``cosine_restarts`` ends each cycle at ``end``, the last cycle shortened to end with the run).
Extra parameters come as keyword arguments from the scheduler config.
"""

from __future__ import annotations

import math
from collections.abc import Callable

DecayFn = Callable[..., float]


def _progress(t: int, n: int) -> float:
    return min(1.0, t / max(1, n - 1))


def _between(end: float, weight: float) -> float:
    """end + (1 − end)·weight: weight 1 → peak, 0 → end."""
    return end + (1.0 - end) * weight


def constant(t: int, n: int, end: float, **_: object) -> float:
    """Stay at the peak (lr_end unused)."""
    return 1.0


def cosine(t: int, n: int, end: float, **_: object) -> float:
    """Half cosine from the peak to ``end``."""
    return _between(end, 0.5 * (1.0 + math.cos(math.pi * _progress(t, n))))


def linear(t: int, n: int, end: float, **_: object) -> float:
    """Straight line from the peak to ``end``."""
    return _between(end, 1.0 - _progress(t, n))


def polynomial(t: int, n: int, end: float, power: float = 2.0, **_: object) -> float:
    """end + (1 − end)·(1 − p)^power (power 1 = linear)."""
    return _between(end, (1.0 - _progress(t, n)) ** power)


def inverse_sqrt(t: int, n: int, end: float, **_: object) -> float:
    """1/sqrt(t + 1) after warmup, affinely rescaled to run from 1 to ``end``.

    The raw inverse-sqrt decay never reaches a chosen value; the rescaling keeps its shape
    (fast early decay, long tail) and pins both ends.
    """
    first, last = 1.0, 1.0 / math.sqrt(max(1, n))
    if first == last:
        return 1.0
    raw = 1.0 / math.sqrt(min(t, n - 1) + 1)
    return _between(end, (raw - last) / (first - last))


def wsd(t: int, n: int, end: float, wsd_decay_fraction: float = 0.2, wsd_decay_shape: str = "1-sqrt",
        **_: object) -> float:
    """Warmup-stable-decay (MiniCPM 2024): stay at the peak, then decay in the last fraction.

    Shapes over the decay phase q ∈ [0, 1]: linear 1 − q; 1-sqrt 1 − sqrt(q); exponential
    end^q (geometric from the peak to ``end``; with end = 0 it decays to 1e-3 then drops to 0).
    """
    decay_steps = max(1, round(wsd_decay_fraction * n))
    start = n - decay_steps
    if t < start:
        return 1.0
    q = min(1.0, (t - start + 1) / decay_steps)
    if wsd_decay_shape == "linear":
        return _between(end, 1.0 - q)
    if wsd_decay_shape == "1-sqrt":
        return _between(end, 1.0 - math.sqrt(q))
    if q >= 1.0:
        return end
    return max(end, 1e-3) ** q


def cosine_restarts(t: int, n: int, end: float, cycle_steps: int | None = None, cycle_mult: float = 1.0,
                    **_: object) -> float:
    """SGDR (Loshchilov & Hutter 2017): cosine cycles from the peak to ``end``, restarting at the peak.

    Cycle i lasts ``cycle_steps · cycle_mult^i`` steps (default a quarter of the decay phase); the
    last cycle is stretched (when the next would not fit) or cut so that the run ends at ``end``.
    """
    length = float(cycle_steps or max(1, n // 4))
    start = 0
    while True:
        cycle = max(1, round(length))
        if start + cycle >= n or start + cycle + max(1, round(length * cycle_mult)) > n:
            cycle = n - start  # last cycle: stretch or shorten it to end with the run
            return cosine(t - start, cycle, end)
        if t < start + cycle:
            return cosine(t - start, cycle, end)
        start += cycle
        length *= cycle_mult


DECAYS: dict[str, DecayFn] = {
    "constant": constant, "cosine": cosine, "linear": linear, "polynomial": polynomial,
    "inverse_sqrt": inverse_sqrt, "wsd": wsd, "cosine_restarts": cosine_restarts,
}
