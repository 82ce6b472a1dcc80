"""Routing metrics of MoE layers: load balance (MaxVio, load entropy, dead experts), dropped
tokens and router statistics. One implementation, read by the training metrics
(``training/metrics.py``) and by ``ava eval`` (``evaluation/``).

Shape suffixes as in Ava/__init__.py; Q the MoE layers, E experts.

Numeric convention (the same wherever these numbers are shown):

- Inputs are routed token-slot counts per layer (:attr:`RouterStats.tokens_per_expert`, before
  capacity dropping), summed over the batches of interest (a step's micro-batches, an
  evaluation's batches). Padding of unpacked rows, which the model is told of with its
  ``token_mask``, is in none of them (nor in the router entropy, logit norm, dropped or unrouted
  tokens).
- Everything is computed in fp32 on the counts' device and returned as tensors, so the training
  loop pays no host synchronisation until it logs (fp32 counts are exact up to 2^24 per expert;
  above that the ratios keep fp32's ~1e-7 relative precision).
- ``load share_i = c_i / Σ_j c_j``; all 0 for a layer that routed no token. Lists for JSON
  (``expert_load``, ``load_shares``) are rounded to 4 decimals.
- ``MaxVio = max_i c_i / mean_i c_i − 1`` (Wang et al. 2024): 0 = perfectly balanced, E − 1 =
  everything on one expert; 0 for a layer that routed no token.
- ``load entropy = H(share) / ln E`` with ``0 · ln 0 = 0``: 1 = uniform, 0 = one expert takes
  all (and for a layer that routed no token); 1 when E = 1.
- dead experts: experts with ``c_i = 0`` (a count in the scalar diagnostics, the indices in the
  per-layer report).
- router entropy and router logit norm: each batch's mean over its tokens (as
  :class:`RouterStats` carries them), averaged over batches with equal weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from .outputs import RouterStats

# --------------------------------------------------------------------------------------------
# per-layer load statistics over counts
# --------------------------------------------------------------------------------------------


def max_vio(counts_QE: torch.Tensor) -> torch.Tensor:
    """MaxVio per layer: ``max_i load_i / mean load − 1`` (Wang et al. 2024).

    Args:
        counts_QE: (Q, E) or (E,) token counts.

    Returns:
        (L,) or scalar fp32: 0 = perfectly balanced (or nothing routed), E − 1 = everything on
        one expert.
    """
    loads = counts_QE.float()
    mean = loads.mean(dim=-1)
    vio = loads.max(dim=-1).values / mean.clamp_min(1e-9) - 1.0
    return torch.where(mean > 0, vio, torch.zeros_like(vio))


def load_entropy(counts_QE: torch.Tensor) -> torch.Tensor:
    """Normalised entropy of the load shares per layer: 1 = uniform, 0 = one expert takes all.

    Args:
        counts_QE: (Q, E) or (E,) token counts.

    Returns:
        (L,) or scalar fp32, ``H(share) / ln E`` (1 when E = 1).
    """
    loads = counts_QE.float()
    E = loads.shape[-1]
    if E == 1:
        return torch.ones_like(loads[..., 0])
    share = loads / loads.sum(dim=-1, keepdim=True).clamp_min(1e-9)
    entropy = -(share * share.clamp_min(1e-20).log()).sum(dim=-1)
    return entropy / math.log(E)


def dead_experts(counts_QE: torch.Tensor) -> torch.Tensor:
    """Experts that received no token, per layer.

    Args:
        counts_QE: (Q, E) or (E,) token counts over the window of interest.

    Returns:
        (L,) or scalar long.
    """
    return (counts_QE == 0).sum(dim=-1)


def load_shares(counts_QE: torch.Tensor) -> torch.Tensor:
    """Share of the routed token-slots per expert.

    Args:
        counts_QE: (Q, E) or (E,) token counts.

    Returns:
        Same shape, fp32; each layer sums to 1 (all 0 for a layer that routed nothing).
    """
    loads = counts_QE.float()
    return loads / loads.sum(dim=-1, keepdim=True).clamp_min(1.0)


def token_drop_rate(dropped: torch.Tensor | float, routed: torch.Tensor | float) -> torch.Tensor:
    """Share of routed token-slots dropped by capacity (0 when dropless).

    Args:
        dropped: token-slots dropped, summed over layers.
        routed: token-slots routed, summed over layers.

    Returns:
        fp32 scalar.
    """
    return torch.as_tensor(dropped, dtype=torch.float32) / max(float(routed), 1.0)


def moe_layer_ids(layers: list[int] | None, count: int) -> list[int]:
    """The decoder layer index of each of ``count`` MoE layers.

    Args:
        layers: from :func:`accumulate_router_stats` (``acc["layers"]``), or None.
        count: number of MoE layers.

    Returns:
        ``layers`` when it names ``count`` layers, else 0..count−1.
    """
    return list(layers) if layers is not None and len(layers) == count else list(range(count))


# --------------------------------------------------------------------------------------------
# accumulating over batches
# --------------------------------------------------------------------------------------------


def add_loads(acc: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sum of two per-layer lists of (E,) token counts (``acc`` empty at the start).

    Args:
        acc: the running sums.
        new: one batch's ``tokens_per_expert`` per MoE layer.

    Returns:
        The new running sums.
    """
    if not acc:
        return list(new)
    return [a + b for a, b in zip(acc, new, strict=True)]


