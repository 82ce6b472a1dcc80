"""Early stopping on validation loss (patience in evaluations, minimum improvement)."""

from __future__ import annotations

from typing import Any

from ..config import EarlyStoppingConfig


class EarlyStopping:
    """Tracks the best validation loss and says when to stop.

    Args:
        config: ``evaluation.early_stopping``; ``patience: null`` never stops.
    """

    def __init__(self, config: EarlyStoppingConfig) -> None:
        self.config = config
        self.best: float | None = None
        self.bad_evals = 0

    def update(self, val_loss: float) -> bool:
        """Record an evaluation; True when training should stop."""
        if self.best is None or val_loss < self.best - self.config.min_delta:
            self.best = val_loss
            self.bad_evals = 0
        else:
            self.bad_evals += 1
        return self.config.patience is not None and self.bad_evals >= self.config.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.bad_evals = state["best"], state["bad_evals"]
