"""DeepSeek-style total loss: LM + multi-token prediction + balancing terms, in one place.

Shape suffixes: see ``Ava/__init__.py``; here B batch, T sequence, V vocabulary, D hidden, M the
multi-token-prediction heads (depths).

The rule the whole code base relies on (trainer logging, gradient surgery, reports) is defined
here once, by :func:`total_loss`::

    loss = lm_loss + Σ aux_losses

Every term in ``aux_losses`` is already weighted: the balance terms by their ``model.moe``
coefficients, ``mtp`` by ``λ / M`` (DeepSeek-V3), ``uncertainty`` is the change made by learned
uncertainty weighting. :func:`assemble_losses` builds the dict and the total.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import LossConfig
from .advanced_losses import UncertaintyWeighting, causal_lm_objective
from .language_modeling import IGNORE_INDEX


# A next-token objective: (head output, labels (B, T)) -> fp32 scalar mean over valid positions.
# The head output is (B, T, V) logits for causal_lm_objective, or (B, T, D) normalised hidden states
# for the fused head (losses/fused_head.py), which never materialises the logits.
Objective = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def logits_objective(cfg: LossConfig | None) -> Objective:
    """The default :data:`Objective`: ``causal_lm_objective`` with ``cfg`` on (B, T, V) logits."""
    return lambda logits_BTV, labels_BT: causal_lm_objective(logits_BTV, labels_BT, cfg)


@dataclass(frozen=True)
class LossTerms:
    """The assembled loss of one forward pass.

    Attributes:
        loss: fp32 scalar ``lm_loss + Σ aux_losses``.
        lm_loss: fp32 scalar, the main head's objective (``model.loss``), unweighted.
        aux_losses: weighted terms by name (balance terms, ``mtp``, ``uncertainty``).
        mtp_head_losses: unweighted per-head objectives L_1..L_M (empty without MTP).
    """

    loss: torch.Tensor
    lm_loss: torch.Tensor
    aux_losses: dict[str, torch.Tensor]
    mtp_head_losses: list[torch.Tensor]


def total_loss(lm_loss: torch.Tensor, aux_losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """``lm_loss + Σ aux_losses`` (the one definition of the training loss).

    Args:
        lm_loss: fp32 scalar.
        aux_losses: already-weighted scalar terms.

    Returns:
        fp32 scalar.
    """
    return lm_loss + sum(aux_losses.values()) if aux_losses else lm_loss


def shift_labels(labels_BT: torch.Tensor, shift: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Labels moved ``shift`` positions left, the vacated tail filled with ``ignore_index``.

    Feeding ``shift_labels(labels, j)`` to a next-token loss makes position i predict
    ``labels[:, i + j + 1]`` — the target of MTP head j.

    Args:
        labels_BT: (B, T) long.
        shift: j ≥ 0.
        ignore_index: fill value.

    Returns:
        (B, T) long.
    """
    if shift == 0:
        return labels_BT
    tail = labels_BT.new_full((labels_BT.shape[0], min(shift, labels_BT.shape[1])), ignore_index)  # (B, shift)
    return torch.cat([labels_BT[:, shift:], tail], dim=1)


def mtp_loss(
    mtp_logits: list[torch.Tensor],
    labels_BT: torch.Tensor,
    loss_weight: float,
    cfg: LossConfig | None = None,
    objective: Objective | None = None,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """DeepSeek-V3 multi-token prediction loss ``L_MTP = (λ / M)·Σ_j L_j``.

    Head j (1-based) at position i predicts token i + j + 1; its logits are aligned with the
    input positions like the main head's, so L_j is the configured next-token objective on
    labels shifted by j.

    Args:
        mtp_logits: M tensors (B, T, V), head 1 first.
        labels_BT: (B, T) labels aligned with the inputs, -100 = ignore.
        loss_weight: λ.
        cfg: the LM objective (label smoothing, focal, chunking) shared with the main head.
        objective: replaces ``causal_lm_objective(·, ·, cfg)``; with the fused head
            ``mtp_logits`` are the heads' normalised hidden states.

    Returns:
        ``(weighted L_MTP, [L_1, ..., L_M] unweighted)``, fp32 scalars.
    """
    objective = objective or logits_objective(cfg)
    head_losses = [
        objective(logits_BTV, shift_labels(labels_BT, j)) for j, logits_BTV in enumerate(mtp_logits, start=1)
    ]
    return loss_weight / len(head_losses) * torch.stack(head_losses).sum(), head_losses


def assemble_losses(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    balance_terms: dict[str, torch.Tensor],
    mtp_logits: list[torch.Tensor] | None = None,
    mtp_weight: float = 0.0,
    cfg: LossConfig | None = None,
    weighting: UncertaintyWeighting | None = None,
    objective: Objective | None = None,
) -> LossTerms:
    """LM + MTP + balance terms (+ uncertainty weighting) into the total loss.

    Args:
        logits_BTV: (B, T, V) main-head logits.
        labels_BT: (B, T) labels aligned with the inputs, -100 = ignore.
        balance_terms: the model's weighted balancing / z-loss terms (kept as they are).
        mtp_logits: M tensors (B, T, V) from the MTP heads, or None.
        mtp_weight: λ of the MTP loss.
        cfg: the LM objective (``model.loss``).
        weighting: learned uncertainty weights over some of the terms, or None.
        objective: the next-token objective of every head; None = ``causal_lm_objective`` with
            ``cfg`` on logits. With the fused head it takes normalised hidden states, and
            ``logits_BTV`` / ``mtp_logits`` hold those instead of logits.

    Returns:
        :class:`LossTerms`; ``aux_losses`` holds the balance terms, then ``mtp``, then
        ``uncertainty``.
    """
    objective = objective or logits_objective(cfg)
    lm_loss = objective(logits_BTV, labels_BT)
    aux_losses = dict(balance_terms)
    head_losses: list[torch.Tensor] = []
    if mtp_logits:
        aux_losses["mtp"], head_losses = mtp_loss(mtp_logits, labels_BT, mtp_weight, cfg, objective)
    if weighting is not None:
        aux_losses["uncertainty"] = weighting({"lm_loss": lm_loss, **aux_losses})
    return LossTerms(total_loss(lm_loss, aux_losses), lm_loss, aux_losses, head_losses)