def accumulate_router_stats(acc: dict[str, Any], router_stats: list[RouterStats]) -> dict[str, Any]:
    """Running sums of the scalar router statistics over the micro-batches of a step (or an eval).

    Args:
        acc: the previous result ({} at the start).
        router_stats: ``MoEModelOutput.router_stats`` of one batch (one entry per MoE layer).

    Returns:
        ``{"dropped": (L,) long, "router_entropy": (L,), "router_logit_norm": (L,), "batches": (),
        "unrouted": (L,) long, "tokens": (L,)}`` sums on the device (:func:`moe_diagnostics`
        averages entropy and norm over ``batches``),
        and ``"layers"``: the decoder layer index of each entry (MTP block j: ``num_layers + j −
        1``), which names the per-layer metrics.
    """
    if not router_stats:
        return acc
    new = {
        "dropped": torch.stack([s.dropped_tokens for s in router_stats]),
        "router_entropy": torch.stack([s.router_entropy for s in router_stats]),
        "router_logit_norm": torch.stack([s.logit_norm for s in router_stats]),
        "batches": torch.ones(()),
    }
    # num_tokens: an int, or the real tokens of a masked forward as a device scalar (not read here)
    if all(s.unrouted_tokens is not None and s.num_tokens is not None for s in router_stats):
        new["unrouted"] = torch.stack([s.unrouted_tokens for s in router_stats])
        new["tokens"] = torch.stack([torch.as_tensor(s.num_tokens, device=s.unrouted_tokens.device)
                                     for s in router_stats])
    summed = {k: acc[k] + v if k in acc else v for k, v in new.items()}
    return {**summed, "layers": [int(s.layer) for s in router_stats]}


# --------------------------------------------------------------------------------------------
# what metrics and reports show
# --------------------------------------------------------------------------------------------


