"""The MoE block: router -> experts (dispatch, grouped GEMMs, combine), Qwen3-MoE naming.

Legend: B batch, T sequence, D hidden, N = B·T tokens, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .experts import Experts
from .routing import RouterOutput, TopKRouter


@dataclass(frozen=True)
class MoEOutput:
    """Output of :class:`MoEBlock`.

    Attributes:
        hidden_states: (B, T, D) the block's output.
        routing: the router's decision over the N = B·T flattened tokens; the balancing losses
            and the load metrics are computed from it by the caller (``losses/`` sits beside
            ``layers/``, not under it).
    """

    hidden_states: torch.Tensor
    routing: RouterOutput


class MoEBlock(nn.Module):
    """Sparse SwiGLU MLP: each token goes to its top-k experts (dropless).

    Submodules: ``gate`` (:class:`TopKRouter`, weight [E, D]) and ``experts``
    (:class:`Experts`, ``gate_up_proj`` [E, 2I, D], ``down_proj`` [E, D, I]).

    Args:
        cfg: the resolved model config (``num_experts``, ``moe.top_k``, ``moe.norm_topk_prob``,
            ``moe.moe_intermediate_size``, ``moe.backend``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate = TopKRouter(cfg.hidden_size, cfg.num_experts, cfg.moe.top_k, cfg.moe.norm_topk_prob)
        self.experts = Experts(
            cfg.num_experts, cfg.hidden_size, cfg.moe.moe_intermediate_size, backend=cfg.moe.backend
        )

    def forward(self, x_BTD: torch.Tensor) -> MoEOutput:
        """Route and run the experts.

        Args:
            x_BTD: (B, T, D) normalised hidden states.

        Returns:
            :class:`MoEOutput` with (B, T, D) hidden states and the routing over B·T tokens.
        """
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)  # (N, D)
        routing = self.gate(x_ND)
        y_ND = self.experts(x_ND, routing)  # (N, D)
        return MoEOutput(hidden_states=y_ND.view(B, T, D), routing=routing)
