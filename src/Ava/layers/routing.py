"""Routers: learned scores -> chosen experts and gate weights, always computed in fp32.

Shapes (legend in ``Ava/__init__.py``): T tokens (batch × sequence, flattened), D hidden, E routed
experts, K slots per token (``top_k``; E for expert-choice), S = T·K token-slots, C per-expert
capacity. Expert groups have no letter; their tensors say their shape in a comment.

Every router returns the same :class:`RouterOutput`, so dispatch, experts, losses and metrics
never depend on the routing rule. The pure functions here hold the math; :class:`Router` (held as
``mlp.gate``) owns the parameters and buffers and picks the function from the config. The
rules are token-choice (softmax, sigmoid, switch, noisy top-k, hash: each token picks K experts)
or expert-choice (each expert picks c tokens); capacity dropping and expert-choice both turn
slots off, which ``RouterOutput.mask_TK`` records for the expert backends.

Padding (right-padded unpacked rows, ``data.packing: false``) is routed and computed like any
token, but a router given a token mask records it (``RouterOutput.token_mask_T``): the routing
statistics (loads, balancing losses, z-loss, metrics) count real tokens only, and under capacity
or expert-choice a padding slot only takes what the real tokens leave.

Autocast is switched off inside every router: in bf16 the logits of near-tied experts round to the
same value, top-k then flips between them from step to step, and the softmax/z-loss lose
precision exactly where balancing needs it (ST-MoE, torchtitan and HF all keep the router in fp32).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

ROUTERS = ("softmax", "sigmoid", "switch", "noisy_topk", "expert_choice", "hash")
_HASH_MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant (golden ratio · 2^32)


@dataclass(frozen=True)
class RouterOutput:
    """What the router decided, for dispatch, losses and metrics to read.

    Attributes:
        indices_TK: (T, K) long, chosen experts per token, best first.
        weights_TK: (T, K) fp32 gate weights of the chosen experts (0 on slots that are off).
        logits_TE: (T, E) fp32 router logits (the z-loss and the logit-norm metric read them).
        probs_TE: (T, E) fp32 router probabilities over all experts (the balancing losses read
            them): the softmax, or for ``sigmoid`` the scores normalised to sum 1 per token.
        tokens_per_expert_E: (E,) long, token-slots each expert computes (sums to T·K when
            dropless); no gradient.
        mask_TK: (T, K) bool, False where a slot is off (dropped by capacity, or not picked by
            expert-choice); None = every slot is on (dropless token-choice, the fast path).
        dropped_E: (E,) long, slots routed to each expert but dropped by capacity; None = none.
        balance_indices_TK: (T, K) long, the top-k of the affinities alone (no aux-free bias, no
            group limit), which the sequence-wise and global-batch balancing losses count
            (DeepSeek-V3 eq. 18, Megatron's ``compute_routing_scores_for_aux_loss``); None = the
            same as ``indices_TK`` (no bias and no groups, or a router without either).
        token_mask_T: (T,) bool, True = a real token, which the routing statistics count
            (:attr:`routed_per_expert_E`, :attr:`balance_per_expert_E`, the balancing losses,
            the z-loss, the metrics); False = padding, routed and computed like a real token
            (``tokens_per_expert_E`` and ``mask_TK`` cover it: they are what dispatch computes)
            but counted nowhere. None = every token is real.
    """

    indices_TK: torch.Tensor
    weights_TK: torch.Tensor
    logits_TE: torch.Tensor
    probs_TE: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    mask_TK: torch.Tensor | None = None
    dropped_E: torch.Tensor | None = None
    balance_indices_TK: torch.Tensor | None = None
    token_mask_T: torch.Tensor | None = None

    @property
    def unbiased_indices_TK(self) -> torch.Tensor:
        """(T, K) long, the top-k of the affinities without bias or group limit (see above)."""
        return self.indices_TK if self.balance_indices_TK is None else self.balance_indices_TK

    @property
    def routed_per_expert_E(self) -> torch.Tensor:
        """(E,) long, slots the router sent to each expert before capacity dropping, real tokens
        only (padding is not counted; for expert-choice, the real tokens each expert picked)."""
        if self.token_mask_T is None:
            if self.dropped_E is None:
                return self.tokens_per_expert_E
            return self.tokens_per_expert_E + self.dropped_E
        counted_TK = self.token_mask_T.unsqueeze(-1).expand_as(self.indices_TK)  # (T, K)
        if self.mask_TK is not None and self.dropped_E is None:  # expert-choice: the picked slots only
            counted_TK = counted_TK & self.mask_TK
        return count_per_expert(self.indices_TK, self.tokens_per_expert_E.shape[0], counted_TK)

    @property
    def balance_per_expert_E(self) -> torch.Tensor:
        """(E,) long, slots per expert in :attr:`unbiased_indices_TK` over the real tokens (what the
        sequence-wise and global-batch losses count); :attr:`routed_per_expert_E` itself when
        nothing biases the choice."""
        if self.balance_indices_TK is None:
            return self.routed_per_expert_E
        return count_per_expert(self.balance_indices_TK, self.tokens_per_expert_E.shape[0], self.token_mask_T)

    @property
    def dropped_slots(self) -> torch.Tensor:
        """Long scalar, real tokens' slots dropped by capacity (0 when dropless)."""
        if self.dropped_E is None:
            return torch.zeros((), dtype=torch.long, device=self.indices_TK.device)
        if self.token_mask_T is None or self.mask_TK is None:
            return self.dropped_E.sum()
        return (~self.mask_TK & self.token_mask_T.unsqueeze(-1)).sum()

    @property
    def unrouted_tokens(self) -> torch.Tensor:
        """Long scalar, real tokens none of whose slots is computed (0 when every slot is on)."""
        if self.mask_TK is None:
            return torch.zeros((), dtype=torch.long, device=self.indices_TK.device)
        unrouted_T = ~self.mask_TK.any(dim=-1)
        return (unrouted_T if self.token_mask_T is None else unrouted_T & self.token_mask_T).sum()

    @property
    def num_counted_tokens(self) -> int | torch.Tensor:
        """The tokens the statistics count: T, or with a token mask its real tokens (a long
        scalar on the device, so reading it needs no host sync)."""
        return self.indices_TK.shape[0] if self.token_mask_T is None else self.token_mask_T.sum()


def _fp32(x: torch.Tensor) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=x.device.type, enabled=False)


