"""Sophia-G (Liu et al. 2023, "Sophia: A Scalable Stochastic Second-order Optimizer").

    m ← β1·m + (1 − β1)·g                            every step
    h ← β2·h + (1 − β2)·ĥ,  ĥ = B·ĝ⊙ĝ                  every k steps (:meth:`SophiaG.update_hessian`)
    θ ← θ − lr·λ·θ;  θ ← θ − lr·clip(m / max(ρ·h, ε), 1)

ĝ is the gradient of the loss on labels *sampled from the model's own predictions* (the
Gauss–Newton–Bartlett estimator), B the number of tokens in that batch. :func:`refresh_hessian`
computes ĝ (a forward pass, sampled labels, a backward) and then calls :meth:`update_hessian`;
the optimizer only turns the gradients it finds in ``p.grad`` into the diagonal estimate.
Where h is small the clip turns the step into sign-momentum (like Lion); where the curvature is
large the step is a Newton step m/(ρh).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch


class SophiaG(torch.optim.Optimizer):
    """Sophia with the Gauss–Newton–Bartlett Hessian estimator.

    Args:
        params: parameters or param-group dicts.
        lr: learning rate.
        betas: (β1 of the momentum, β2 of the Hessian EMA); paper (0.965, 0.99).
        rho: ρ, scale of the Hessian in the clipped ratio; paper ≈ 0.04.
        weight_decay: decoupled weight decay (multiplied by lr).
        eps: floor of the denominator ρ·h.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        eps: float = 1e-15,
    ) -> None:
        if lr < 0 or rho <= 0 or eps <= 0:
            raise ValueError(f"SophiaG: need lr ≥ 0, rho > 0, eps > 0; got {lr}, {rho}, {eps}")
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"SophiaG: betas must be in [0, 1), got {betas}")
        defaults = {"lr": lr, "betas": tuple(betas), "rho": rho, "weight_decay": weight_decay, "eps": eps}
        super().__init__(params, defaults)

    def _state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @torch.no_grad()
    def update_hessian(self, scale: float = 1.0) -> None:
        """Fold the gradients now in ``p.grad`` into the Hessian EMA as ĥ = scale·ĝ⊙ĝ.

        Call it after a backward of the loss on labels sampled from the model's predictions
        (mean over the batch), with ``scale`` = tokens in that batch (the B of the paper).

        Args:
            scale: B, the number of tokens the sampled-label loss averaged over.
        """
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                h = self._state(p)["hessian"]
                h.mul_(beta2).addcmul_(p.grad, p.grad, value=(1.0 - beta2) * scale)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One Sophia update of every parameter that has a gradient.

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
            beta1 = group["betas"][0]
            lr, rho, eps, wd = group["lr"], group["rho"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self._state(p)
                state["step"] += 1
                m, h = state["exp_avg"], state["hessian"]
                m.lerp_(p.grad, 1.0 - beta1)
                if wd:
                    p.mul_(1.0 - lr * wd)
                ratio = (m / (rho * h).clamp_(min=eps)).clamp_(-1.0, 1.0)
                p.add_(ratio, alpha=-lr)
        return loss


def refresh_hessian(
    model: torch.nn.Module,
    optimizer: SophiaG,
    input_ids_BT: torch.Tensor,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> None:
    """Sophia-G's Hessian refresh: ĥ = B·ĝ⊙ĝ from labels sampled from the model's own predictions.

    A forward over ``input_ids_BT``, labels drawn from its softmax (Gauss–Newton–Bartlett), a
    backward of their mean cross-entropy, then :meth:`SophiaG.update_hessian` with B = the number
    of sampled labels; the gradients are cleared afterwards. The trainer calls it every
    ``optimizer.sophia_hessian_every`` steps, after the optimizer step.

    Args:
        model: the model (its forward returns ``.logits``).
        optimizer: the Sophia optimizer of ``model``.
        input_ids_BT: (B, T) token ids (the step's last micro-batch), on the model's device.
        autocast: factory of the training's autocast context.
    """
    with autocast():
        logits_BTV = model(input_ids_BT).logits[:, :-1].float()
    with torch.no_grad():
        sampled_BT = torch.distributions.Categorical(logits=logits_BTV).sample()
    loss = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), sampled_BT.flatten())
    loss.backward()
    optimizer.update_hessian(scale=float(sampled_BT.numel()))
    optimizer.zero_grad(set_to_none=True)
