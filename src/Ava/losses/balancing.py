"""MoE balancing losses: Switch/GShard, sequence-level and global-batch load balancing, z-loss.

Legend: T tokens, B sequences, E experts, K experts per token. Every loss is returned
unweighted; the caller multiplies by its coefficient (``model.moe.aux_loss_coef``,
``seq_aux_loss_coef``, ``global_aux_loss_coef``, ``z_loss_coef``). The balancing losses share one
form, ``E · Σ_i f_i · P_i`` (1 when uniform), and differ only in where f and P are counted.
Each is one MoE layer's value; the model combines the layers by ``model.moe.balance_reduction``
(mean, or sum as Megatron-LM and DeepSeek-V3 do). The sequence-wise and global-batch losses take
f from the top-k of the affinities alone (``RouterOutput.unbiased_indices_TK``: no aux-free bias,
no group limit; DeepSeek-V3 eq. 18); the Switch loss from the slots the router actually sent.
Auxiliary-loss-free balancing has no loss: it is a bias in the router (``layers/routing.py``).
"""

from __future__ import annotations

import torch


def load_balancing_loss(
    probs_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor | None = None,
    num_slots: torch.Tensor | int | None = None,
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
        num_slots: the slots ``tokens_per_expert_E`` counts over; default T·K. Under data
            parallelism the counts are summed over the ranks and so is this (f is then the
            global micro-batch's share while P stays this rank's mean).

    Returns:
        fp32 scalar.
    """
    num_tokens, num_experts = probs_TE.shape
    if tokens_per_expert_E is None:
        flat_S = indices_TK.reshape(-1)  # a scatter-add, not bincount: no host sync on a GPU
        tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.long, device=flat_S.device).scatter_add_(
            0, flat_S, torch.ones_like(flat_S)
        )
    slots = max(indices_TK.numel(), 1) if num_slots is None else num_slots
    f_E = tokens_per_expert_E.float() / slots  # (E,) share of the T·K slots
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


def sequence_balancing_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor, batch_size: int) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balancing loss: ``E · Σ_i f_i · P_i`` per sequence, averaged.

    Balances within every sequence rather than over the batch, so one sequence cannot put all
    its tokens on one expert even when the batch as a whole looks balanced. With the sigmoid
    router ``probs_TE`` holds V3's normalised affinities.

    Args:
        probs_TE: (B·T, E) router probabilities, sequence-major (row b·T + t).
        indices_TK: (B·T, K) the top-k of the affinities, without aux-free bias or group limit
            (``RouterOutput.unbiased_indices_TK``; DeepSeek-V3 eq. 18), dropped slots included.
        batch_size: B.

    Returns:
        fp32 scalar (1 when every sequence is uniform).
    """
    num_tokens, num_experts = probs_TE.shape
    seq_len = num_tokens // batch_size
    top_k = indices_TK.shape[1]
    idx_BS = indices_TK.reshape(batch_size, seq_len * top_k)  # (B, T·K)
    counts_BE = torch.zeros(batch_size, num_experts, device=probs_TE.device).scatter_add_(
        1, idx_BS, torch.ones(idx_BS.shape, device=probs_TE.device)
    )
    f_BE = counts_BE / (seq_len * top_k)  # (B, E) share of each sequence's slots
    p_BE = probs_TE.float().view(batch_size, seq_len, num_experts).mean(dim=1)  # (B, E)
    return num_experts * (f_BE * p_BE).sum(dim=-1).mean()


def global_balancing_loss(probs_TE: torch.Tensor, global_counts_E: torch.Tensor) -> torch.Tensor:
    """Global-batch balancing loss (Qwen team 2025): ``E · Σ_i f_i^global · P_i``.

    ``f`` comes from counts over more tokens than this micro-batch; ``P`` (which carries the
    gradient) from this micro-batch. Counting f over a larger batch stops the loss from demanding
    balance inside every small batch, which lets experts specialise by domain.

    Composition with gradient accumulation: the trainer passes, for micro-batch m of an
    optimizer step, the routed counts of micro-batches 1..m-1 and the model adds micro-batch m's
    own counts (see ``EnhancedMoEModel.forward(moe_load_prefix=...)``), so the last micro-batch
    sees the whole step's counts and earlier ones a running prefix (the counts buffer of the Qwen
    paper). With ``grad_accum_steps: 1`` this equals :func:`load_balancing_loss`. Under data
    parallelism the counts would also be all-reduced across ranks before the call.

    Args:
        probs_TE: (T, E) router probabilities of this micro-batch.
        global_counts_E: (E,) slots per expert over the global batch (so far), counted from the
            top-k of the affinities without aux-free bias or group limit (as the sequence loss).

    Returns:
        fp32 scalar.
    """
    num_experts = probs_TE.shape[1]
    counts_E = global_counts_E.float()
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return num_experts * (f_E * probs_TE.float().mean(dim=0)).sum()
