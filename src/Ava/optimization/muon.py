"""Muon (Jordan 2024) for hidden matrices, AdamW for everything else, in one optimizer.

Muon takes the (Nesterov) momentum of a weight matrix's gradient and replaces it by the nearest
semi-orthogonal matrix, computed with 5 Newton–Schulz iterations, (a, b, c) = (3.4445, −4.7750,
2.0315). The update is then scaled by 0.2·sqrt(max(A, B)) (Moonshot's "match RMS to AdamW",
``adjust_lr_fn="match_rms_adamw"`` in ``torch.optim.Muon``), so Muon groups run at AdamW's LR and
weight decay. For a 2-D weight this is exactly ``torch.optim.Muon`` (a test checks it).

Why not ``torch.optim.Muon`` directly: it accepts 2-D parameters only and its own param groups, so a
model would need two optimizers, two state dicts and two schedulers. Here one optimizer holds both
kinds of groups (``use_muon`` per group), so the trainer, the scheduler and checkpoints see one object.

Expert weights are 3-D ``[E, out, in]``: each expert is its own linear map, so Newton–Schulz runs
per expert slice (a batched matmul over E). Flattening to ``[E·out, in]`` would couple the
experts' singular values and shrink the update of rarely used experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximate orthogonalisation U·Vᵀ of each matrix in ``g`` (the last two dims), in bf16.

    Args:
        g: ``(..., A, B)`` update matrices.
        steps: Newton–Schulz iterations.
        eps: floor of the Frobenius norm used to bring the spectral norm under 1.

    Returns:
        ``(..., A, B)`` bf16 tensor with singular values ≈ U(0.5, 1.5) instead of those of ``g``.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the wide orientation: the Gram matrix is the smaller one
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.mT  # (..., A, A)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.mT if tall else x


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon on groups with ``use_muon=True``, AdamW on the others.

    Args:
        params: param-group dicts; each may set ``use_muon`` (default False).
        lr: learning rate (each group may override it).
        betas: AdamW β1, β2 of the non-Muon groups.
        eps: AdamW ε.
        weight_decay: decoupled weight decay (both kinds, multiplied by the group's lr).
        momentum: Muon momentum.
        nesterov: Nesterov momentum for Muon.
        ns_steps: Newton–Schulz iterations.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
    ) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps, "use_muon": False}
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["use_muon"] and any(p.ndim < 2 for p in group["params"]):
                raise ValueError("MuonWithAdamW: Muon groups take matrices (2-D or stacked 3-D) only")

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter that has a gradient.

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
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1.0 - mu)
            update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
            update = newton_schulz(update, group["ns_steps"])
            rows, cols = p.shape[-2:]
            p.mul_(1.0 - lr * wd)
            p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(rows, cols)))

    def _adamw_group(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            step = state["step"].item()
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(p.grad, 1.0 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
            p.mul_(1.0 - lr * wd)
            denom = (v.sqrt() / math.sqrt(1.0 - beta2**step)).add_(eps)
            p.addcdiv_(m, denom, value=-lr / (1.0 - beta1**step))
