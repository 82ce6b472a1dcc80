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

Every loss takes an optional ``token_mask_T`` ((T,) bool, True = real token): padding of
right-padded rows (``data.packing: false``) then counts in no f, no P and no z-loss mean (as the
``attention_mask`` of HF's ``load_balancing_loss_func`` and Megatron-Core's router
``padding_mask``), and gets no gradient from these losses. None = every token counts.
"""

from __future__ import annotations

import torch


def _token_mean(x_T: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    """Mean over the first dimension, over the real tokens only when a mask is given."""
    if token_mask_T is None:
        return x_T.mean(dim=0)
    weight_T = token_mask_T.to(x_T.dtype).reshape(-1, *([1] * (x_T.dim() - 1)))
    return (x_T * weight_T).sum(dim=0) / weight_T.sum().clamp_min(1.0)


def load_balancing_loss(
    probs_TE: torch.Tensor,
    indices_TK: torch.Tensor,
    tokens_per_expert_E: torch.Tensor | None = None,
    num_slots: torch.Tensor | int | None = None,
    token_mask_T: torch.Tensor | None = None,
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
        token_mask_T: (T,) bool, the real tokens: P is their mean, and the default counts and
            slots are theirs (pass ``tokens_per_expert_E`` counted over them too); None = all.

    Returns:
        fp32 scalar.
    """
    num_tokens, num_experts = probs_TE.shape
    if tokens_per_expert_E is None:
        flat_S = indices_TK.reshape(-1)  # a scatter-add, not bincount: no host sync on a GPU
        ones_S = (torch.ones_like(flat_S) if token_mask_T is None
                  else token_mask_T.unsqueeze(-1).expand_as(indices_TK).reshape(-1).long())
        tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.long, device=flat_S.device).scatter_add_(
            0, flat_S, ones_S
        )
    if num_slots is not None:
        slots = num_slots
    elif token_mask_T is None:
        slots = max(indices_TK.numel(), 1)
    else:  # real tokens × K, on the device (no host sync)
        slots = (token_mask_T.sum() * indices_TK.shape[1]).clamp_min(1)
    f_E = tokens_per_expert_E.float() / slots  # (E,) share of the T·K slots
    p_E = _token_mean(probs_TE.float(), token_mask_T)  # (E,)
    return num_experts * (f_E * p_E).sum()


def router_z_loss(logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_j x_tj)²``; keeps router logits small.

    Args:
        logits_TE: (T, E) router logits.
        token_mask_T: (T,) bool, the tokens the mean is over (the real ones); None = all.

    Returns:
        fp32 scalar.
    """
    return _token_mean(torch.logsumexp(logits_TE.float(), dim=-1).square(), token_mask_T)


def sequence_balancing_loss(probs_TE: torch.Tensor, indices_TK: torch.Tensor, batch_size: int,
                            token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balancing loss: ``E · Σ_i f_i · P_i`` per sequence, averaged.

    Balances within every sequence rather than over the batch, so one sequence cannot put all
    its tokens on one expert even when the batch as a whole looks balanced. With the sigmoid
    router ``probs_TE`` holds V3's normalised affinities.

    Args:
        probs_TE: (B·T, E) router probabilities, sequence-major (row b·T + t).
        indices_TK: (B·T, K) the top-k of the affinities, without aux-free bias or group limit
            (``RouterOutput.unbiased_indices_TK``; DeepSeek-V3 eq. 18), dropped slots included.
        batch_size: B.
        token_mask_T: (B·T,) bool, the real tokens (sequence-major): each sequence's f and P
            count its real tokens only, and a sequence without any is left out of the mean;
            None = all.

    Returns:
        fp32 scalar (1 when every sequence is uniform).
    """
    num_tokens, num_experts = probs_TE.shape
    seq_len = num_tokens // batch_size
    top_k = indices_TK.shape[1]
    idx_BS = indices_TK.reshape(batch_size, seq_len * top_k)  # (B, T·K)
    if token_mask_T is None:
        ones_BS = torch.ones(idx_BS.shape, device=probs_TE.device)
    else:
        real_BT = token_mask_T.reshape(batch_size, seq_len).float()  # (B, T)
        ones_BS = real_BT.repeat_interleave(top_k, dim=1)  # (B, T·K): slot t·K + k is token t's
    counts_BE = torch.zeros(batch_size, num_experts, device=probs_TE.device).scatter_add_(1, idx_BS, ones_BS)
    if token_mask_T is None:
        f_BE = counts_BE / (seq_len * top_k)  # (B, E) share of each sequence's slots
        p_BE = probs_TE.float().view(batch_size, seq_len, num_experts).mean(dim=1)  # (B, E)
        return num_experts * (f_BE * p_BE).sum(dim=-1).mean()
    real_B1 = real_BT.sum(dim=1, keepdim=True)  # (B, 1)
    f_BE = counts_BE / (real_B1 * top_k).clamp_min(1.0)
    p_BE = (probs_TE.float().view(batch_size, seq_len, num_experts) * real_BT.unsqueeze(-1)).sum(dim=1)
    p_BE = p_BE / real_B1.clamp_min(1.0)  # (B, E) mean over each sequence's real tokens
    has_B = (real_B1.squeeze(1) > 0).float()  # (B,) sequences with a real token
    return num_experts * ((f_BE * p_BE).sum(dim=-1) * has_B).sum() / has_B.sum().clamp_min(1.0)


def global_balancing_loss(probs_TE: torch.Tensor, global_counts_E: torch.Tensor,
                          token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
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
            top-k of the affinities without aux-free bias or group limit (as the sequence loss),
            over real tokens only when there is padding.
        token_mask_T: (T,) bool, the tokens P is the mean over (the real ones); None = all.

    Returns:
        fp32 scalar.
    """
    num_experts = probs_TE.shape[1]
    counts_E = global_counts_E.float()
    f_E = counts_E / counts_E.sum().clamp_min(1.0)
    return num_experts * (f_E * _token_mean(probs_TE.float(), token_mask_T)).sum()
