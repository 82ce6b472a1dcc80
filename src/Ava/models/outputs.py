"""What the MoE language model returns: :class:`MoEModelOutput` with one :class:`RouterStats` per MoE layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layers import KVCache


@dataclass(frozen=True)
class RouterStats:
    """Per-MoE-layer routing statistics of one forward pass (all detached).

    Every count and mean is over the real tokens when the forward had a ``token_mask``
    (padding of unpacked rows is counted nowhere), else over every token.

    Attributes:
        layer: decoder layer index.
        tokens_per_expert: (E,) long, token-slots the router sent to each expert, before capacity
            dropping (sums to tokens·top_k; c per expert for expert-choice). Load metrics and
            the aux-free bias read this.
        aux_loss: fp32 scalar, the layer's unweighted load-balancing loss (1 = perfectly uniform).
        z_loss: fp32 scalar, the layer's unweighted router z-loss.
        dropped_tokens: long scalar, token-slots dropped by capacity (0 when dropless).
        router_entropy: fp32 scalar, mean over tokens of the entropy of the router probabilities
            (ln E = undecided, 0 = one-hot).
        logit_norm: fp32 scalar, mean over tokens of the L2 norm of the router logits.
        unrouted_tokens: long scalar, tokens none of whose slots is computed (every choice
            dropped by capacity, or no expert picked them under expert-choice): they pass the
            layer on the residual alone.
        num_tokens: tokens routed in this layer (the denominator of the unrouted rate): an
            int, or with a token mask a long scalar tensor of the real tokens (no host sync).
        balance_tokens_per_expert: (E,) long, slots per expert in the top-k of the affinities
            alone (no aux-free bias, no group limit): what the sequence-wise and global-batch
            losses count, and what ``moe_load_prefix`` should accumulate. The same tensor as
            ``tokens_per_expert`` when nothing biases the choice.
    """

    layer: int
    tokens_per_expert: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    dropped_tokens: torch.Tensor | None = None
    router_entropy: torch.Tensor | None = None
    logit_norm: torch.Tensor | None = None
    unrouted_tokens: torch.Tensor | None = None
    num_tokens: int | torch.Tensor | None = None
    balance_tokens_per_expert: torch.Tensor | None = None


@dataclass
class MoEModelOutput:
    """Output of :meth:`EnhancedMoEModel.forward`.

    Attributes:
        loss: ``lm_loss + sum(aux_losses.values())`` (:func:`~Ava.losses.total_loss`); None
            without labels.
        lm_loss: fp32 scalar, the main head's objective (cross-entropy unless ``model.loss``
            sets label smoothing or focal); None without labels.
        aux_losses: already-weighted terms. Balance terms reduced over MoE layers (those of
            the MTP blocks included) by ``model.moe.balance_reduction`` (mean or sum):
            ``load_balance`` (aux_loss_coef), ``seq_load_balance`` (seq_aux_loss_coef),
            ``global_load_balance`` (global_aux_loss_coef), ``z_loss`` (z_loss_coef), each
            weighted by its coefficient at the step set with
            :meth:`EnhancedMoEModel.set_balancing_step`. A term whose coefficient is 0 throughout
            (its own value and its schedule's) is left out (the balance terms also with
            expert-choice, balanced by construction); a scheduled one stays (0 while its
            coefficient is 0), so the set of terms is the same at every step. With labels also
            ``mtp`` (``model.mtp`` on: (λ/M)·Σ_j L_j) and ``uncertainty``
            (``model.loss.uncertainty_weighting``: the change the learned weights make to the
            plain sum).
        logits: (B, T, V); None in a training forward (train mode, grad enabled, labels given,
            no ``return_mtp``) whose loss the fused head computed (``model.loss.fused_head``),
            which never makes them.
        router_stats: one :class:`RouterStats` per MoE layer (main stack, then MTP blocks); empty,
            like ``aux_losses``, in cached inference without labels (decoding).
        past_key_values: per layer ``(k, v)`` each (B, G, L, A) when ``use_cache``, else None.
        mtp_logits: one (B, T, V) per MTP depth j (position i predicts token i + j + 1) when
            the heads ran (labels given or ``return_mtp``), else None (also with the fused head).
    """

    loss: torch.Tensor | None
    lm_loss: torch.Tensor | None
    aux_losses: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    router_stats: list[RouterStats] = field(default_factory=list)
    past_key_values: list[KVCache] | None = None
    mtp_logits: list[torch.Tensor] | None = None
