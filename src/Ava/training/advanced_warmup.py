"""Warmup shapes: the LR multiplier during the first ``warmup_steps`` optimizer steps.

Each function maps a 0-based step ``t < warmup_steps`` to a multiplier in [0, 1] that reaches 1 at
the last warmup step (``t = warmup_steps − 1``), so a decay schedule can take over from 1.

- linear: (t + 1) / W.
- exponential: 1 − exp(−5·(t + 1)/W), normalised by 1 − exp(−5) (Ma & Yarats 2021's
  "exponential warmup", with the time constant set so that it ends at the peak).
- radam: RAdam's variance rectification term r_t (Liu et al. 2020) with β2 = 1 − 2/W (Ma &
  Yarats: RAdam ≈ a warmup of 2/(1 − β2) steps), normalised by r_W. r_t is undefined while
  ρ_t ≤ 4; those first steps get multiplier 0 (RAdam takes un-adapted steps there).
"""

from __future__ import annotations

import math
from collections.abc import Callable

WarmupFn = Callable[[int, int], float]


def linear_warmup(step: int, warmup_steps: int) -> float:
    """(step + 1) / warmup_steps."""
    return (step + 1) / warmup_steps


def exponential_warmup(step: int, warmup_steps: int) -> float:
    """1 − exp(−5·(step + 1)/W), scaled to reach exactly 1 at the last warmup step."""
    return (1.0 - math.exp(-5.0 * (step + 1) / warmup_steps)) / (1.0 - math.exp(-5.0))


def radam_rectification(t: int, beta2: float) -> float:
    """RAdam's r_t for (1-based) step t, or 0 where ρ_t ≤ 4.

    Args:
        t: 1-based step.
        beta2: second-moment decay.

    Returns:
        sqrt((ρ_t − 4)(ρ_t − 2)ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2)ρ_t)), in [0, 1).
    """
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    rho_t = rho_inf - 2.0 * t * beta2**t / (1.0 - beta2**t)
    if rho_t <= 4.0 or rho_inf <= 4.0:
        return 0.0
    return math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))


def radam_warmup(step: int, warmup_steps: int) -> float:
    """r_{step+1} / r_W with β2 = 1 − 2/W (0 while the rectification is undefined)."""
    beta2 = 1.0 - 2.0 / max(warmup_steps, 3)
    final = radam_rectification(warmup_steps, beta2)
    return radam_rectification(step + 1, beta2) / final if final > 0 else linear_warmup(step, warmup_steps)


WARMUPS: dict[str, WarmupFn] = {
    "linear": linear_warmup, "exponential": exponential_warmup, "radam": radam_warmup,
}
