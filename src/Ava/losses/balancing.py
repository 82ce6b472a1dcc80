"""MoE balancing losses: Switch/GShard auxiliary load-balancing loss and ST-MoE router z-loss.

Legend: T tokens, E experts, K experts per token. Both losses are returned unweighted; the
caller multiplies by its coefficient (``model.moe.aux_loss_coef`` / ``z_loss_coef``).
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E · Σ_i f_i · P_i``.

    ``f_i`` is the share of the T·K token-slots routed to expert i (a count, so no gradient);
    ``P_i`` is the mean router probability of expert i over the T tokens (this carries the
    gradient). Perfectly uniform routing gives exactly 1; all tokens on one expert with all
    probability on it gives E.

    Args:
        probs_TE: (T, E) softmax router probabilities (fp32).
        indices_TK: (T, K) chosen experts.
        tokens_per_expert_E: (E,) slots per expert if already counted (the router returns it).

    Returns:
        fp32 scalar.
    """
    num_tokens, num_experts = probs_TE.shape
    if tokens_per_expert_E is None:
        tokens_per_expert_E = torch.bincount(indices_TK.reshape(-1), minlength=num_experts)
    f_E = tokens_per_expert_E.float() / max(indices_TK.numel(), 1)  # (E,) share of T·K slots
    p_E = probs_TE.float().mean(dim=0)  # (E,)
    return num_experts * (f_E * p_E).sum()


def router_z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_j x_tj)²``; keeps router logits small.

    Args:
        logits_TE: (T, E) router logits.

    Returns:
        fp32 scalar.
    """
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()