def moe_diagnostics(tokens_per_expert: list[torch.Tensor],
                    router_acc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scalar routing diagnostics of one step (or one evaluation) for metrics.jsonl / TensorBoard.

    Args:
        tokens_per_expert: one (E,) routed count per MoE layer, summed over the batches.
        router_acc: from :func:`accumulate_router_stats`, or None.

    Returns:
        ``max_vio`` (mean over layers), ``max_vio_worst`` (worst layer), ``load_entropy`` (mean
        normalised), ``dead_experts`` (summed over layers), ``token_drop_rate``, and when
        ``router_acc`` is given ``router_entropy`` and ``router_logit_norm`` (means over layers)
        and ``unrouted_rate`` (tokens that no expert computed, over tokens × layers); plus per
        layer ``moe/l{i}/max_vio`` and ``moe/l{i}/load_entropy``, i = the decoder layer index
        from ``router_acc["layers"]`` (:func:`moe_layer_ids`). 0-dim tensors, read (synced) by
        the caller when it logs. {} without MoE layers.
    """
    if not tokens_per_expert:
        return {}
    counts_QE = torch.stack([t.detach().float() for t in tokens_per_expert])  # (Q, E)
    vio_Q, ent_Q = max_vio(counts_QE), load_entropy(counts_QE)
    out: dict[str, Any] = {
        "max_vio": vio_Q.mean(),
        "max_vio_worst": vio_Q.max(),
        "load_entropy": ent_Q.mean(),
        "dead_experts": dead_experts(counts_QE).sum(),
    }
    if router_acc:
        out["token_drop_rate"] = token_drop_rate(router_acc["dropped"].sum().float(), counts_QE.sum())
        batches = float(router_acc["batches"])
        out["router_entropy"] = router_acc["router_entropy"].mean() / batches
        out["router_logit_norm"] = router_acc["router_logit_norm"].mean() / batches
        if "unrouted" in router_acc:
            out["unrouted_rate"] = router_acc["unrouted"].sum().float() / router_acc["tokens"].sum().clamp_min(1)
    for k, layer in enumerate(moe_layer_ids((router_acc or {}).get("layers"), counts_QE.shape[0])):
        out[f"moe/l{layer}/max_vio"] = vio_Q[k]
        out[f"moe/l{layer}/load_entropy"] = ent_Q[k]
    return out


def expert_load_shares(tokens_per_expert: list[torch.Tensor], layers: list[int] | None = None) -> dict[str, Any]:
    """Per-layer share of routed assignments per expert, for the expert-load heatmap.

    (MaxVio and the other scalars come from :func:`moe_diagnostics`.)

    Args:
        tokens_per_expert: one ``(E,)`` tensor of routed token counts per MoE layer.
        layers: the decoder layer index of each; None = 0..L−1 (:func:`moe_layer_ids`).

    Returns:
        ``{"expert_load": [[share per expert] per layer], "expert_load_layers": [layer index]}``,
        or {} without MoE layers.
    """
    if not tokens_per_expert:
        return {}
    share_QE = load_shares(torch.stack(list(tokens_per_expert)))
    return {"expert_load": [[round(v, 4) for v in row] for row in share_QE.tolist()],
            "expert_load_layers": moe_layer_ids(layers, len(tokens_per_expert))}


def expert_utilisation(counts_E: torch.Tensor, router_entropy: float | None = None) -> dict[str, Any]:
    """Load statistics of one MoE layer, for reports (plain Python numbers).

    Args:
        counts_E: (E,) token-slots routed to each expert.
        router_entropy: mean entropy of the router probabilities (nats), if known.

    Returns:
        ``load_shares`` (sum 1, 4 decimals), ``max_vio``, ``load_entropy`` (normalised),
        ``dead_experts`` (indices never chosen), ``router_entropy`` and
        ``router_entropy_normalised`` (/ ln E; None when unknown or E = 1).
    """
    counts = counts_E.detach()
    E = counts.numel()
    return {
        "load_shares": [round(v, 4) for v in load_shares(counts).tolist()],
        "max_vio": float(max_vio(counts)),
        "load_entropy": float(load_entropy(counts)),
        "dead_experts": (counts == 0).nonzero().flatten().tolist(),
        "router_entropy": router_entropy,
        "router_entropy_normalised": router_entropy / math.log(E) if router_entropy is not None and E > 1 else None,
    }


@dataclass
class RoutingTotals:
    """Routing statistics of MoE layers summed over batches: counts and router statistics.

    Attributes:
        counts: one (E,) routed count per MoE layer (:func:`add_loads`).
        router_acc: the sums of :func:`accumulate_router_stats`.
    """

    counts: list[torch.Tensor] = field(default_factory=list)
    router_acc: dict[str, Any] = field(default_factory=dict)

    def add(self, router_stats: list[RouterStats]) -> None:
        """Add one batch's ``MoEModelOutput.router_stats``."""
        self.counts = add_loads(self.counts, [s.tokens_per_expert for s in router_stats])
        self.router_acc = accumulate_router_stats(self.router_acc, router_stats)

    @property
    def layers(self) -> list[int]:
        """The decoder layer index of each MoE layer seen."""
        return moe_layer_ids(self.router_acc.get("layers"), len(self.counts))

    def metrics(self) -> dict[str, float | list]:
        """:func:`expert_load_shares` and :func:`moe_diagnostics` as plain numbers ({} without MoE)."""
        if not self.counts:
            return {}
        out: dict[str, float | list] = dict(expert_load_shares(self.counts, self.router_acc.get("layers")))
        out.update({k: float(v) for k, v in moe_diagnostics(self.counts, self.router_acc).items()})
        return out

    def per_layer(self) -> dict[int, dict[str, Any]]:
        """Decoder layer index → :func:`expert_utilisation` of that layer's counts."""
        out = {}
        entropy = self.router_acc.get("router_entropy")
        batches = float(self.router_acc["batches"]) if self.router_acc else 0.0
        for k, (layer, counts_E) in enumerate(zip(self.layers, self.counts, strict=True)):
            mean_entropy = float(entropy[k]) / batches if entropy is not None and batches else None
            out[layer] = expert_utilisation(counts_E, mean_entropy)
        return out
