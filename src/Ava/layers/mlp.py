"""Dense SwiGLU MLP (Shazeer 2020), named like HF Llama/Qwen3.

Shape suffixes: see ``Ava/__init__.py``; here N rows (any leading shape, flattened), D hidden,
I intermediate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases.

    Args:
        hidden_size: D.
        intermediate_size: I.
    """

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D)."""
        h_NI = F.silu(self.gate_proj(x_ND)) * self.up_proj(x_ND)
        return self.down_proj(h_NI)
