"""Learning-rate schedules: linear warmup, then cosine / linear decay to ``lr_end``, or constant.

The schedule is a small callable object (so ``LambdaLR.state_dict`` captures it) that maps an
optimizer step to a multiplier of the peak LR.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..config import SchedulerConfig


@dataclass
class WarmupDecay:
    """LR multiplier at step ``s``: linear warmup over ``warmup_steps``, then decay.

    Attributes:
        warmup_steps: steps of linear warmup (the first step already has a non-zero LR).
        total_steps: steps of the whole run; decay ends there.
        end_ratio: lr_end / peak LR.
        shape: "cosine", "linear" or "constant".
    """

    warmup_steps: int
    total_steps: int
    end_ratio: float
    shape: str

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.shape == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        if self.shape == "cosine":
            weight = 0.5 * (1.0 + math.cos(math.pi * progress))
        else:
            weight = 1.0 - progress
        return self.end_ratio + (1.0 - self.end_ratio) * weight


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, peak_lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` implementing ``config`` over ``total_steps`` optimizer steps.

    Args:
        optimizer: optimizer whose groups hold the peak LR (times any group multiplier).
        config: scheduler section.
        peak_lr: the peak learning rate (``training.learning_rate``).
        total_steps: number of optimizer steps of the run.
    """
    lr_end = peak_lr / 10 if config.lr_end is None else config.lr_end
    schedule = WarmupDecay(
        warmup_steps=min(config.warmup_steps, max(total_steps - 1, 0)),
        total_steps=total_steps,
        end_ratio=lr_end / peak_lr,
        shape=config.name,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
