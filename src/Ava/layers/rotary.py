"""Rotary position embeddings (RoPE, Su et al. 2021), rotate-half convention of HF Llama/Qwen3.

Legend: B batch, T sequence, H heads, K head dim (even), F = K/2 frequencies, P cached positions.
"""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """A cos/sin table for positions ``0..max_positions-1``, looked up by position ids.

    The table is a non-persistent buffer: it is derived from the config, so it never enters a
    checkpoint and follows the module across ``.to(device)``.

    Args:
        head_dim: K, the per-head width (even).
        max_positions: P, the number of cached positions (the model's ``max_seq_len``).
        theta: base frequency.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        inv_freq_F = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        pos_P = torch.arange(max_positions, dtype=torch.float64)
        angles_PF = torch.outer(pos_P, inv_freq_F)
        angles_PK = torch.cat([angles_PF, angles_PF], dim=-1)  # rotate-half pairs i with i + K/2
        self.register_buffer("cos_PK", angles_PK.cos().float(), persistent=False)
        self.register_buffer("sin_PK", angles_PK.sin().float(), persistent=False)

    def forward(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Look up the table.

        Args:
            position_ids_BT: (B, T) long, each < ``max_positions`` (an index error otherwise).

        Returns:
            ``(cos_BT1K, sin_BT1K)``, both fp32 (B, T, 1, K): the head axis is 1 so the tables
            broadcast over any number of heads (made once per forward, used by every layer).
        """
        return self.cos_PK[position_ids_BT].unsqueeze(2), self.sin_PK[position_ids_BT].unsqueeze(2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(
    x_BTHK: torch.Tensor, cos_BT1K: torch.Tensor, sin_BT1K: torch.Tensor
) -> torch.Tensor:
    """Rotate queries or keys by their positions.

    Args:
        x_BTHK: (B, T, H, K) queries or keys.
        cos_BT1K, sin_BT1K: (B, T, 1, K) from :class:`RotaryEmbedding`.

    Returns:
        (B, T, H, K) in the dtype of ``x_BTHK``.
    """
    if cos_BT1K.dtype != x_BTHK.dtype:
        cos_BT1K, sin_BT1K = cos_BT1K.to(x_BTHK.dtype), sin_BT1K.to(x_BTHK.dtype)
    return x_BTHK * cos_BT1K + _rotate_half(x_BTHK) * sin_BT1K
