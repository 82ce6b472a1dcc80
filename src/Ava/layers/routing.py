"""Top-k softmax router (Mixtral / Qwen3-MoE), always computed in fp32.

Legend: T tokens (batch × sequence, flattened), D hidden, E routed experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class RouterOutput:
    """What the router decided, for dispatch, losses and metrics to read.

    Attributes:
        indices_TK: (T, K) long, chosen experts per token, best first.
        weights_TK: (T, K) fp32 gate weights of the chosen experts (renormalised to sum 1 when
            ``norm_topk_prob``).
        logits_TE: (T, E) fp32 router logits (the z-loss reads them).
        probs_TE: (T, E) fp32 softmax over all experts (the balancing loss reads them).
        tokens_per_expert_E: (E,) long, token-slots assigned to each expert (sums to T·K);
            no gradient.
    """

    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    tokens_per_expert_E: torch.Tensor


class TopKRouter(nn.Module):
    """``softmax(x · Wᵀ)`` then top-k; the weight is ``[E, D]`` like an ``nn.Linear`` without bias.

    Held as ``mlp.gate`` so its state-dict key (``mlp.gate.weight``) matches HF Qwen3-MoE.

    Args:
        hidden_size: D.
        num_experts: E.
        top_k: K experts per token (≤ E).
        norm_topk_prob: renormalise the K chosen probabilities to sum to 1.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, norm_topk_prob: bool = True) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor) -> RouterOutput:
        """Route each token.

        Args:
            x_TD: (T, D) hidden states, any dtype.

        Returns:
            A :class:`RouterOutput`; every float tensor in it is fp32.
        """
        return route_topk(x_TD, self.weight, self.top_k, self.norm_topk_prob)

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, top_k={self.top_k}, norm_topk_prob={self.norm_topk_prob}"


def route_topk(
    x_TD: torch.Tensor, weight_ED: torch.Tensor, top_k: int, norm_topk_prob: bool = True
) -> RouterOutput:
    """Top-k softmax routing in fp32.

    Autocast is switched off here: in bf16 the logits of near-tied experts round to the same
    value, top-k then flips between them from step to step, and the softmax/z-loss lose precision
    exactly where balancing needs it (ST-MoE, torchtitan and HF all keep the router in fp32).

    Args:
        x_TD: (T, D) hidden states.
        weight_ED: (E, D) router weight.
        top_k: K.
        norm_topk_prob: renormalise the K chosen probabilities to sum to 1.

    Returns:
        :class:`RouterOutput`.
    """
    num_experts = weight_ED.shape[0]
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        logits_TE = F.linear(x_TD.float(), weight_ED.float())  # (T, E)
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, indices_TK = probs_TE.topk(top_k, dim=-1)  # (T, K)
        if norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    tokens_per_expert_E = torch.bincount(indices_TK.reshape(-1), minlength=num_experts)  # (E,)
    return RouterOutput(
        indices_TK=indices_TK,
        weights_TK=weights_TK,
        logits_TE=logits_TE,
        probs_TE=probs_TE,
        tokens_per_expert_E=tokens_per_expert_E,
    )