def count_per_expert(indices_TK: torch.Tensor, num_experts: int,
                     counted: torch.Tensor | None = None) -> torch.Tensor:
    """(E,) long, how many of the slots in ``indices_TK`` chose each expert.

    An integer scatter-add into E zeros: exact and deterministic, and unlike ``bincount`` (whose
    output size depends on the data) it needs no host sync on a GPU.

    Args:
        indices_TK: (T, K) long chosen experts.
        num_experts: E.
        counted: (T,) or (T, K) bool, the tokens (or slots) to count; None = all.
    """
    flat_S = indices_TK.reshape(-1)
    if counted is None:
        ones_S = torch.ones_like(flat_S)
    else:
        if counted.dim() == 1:
            counted = counted.unsqueeze(-1)
        ones_S = counted.expand_as(indices_TK).reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.long, device=flat_S.device).scatter_add_(0, flat_S, ones_S)


# --------------------------------------------------------------------------------------------
# selection: top-k, optionally biased and group-limited
# --------------------------------------------------------------------------------------------


def group_limited_mask(scores_TE: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Keep only experts in each token's best ``topk_groups`` of ``n_groups`` groups.

    A group scores the sum of its top-2 expert scores (DeepSeek-V3; the max when a group holds
    one expert). Experts are grouped contiguously: with n = ``n_groups``, group g holds experts
    ``g·E/n .. (g+1)·E/n − 1``.

    Args:
        scores_TE: (T, E) selection scores (already biased, if a bias is used).
        n_groups: the number of groups; divides E.
        topk_groups: groups kept per token (≤ ``n_groups``).

    Returns:
        (T, E) bool, True for experts inside a kept group.
    """
    T, E = scores_TE.shape
    by_group = scores_TE.view(T, n_groups, E // n_groups)  # (T, groups, E/groups)
    group_scores = by_group.topk(min(2, E // n_groups), dim=-1).values.sum(dim=-1)  # (T, groups)
    kept_groups = group_scores.topk(topk_groups, dim=-1).indices  # (T, topk_groups)
    keep_group = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept_groups, True)  # (T, groups)
    return keep_group.repeat_interleave(E // n_groups, dim=1)  # (T, E)


def select_topk(
    scores_TE: torch.Tensor,
    top_k: int,
    bias_E: torch.Tensor | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
) -> torch.Tensor:
    """Indices of the top-k experts by ``scores + bias``, within the kept groups.

    The bias only moves the choice; callers read the gate weights from the unbiased scores.

    Args:
        scores_TE: (T, E) fp32 scores (probabilities or sigmoid scores).
        top_k: K.
        bias_E: (E,) balancing bias, or None.
        n_groups / topk_groups: group-limited routing, or None.

    Returns:
        (T, K) long, best first.
    """
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    if n_groups is not None and topk_groups is not None and n_groups > 1:
        keep_TE = group_limited_mask(choice_TE, n_groups, topk_groups)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    return choice_TE.topk(top_k, dim=-1).indices  # (T, K)


def unbiased_topk(
    scores_TE: torch.Tensor,
    top_k: int,
    bias_E: torch.Tensor | None,
    n_groups: int | None,
    topk_groups: int | None,
) -> torch.Tensor | None:
    """The top-k of the scores alone when the selection was biased or group-limited, else None.

    The balancing losses count f_i from the router's own preference (DeepSeek-V3 eq. 18: the
    top-k of the affinities s_i,t), not from the choice the bias has already corrected: counting
    the corrected choice would make the loss see balance the bias bought and stop pushing the
    affinities. One more top-k over (T, E) on device; no host sync.

    Returns:
        (T, K) long, or None when ``select_topk`` already picked exactly this.
    """
    grouped = n_groups is not None and topk_groups is not None and n_groups > 1
    if bias_E is None and not grouped:
        return None
    return scores_TE.topk(top_k, dim=-1).indices  # (T, K)


# --------------------------------------------------------------------------------------------
# token-choice routers
# --------------------------------------------------------------------------------------------


def route_topk(
    x_TD: torch.Tensor,
    weight_ED: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    *,
    bias_E: torch.Tensor | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling_factor: float = 1.0,
    noise_weight_ED: torch.Tensor | None = None,
) -> RouterOutput:
    """Top-k softmax routing in fp32 (Mixtral / Qwen3-MoE; Switch with K=1; noisy top-k).

    Args:
        x_TD: (T, D) hidden states.
        weight_ED: (E, D) router weight.
        top_k: K.
        norm_topk_prob: renormalise the K chosen probabilities to sum to 1.
        bias_E: (E,) aux-free balancing bias, added to the probabilities for selection only.
        n_groups / topk_groups: group-limited selection.
        routed_scaling_factor: multiply the gate weights by this.
        noise_weight_ED: (E, D) noisy top-k (Shazeer 2017): when given, the softmax is taken over
            ``logits + N(0,1)·softplus(x·W_noise)``; pass it only in training.

    Returns:
        :class:`RouterOutput`; ``logits_TE`` are the clean logits (the z-loss and logit norms
        watch what the router learned, not the noise).
    """
    with _fp32(x_TD):
        x_TD = x_TD.float()
        logits_TE = F.linear(x_TD, weight_ED.float())  # (T, E)
        noisy_TE = logits_TE
        if noise_weight_ED is not None:
            noise_std_TE = F.softplus(F.linear(x_TD, noise_weight_ED.float()))  # (T, E)
            noisy_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        probs_TE = noisy_TE.softmax(dim=-1)
        indices_TK = select_topk(probs_TE, top_k, bias_E, n_groups, topk_groups)
        balance_TK = unbiased_topk(probs_TE, top_k, bias_E, n_groups, topk_groups)
        weights_TK = probs_TE.gather(1, indices_TK)  # (T, K)
        if norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if routed_scaling_factor != 1.0:
            weights_TK = weights_TK * routed_scaling_factor
    return RouterOutput(indices_TK, weights_TK, logits_TE, probs_TE, count_per_expert(indices_TK, weight_ED.shape[0]),
                        balance_indices_TK=balance_TK)


def route_sigmoid(
    x_TD: torch.Tensor,
    weight_ED: torch.Tensor,
    top_k: int,
    norm_topk_prob: bool = True,
    *,
    bias_E: torch.Tensor | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
    routed_scaling_factor: float = 1.0,
) -> RouterOutput:
    """DeepSeek-V3 routing: sigmoid scores, top-k of ``scores + bias``, normalised selected scores.

    Args:
        x_TD: (T, D) hidden states.
        weight_ED: (E, D) router weight.
        top_k: K.
        norm_topk_prob: divide the K selected scores by their sum (V3 does).
        bias_E: (E,) aux-free balancing bias, selection only.
        n_groups / topk_groups: group-limited (node-limited) selection.
        routed_scaling_factor: multiply the gate weights by this (2.5 in V3), so with
            normalisation they sum to exactly this factor.

    Returns:
        :class:`RouterOutput`; ``probs_TE`` holds the scores normalised to sum 1 per token (the
        "normalised affinities" V3's sequence-wise balancing loss uses).
    """
    with _fp32(x_TD):
        logits_TE = F.linear(x_TD.float(), weight_ED.float())  # (T, E)
        scores_TE = logits_TE.sigmoid()
        indices_TK = select_topk(scores_TE, top_k, bias_E, n_groups, topk_groups)
        balance_TK = unbiased_topk(scores_TE, top_k, bias_E, n_groups, topk_groups)
        weights_TK = scores_TE.gather(1, indices_TK)  # (T, K) unbiased scores
        if norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
    return RouterOutput(indices_TK, weights_TK, logits_TE, probs_TE, count_per_expert(indices_TK, weight_ED.shape[0]),
                        balance_indices_TK=balance_TK)


def hash_experts(token_ids_T: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
    """Fixed expert assignment of each token id (Roller et al. 2021, "Hash Layers").

    Expert ``h(id) mod E`` with Knuth's multiplicative hash ``h``, then the next ``K − 1``
    experts cyclically, so the K experts of a token are distinct. Depends on the id only.

    Args:
        token_ids_T: (T,) long token ids.
        num_experts: E.
        top_k: K ≤ E.

    Returns:
        (T, K) long.
    """
    h_T = (token_ids_T.long() * _HASH_MULTIPLIER) % (1 << 32)  # (T,) fits int64
    first_T1 = (h_T % num_experts).unsqueeze(-1)  # (T, 1)
    return (first_T1 + torch.arange(top_k, device=token_ids_T.device)) % num_experts  # (T, K)


def route_hash(
    x_TD: torch.Tensor,
    weight_ED: torch.Tensor,
    top_k: int,
    token_ids_T: torch.Tensor,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> RouterOutput:
    """Hash routing: experts fixed by the token id; gate weights from the softmax router.

    The softmax still runs so the gate weights (and the z-loss/metrics) stay learned signals; with
    ``top_k=1`` and ``norm_topk_prob`` the weight is exactly 1, i.e. plain hash layers.

    Args:
        x_TD: (T, D) hidden states.
        weight_ED: (E, D) router weight.
        top_k: K.
        token_ids_T: (T,) token ids of the same tokens.
        norm_topk_prob: renormalise the K gathered probabilities to sum 1.
        routed_scaling_factor: multiply the gate weights by this.

    Returns:
        :class:`RouterOutput`.
    """
    with _fp32(x_TD):
        logits_TE = F.linear(x_TD.float(), weight_ED.float())  # (T, E)
        probs_TE = logits_TE.softmax(dim=-1)
        indices_TK = hash_experts(token_ids_T, weight_ED.shape[0], top_k)
        weights_TK = probs_TE.gather(1, indices_TK)
        if norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        weights_TK = weights_TK * routed_scaling_factor
    return RouterOutput(indices_TK, weights_TK, logits_TE, probs_TE, count_per_expert(indices_TK, weight_ED.shape[0]))


# --------------------------------------------------------------------------------------------
# capacity and expert-choice: slots that are off
# --------------------------------------------------------------------------------------------


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(CF · T · K / E)``, the most token-slots one expert computes (at least 1)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def apply_capacity(routing: RouterOutput, capacity_factor: float) -> RouterOutput:
    """Drop the token-slots that overflow each expert's capacity C.

    Priority is GShard's: every token's first choice before any second choice, and within a
    choice rank, earlier tokens first; with a token mask (``routing.token_mask_T``) every real
    token's slots come before any padding slot, so padding only fills capacity the real tokens
    leave (C itself counts all T tokens: no host read of the real count). A dropped slot gets
    weight 0 and is not computed; a token whose every slot is dropped passes through the residual
    unchanged. The decision depends only on the routing, so every expert backend drops the same
    slots.

    Args:
        routing: a token-choice decision without a mask.
        capacity_factor: CF.

    Returns:
        The routing with ``mask_TK``, zeroed weights on dropped slots, ``tokens_per_expert_E`` =
        computed slots and ``dropped_E`` = dropped slots; unchanged when C ≥ T (nothing can
        overflow: an expert gets at most one slot per token).
    """
    T, K = routing.indices_TK.shape
    E = routing.tokens_per_expert_E.shape[0]
    cap = expert_capacity(T, K, E, capacity_factor)
    if cap >= T:
        return routing
    # The slots in priority order (choice-major: slot k·T + t), not the token-major S order.
    expert_by_priority = routing.indices_TK.t().reshape(-1)  # (K·T,)
    sort_key = expert_by_priority
    if routing.token_mask_T is not None:  # within an expert's group: real slots, then padding
        sort_key = expert_by_priority * 2 + (~routing.token_mask_T).long().repeat(K)
    order = torch.argsort(sort_key, stable=True)  # (K·T,) grouped by expert, priority kept inside
    counts_E = routing.tokens_per_expert_E
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_sorted = torch.arange(order.numel(), device=order.device) - starts_E[expert_by_priority[order]]
    rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (K·T,) place in its expert's queue
    keep_TK = (rank < cap).view(K, T).t().contiguous()  # (T, K)
    kept_E = counts_E.clamp(max=cap)
    return replace(
        routing,
        weights_TK=routing.weights_TK.masked_fill(~keep_TK, 0.0),
        tokens_per_expert_E=kept_E,
        mask_TK=keep_TK,
        dropped_E=counts_E - kept_E,
    )


def route_expert_choice(
    x_TD: torch.Tensor,
    weight_ED: torch.Tensor,
    top_k: int,
    capacity_factor: float,
    routed_scaling_factor: float = 1.0,
    token_mask_T: torch.Tensor | None = None,
) -> RouterOutput:
    """Expert-choice routing (Zhou et al. 2022): each expert takes its top-c tokens.

    ``c = min(T, ceil(CF · T · K / E))``, so on average a token gets CF·K experts but any one
    token may get 0..E. The decision is expressed with K = E slots per token (slot e is expert e)
    and ``mask_TK`` marking the chosen ones; the backends compute only those E·c slots.
    With ``token_mask_T`` an expert picks padding only after every real token.

    Args:
        x_TD: (T, D) hidden states.
        weight_ED: (E, D) router weight.
        top_k: K, the average experts per token at CF = 1.
        capacity_factor: CF.
        routed_scaling_factor: multiply the gate weights by this.
        token_mask_T: (T,) bool, True = real token; None = all real.

    Returns:
        :class:`RouterOutput` with (T, E) indices/weights/mask; every expert computes exactly c.
    """
    T = x_TD.shape[0]
    E = weight_ED.shape[0]
    cap = min(T, expert_capacity(T, top_k, E, capacity_factor))
    with _fp32(x_TD):
        logits_TE = F.linear(x_TD.float(), weight_ED.float())  # (T, E)
        probs_TE = logits_TE.softmax(dim=-1)
        pick_TE = probs_TE if token_mask_T is None else probs_TE.masked_fill(~token_mask_T.unsqueeze(-1), -1.0)
        token_CE = pick_TE.topk(cap, dim=0).indices  # (c, E): expert e's tokens
        mask_TE = torch.zeros_like(probs_TE, dtype=torch.bool).scatter_(0, token_CE, True)
        weights_TE = probs_TE.masked_fill(~mask_TE, 0.0) * routed_scaling_factor
    indices_TE = torch.arange(E, device=x_TD.device).expand(T, E)
    return RouterOutput(
        indices_TK=indices_TE,
        weights_TK=weights_TE,
        logits_TE=logits_TE,
        probs_TE=probs_TE,
        tokens_per_expert_E=torch.full((E,), cap, dtype=torch.long, device=x_TD.device),
        mask_TK=mask_TE,
        token_mask_T=token_mask_T,
    )


# --------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------


class Router(nn.Module):
    """The router of one MoE layer (``mlp.gate``): weight ``[E, D]`` like an ``nn.Linear``.

    Parameters and buffers (state-dict keys under ``mlp.gate.``): ``weight`` always (HF Qwen3-MoE
    name); ``noise_weight`` [E, D] for ``noisy_topk`` (zero-initialised, Shazeer 2017);
    ``expert_bias`` [E] fp32 buffer when ``aux_free_bias`` (selection only, updated by
    :meth:`update_bias`, saved with the weights).

    Args:
        hidden_size: D.
        num_experts: E.
        top_k: K experts per token (≤ E).
        norm_topk_prob: renormalise the chosen weights to sum to 1.
        kind: one of :data:`ROUTERS`.
        routed_scaling_factor: multiply gate weights by this.
        n_groups / topk_groups: group-limited routing (score routers only).
        aux_free_bias: keep a per-expert selection bias.
        capacity_factor / eval_capacity_factor: per-expert capacity in train / eval mode; None =
            dropless (``eval_capacity_factor`` None = ``capacity_factor``).
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        norm_topk_prob: bool = True,
        kind: str = "softmax",
        routed_scaling_factor: float = 1.0,
        n_groups: int | None = None,
        topk_groups: int | None = None,
        aux_free_bias: bool = False,
        capacity_factor: float | None = None,
        eval_capacity_factor: float | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in [1, num_experts={num_experts}]")
        if kind not in ROUTERS:
            raise ValueError(f"unknown router {kind!r}; use one of {list(ROUTERS)}")
        if kind == "expert_choice" and capacity_factor is None:
            raise ValueError("router expert_choice needs a capacity_factor")
        self.num_experts = num_experts
        self.top_k = top_k
        self.norm_topk_prob = norm_topk_prob
        self.kind = kind
        self.routed_scaling_factor = routed_scaling_factor
        self.n_groups = n_groups
        self.topk_groups = topk_groups
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor if eval_capacity_factor is not None else capacity_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.normal_(self.weight, std=0.02)
        self.noise_weight = nn.Parameter(torch.zeros(num_experts, hidden_size)) if kind == "noisy_topk" else None
        if aux_free_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    @property
    def active_capacity_factor(self) -> float | None:
        """The capacity factor of the current mode (train or eval)."""
        return self.capacity_factor if self.training else self.eval_capacity_factor

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor | None = None,
                token_mask_T: torch.Tensor | None = None) -> RouterOutput:
        """Route each token (and apply capacity when a capacity factor is set).

        Args:
            x_TD: (T, D) hidden states, any dtype.
            token_ids_T: (T,) token ids; required by the ``hash`` router, ignored by the others.
            token_mask_T: (T,) bool, True = real token, False = padding: routed like the others
                but left out of the routing statistics and last in line for capacity
                (``RouterOutput.token_mask_T``); None = every token is real.

        Returns:
            A :class:`RouterOutput`; every float tensor in it is fp32.
        """
        cf = self.active_capacity_factor
        if self.kind == "expert_choice":
            return route_expert_choice(x_TD, self.weight, self.top_k, cf, self.routed_scaling_factor, token_mask_T)
        if self.kind == "hash":
            if token_ids_T is None:
                raise ValueError("the hash router needs the token ids: call the MoE block with token_ids_BT")
            out = route_hash(x_TD, self.weight, self.top_k, token_ids_T, self.norm_topk_prob,
                             self.routed_scaling_factor)
        else:
            common = dict(bias_E=self.expert_bias, n_groups=self.n_groups, topk_groups=self.topk_groups,
                          routed_scaling_factor=self.routed_scaling_factor)
            if self.kind == "sigmoid":
                out = route_sigmoid(x_TD, self.weight, self.top_k, self.norm_topk_prob, **common)
            else:  # softmax, switch (top-1, raw probability), noisy_topk
                norm = self.norm_topk_prob and self.kind != "switch"
                noise = self.noise_weight if self.training else None
                out = route_topk(x_TD, self.weight, self.top_k, norm, noise_weight_ED=noise, **common)
        if token_mask_T is not None:
            out = replace(out, token_mask_T=token_mask_T)
        return out if cf is None else apply_capacity(out, cf)

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing step: ``b_i += rate · sign(mean load − load_i)``.

        Underloaded experts become more attractive, overloaded ones less; the bias never enters
        the gate weights, so it steers load without a gradient term (Wang et al. 2024).

        Args:
            load_E: (E,) token-slots routed to each expert over the optimizer step, before
                capacity dropping (see ``EnhancedMoEModel.update_expert_bias``). The bias is not
                re-centred (torchtitan subtracts its mean): only differences of b move top-k.
            rate: γ.
        """
        if self.expert_bias is None:
            return
        load_E = load_E.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(rate * torch.sign(load_E.mean() - load_E))

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind}", f"experts={self.num_experts}", f"top_k={self.top_k}",
                 f"norm_topk_prob={self.norm_topk_prob}"]
        if self.n_groups:
            parts.append(f"groups={self.topk_groups}/{self.n_groups}")
        if self.capacity_factor is not None:
            parts.append(f"capacity_factor={self.capacity_factor}/{self.eval_capacity_factor}")
        if self.expert_bias is not None:
            parts.append("aux_free_bias")
        return ", ".join(parts)


TopKRouter = Router  # the Foundation's name, kept for imports and tests
