"""Gradient health: catch non-finite and spiking steps before they reach the weights.

Each optimizer step is judged from two host numbers, the step's loss and the global gradient
norm (read once per step; on CUDA that is the step's one synchronisation):

- a non-finite loss or gradient norm makes the step *bad*;
- once ``spike_warmup`` good steps have built running statistics of the loss (an exponential
  moving mean and variance over ``spike_window`` steps), a loss more than ``spike_zscore``
  running standard deviations above the mean is a *spike*, also bad.

A bad step is skipped (no optimizer update; its loss does not enter the statistics). After
``rollback_after`` consecutive bad steps the trainer restores the last good checkpoint's model
and optimizer state and carries on with the next data, skipping the window that diverged
(PaLM-style). Everything is in :meth:`state_dict`, so a resumed run judges exactly as before.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import HealthConfig


@dataclass(frozen=True)
class Verdict:
    """The judgement of one step."""

    ok: bool
    reason: str = ""
    rollback: bool = False


class GradientHealthMonitor:
    """Judges steps (see module docstring) and remembers what it skipped.

    Args:
        config: the ``gradient.health`` section.
    """

    def __init__(self, config: HealthConfig) -> None:
        self.config = config
        self.mean = 0.0
        self.var = 0.0
        self.count = 0
        self.consecutive_bad = 0
        self.skipped: list[list[Any]] = []  # [step, reason]
        self.rollbacks: list[int] = []

    def check(self, step: int, loss: float, grad_norm: float) -> Verdict:
        """Judge optimizer step ``step`` from its loss and global gradient norm."""
        if not self.config.enabled:
            return Verdict(True)
        reason = ""
        if not math.isfinite(loss):
            reason = f"non-finite loss ({loss})"
        elif not math.isfinite(grad_norm):
            reason = f"non-finite gradient norm ({grad_norm})"
        elif self._is_spike(loss):
            std = math.sqrt(self.var)
            reason = f"loss spike ({loss:.4f} is {(loss - self.mean) / std:.1f} std above the running mean {self.mean:.4f})"
        if not reason:
            self._update(loss)
            self.consecutive_bad = 0
            return Verdict(True)
        self.consecutive_bad += 1
        self.skipped.append([step, reason])
        limit = self.config.rollback_after
        rollback = limit is not None and self.consecutive_bad >= limit
        if rollback:
            self.rollbacks.append(step)
            self.consecutive_bad = 0
        return Verdict(False, reason, rollback)

    def _is_spike(self, loss: float) -> bool:
        z = self.config.spike_zscore
        if z is None or self.count < self.config.spike_warmup or self.var <= 0:
            return False
        return (loss - self.mean) / math.sqrt(self.var) > z

    def _update(self, loss: float) -> None:
        # Exponential moving mean/variance (West 1979), with a plain running mean until the
        # window is full so early steps are not over-weighted by the first loss.
        self.count += 1
        alpha = max(2.0 / (self.config.spike_window + 1), 1.0 / self.count)
        delta = loss - self.mean
        self.mean += alpha * delta
        self.var = (1 - alpha) * (self.var + alpha * delta * delta)

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "count": self.count,
                "consecutive_bad": self.consecutive_bad, "skipped": [list(s) for s in self.skipped],
                "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.count = state["mean"], state["var"], state["count"]
        self.consecutive_bad = state["consecutive_bad"]
        self.skipped = [list(s) for s in state["skipped"]]
        self.rollbacks = list(state["rollbacks"])


def layer_grad_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the gradients of each top-level block (``layers.3``, ``embed_tokens``, ...)."""
    squares: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] == "layers" else parts[0]
        sq = param.grad.detach().float().pow(2).sum()
        squares[group] = squares[group] + sq if group in squares else sq
    return {f"grad_norm/{group}": float(sq.sqrt()) for group, sq in squares.items()}
