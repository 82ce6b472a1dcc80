"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Update, per parameter θ with gradient g and momentum m:

    u = sign(β1·m + (1 − β1)·g)
    θ ← θ − lr·(u + λ·θ)
    m ← β2·m + (1 − β2)·g

One state tensor per parameter (half of AdamW's). Every coordinate moves by ±lr, so Lion wants an
LR 3–10× smaller and a weight decay 3–10× larger than AdamW's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch


class Lion(torch.optim.Optimizer):
    """Lion with decoupled weight decay.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        betas: (β1 for the update interpolation, β2 for the momentum EMA); paper (0.9, 0.99).
        weight_decay: decoupled weight decay λ (multiplied by lr).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0:
            raise ValueError(f"Lion: lr must be ≥ 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Lion: betas must be in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One Lion update of every parameter that has a gradient.

        Args:
            closure: optional closure that re-evaluates the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m = state["exp_avg"]
                update = m.lerp(p.grad, 1.0 - beta1).sign_()  # sign(β1·m + (1−β1)·g)
                if wd:
                    p.mul_(1.0 - lr * wd)
                p.add_(update, alpha=-lr)
                m.lerp_(p.grad, 1.0 - beta2)
        return loss
