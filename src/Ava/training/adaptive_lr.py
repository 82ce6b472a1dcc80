"""Plateau-adaptive LR: shrink the schedule when the validation loss stops improving.

It scales the schedule instead of replacing it: a reduction multiplies the scheduler's
``base_lrs`` (the peak LR of each group) by ``factor``, so warmup/decay continue with a lower peak.
``base_lrs`` live in the scheduler's state dict and the counters here in :meth:`state_dict`, so a
resumed run continues exactly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import PlateauConfig

logger = logging.getLogger(__name__)


class PlateauLR:
    """Reduce-on-plateau over a ``LambdaLR``-style scheduler.

    Args:
        scheduler: scheduler whose ``base_lrs`` are the groups' peak LRs.
        config: plateau section (factor, patience, cooldown, threshold, min_lr).
        peak_lr: ``training.learning_rate``; the floor ``min_lr`` applies to it.
    """

    def __init__(self, scheduler: torch.optim.lr_scheduler.LRScheduler, config: PlateauConfig,
                 peak_lr: float) -> None:
        self.scheduler = scheduler
        self.config = config
        self.initial_base_lrs = list(scheduler.base_lrs)
        self.min_scale = min(1.0, config.min_lr / peak_lr)
        self.scale = 1.0
        self.best: float | None = None
        self.bad_evals = 0
        self.cooldown_left = 0
        self.reductions = 0

    def step(self, val_loss: float) -> bool:
        """Record one validation loss; reduce the LR when it has plateaued.

        Args:
            val_loss: the validation loss of this evaluation.

        Returns:
            True when the LR was reduced now.
        """
        cfg = self.config
        if self.best is None or val_loss < self.best * (1.0 - cfg.threshold):
            self.best = val_loss
            self.bad_evals = 0
        elif self.cooldown_left > 0:
            self.cooldown_left -= 1
        else:
            self.bad_evals += 1
        if self.bad_evals <= cfg.patience or self.scale <= self.min_scale:
            return False
        new_scale = max(self.scale * cfg.factor, self.min_scale)
        self._rescale(new_scale)
        self.bad_evals = 0
        self.cooldown_left = cfg.cooldown
        self.reductions += 1
        logger.info("val loss plateaued at %.4f: LR scale %.3g → %.3g", self.best, self.scale, new_scale)
        self.scale = new_scale
        return True

    def _rescale(self, new_scale: float) -> None:
        ratio = new_scale / self.scale
        self.scheduler.base_lrs = [lr * new_scale for lr in self.initial_base_lrs]
        for group in self.scheduler.optimizer.param_groups:  # the current step's LR too
            group["lr"] *= ratio

    def state_dict(self) -> dict[str, Any]:
        """Counters and scale (plain numbers; ``weights_only``-safe)."""
        return {"scale": self.scale, "best": self.best, "bad_evals": self.bad_evals,
                "cooldown_left": self.cooldown_left, "reductions": self.reductions,
                "initial_base_lrs": list(self.initial_base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; the scheduler's own state restores its ``base_lrs``."""
        self.scale = state["scale"]
        self.best = state["best"]
        self.bad_evals = state["bad_evals"]
        self.cooldown_left = state["cooldown_left"]
        self.reductions = state["reductions"]
        self.initial_base_lrs = list(state["initial_base_lrs"])


def build_plateau(scheduler: torch.optim.lr_scheduler.LRScheduler, config: PlateauConfig,
                  peak_lr: float) -> PlateauLR | None:
    """A :class:`PlateauLR` when ``config.enabled``, else None.

    Args:
        scheduler: the run's LR scheduler.
        config: ``scheduler.plateau``.
        peak_lr: ``training.learning_rate``.

    Returns:
        The plateau controller or None.
    """
    return PlateauLR(scheduler, config, peak_lr) if config.enabled else None
