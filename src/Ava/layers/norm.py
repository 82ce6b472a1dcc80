"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 whatever the input dtype.

Shape suffixes: see ``Ava/__init__.py``; here D the normalised width (the last axis, whatever it
is: hidden, or a head's A) and N the rows (every axis but the last, flattened).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _RMSNormFunction(torch.autograd.Function):
    """``x · rstd · w`` with ``rstd = 1/√(mean(x²) + ε)``: ATen's fused forward, a backward by hand.

    On CPU, autograd differentiates ``F.rms_norm`` through its decomposition: about 17 passes
    over (N, D) for the two gradients. With ``x̂ = x · rstd`` and ``u = g · w`` they are
    ``dx = rstd · (u − x̂ · mean(u · x̂))`` and ``dw = Σ_N g · x̂``: 8 passes here, 1.3–1.4×
    faster (``docs/performance.md``, "Attention, norms, rotary and the fused head").
    """

    @staticmethod
    def forward(ctx, x, weight, eps):  # noqa: D102
        y, rstd = torch.ops.aten._fused_rms_norm(x, [x.shape[-1]], weight, eps)  # rstd: (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):  # noqa: D102
        x, weight, rstd = ctx.saved_tensors
        grad_x, grad_w = rms_norm_backward(grad_y, x, weight, rstd, *ctx.needs_input_grad[:2])
        return grad_x, grad_w, None


def rms_norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
                      need_x: bool = True, need_w: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``y = x · rstd · w`` (fp32 (..., D) ``x``, (..., 1) ``rstd`` from
    ``aten._fused_rms_norm``): ``(dx, dw)``, each None where not needed."""
    x_hat = x * rstd
    grad_w = (grad_y * x_hat).flatten(0, -2).sum(0) if need_w else None
    grad_x = None
    if need_x:
        u = grad_y * weight
        grad_x = torch.addcmul(u, x_hat, (u * x_hat).mean(-1, keepdim=True), value=-1).mul_(rstd)
    return grad_x, grad_w


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``F.rms_norm(x, (D,), weight, eps)`` for fp32 ``x`` and ``weight``, with the hand-written
    backward of :class:`_RMSNormFunction` when autograd needs one on CPU (GPUs have ATen's fused
    backward; under ``torch.compile`` inductor fuses the decomposition itself)."""
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if needs_grad and x.device.type == "cpu" and not torch.compiler.is_compiling():
        return _RMSNormFunction.apply(x, weight, eps)
    return F.rms_norm(x, weight.shape, weight, eps)


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned per-channel gain (no bias, no mean-centering).

    Args:
        dim: width D of the last axis.
        eps: added to the mean square before the reciprocal square root.
    """

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` (..., D) over its last axis; returns (..., D).

        The statistics are taken in fp32 because bf16's 8-bit mantissa makes the mean square of a
        wide vector noticeably wrong; the gain is applied after casting back (as Qwen3/Llama do).
        """
        x_dtype = x.dtype
        if x_dtype == torch.float32 and self.weight.dtype == torch.float32:
            # One fused kernel, bitwise equal to the lines below in fp32 (tests/layers/test_norm.py)
            # and ~2x fewer dispatches: it matters at one decoded token, where every op costs ~10 µs.
            return rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
