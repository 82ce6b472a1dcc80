"""The MoE block: router -> experts (dispatch, kernel, combine), Qwen3-MoE naming.

Shapes (legend in ``Ava/__init__.py``): B batch, T sequence, D hidden, N = B·T flattened tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .experts import Experts
from .mlp import SwiGLU
from .routing import Router, RouterOutput


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
    """Sparse SwiGLU MLP: each token goes to its routed experts, plus the always-on shared ones.

    Submodules: ``gate`` (:class:`Router`, weight [E, D]), ``experts`` (:class:`Experts`,
    ``gate_up_proj`` [E, 2I, D], ``down_proj`` [E, D, I]) and, when ``moe.num_shared_experts``
    > 0, ``shared_experts`` (a dense :class:`SwiGLU` of width num_shared × I, DeepSeek-V3 naming).

    Args:
        cfg: the resolved model config (``num_experts`` and ``moe.*``).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        self.gate = Router(
            cfg.hidden_size, cfg.num_experts, moe.top_k, moe.norm_topk_prob, kind=moe.router,
            routed_scaling_factor=moe.routed_scaling_factor, n_groups=moe.n_groups,
            topk_groups=moe.topk_groups, aux_free_bias=moe.aux_free_bias,
            capacity_factor=moe.capacity_factor, eval_capacity_factor=moe.eval_capacity_factor,
        )
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, moe.moe_intermediate_size, backend=moe.backend)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, moe.num_shared_experts * moe.moe_intermediate_size)
            if moe.num_shared_experts > 0 else None
        )

    def forward(self, x_BTD: torch.Tensor, token_ids_BT: torch.Tensor | None = None,
                token_mask_BT: torch.Tensor | None = None) -> MoEOutput:
        """Route and run the experts.

        Args:
            x_BTD: (B, T, D) normalised hidden states.
            token_ids_BT: (B, T) token ids of the same positions (the hash router needs them).
            token_mask_BT: (B, T) bool, True = real token, False = padding (computed like the
                others, left out of the routing statistics: ``RouterOutput.token_mask_T``);
                None = every token is real.

        Returns:
            :class:`MoEOutput` with (B, T, D) hidden states and the routing over B·T tokens.
        """
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)  # (N, D)
        token_ids_N = token_ids_BT.reshape(B * T) if token_ids_BT is not None else None
        token_mask_N = token_mask_BT.reshape(B * T) if token_mask_BT is not None else None
        routing = self.gate(x_ND, token_ids_N, token_mask_N)
        y_ND = self.experts(x_ND, routing)  # (N, D)
        if self.shared_experts is not None:
            y_ND = y_ND + self.shared_experts(x_ND)
        return MoEOutput(hidden_states=y_ND.view(B, T, D), routing=routing)
