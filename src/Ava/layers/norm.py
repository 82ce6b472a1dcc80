"""RMSNorm (Zhang & Sennrich 2019), computed in fp32 whatever the input dtype.

Legend: B batch, T sequence, D normalised width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
            # One fused kernel, bitwise equal to the lines below in fp32 (tested) and ~2x fewer
            # dispatches: it matters at one decoded token, where every op costs ~10 µs.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
