"""The configurable LM objective (label smoothing, focal, chunked CE) and uncertainty weighting.

Shape suffixes: see ``Ava/__init__.py``; here B batch, T sequence, V vocabulary, N predicted rows,
Z sequence positions in one chunk (chunked loss). Losses are fp32 per row, as a sum
or as a mean over the valid rows as stated; ``ignore_index`` rows count for nothing. All of it
is switched from ``model.loss`` (:class:`~Ava.config.LossConfig`) and applied to the main head
and to every multi-token-prediction head alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import LossConfig
from .language_modeling import IGNORE_INDEX, shifted_targets


def token_losses(
    logits_NV: torch.Tensor,
    labels_N: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Per-row loss: cross-entropy, smoothed or focal; 0 on ``ignore_index`` rows.

    The logits are cast to fp32 here (a bf16 log-softmax over a large vocabulary loses ~2
    digits). Focal loss (Lin et al. 2017) scales each token's negative log-likelihood by
    ``(1 − p_true)^γ`` and differentiates through that factor too; γ = 0 is exactly the
    cross-entropy.

    Args:
        logits_NV: (N, V) logits, any float dtype.
        labels_N: (N,) long targets.
        ignore_index: label value that contributes nothing.
        label_smoothing: ε as in ``F.cross_entropy``.
        focal_gamma: γ ≥ 0; with γ > 0 ``label_smoothing`` must be 0.

    Returns:
        (N,) fp32.
    """
    logits_NV = logits_NV.float()
    if focal_gamma == 0.0:
        return F.cross_entropy(
            logits_NV, labels_N, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
        )
    if label_smoothing:
        raise ValueError("focal loss with label smoothing is undefined here; use one of them")
    return focal_losses(logits_NV, labels_N, focal_gamma, ignore_index)


def focal_losses(
    logits_NV: torch.Tensor, labels_N: torch.Tensor, gamma: float, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Per-row focal loss ``(1 − p_t)^γ · (−log p_t)`` (Lin et al. 2017), 0 on ignored rows.

    Args:
        logits_NV: (N, V) logits (computed in fp32).
        labels_N: (N,) long targets.
        gamma: focusing parameter γ ≥ 0 (0 = cross-entropy).
        ignore_index: label value that contributes nothing.

    Returns:
        (N,) fp32.
    """
    nll_N = F.cross_entropy(logits_NV.float(), labels_N, ignore_index=ignore_index, reduction="none")  # (N,)
    p_true_N = torch.exp(-nll_N)
    # Ignored rows (nll 0) and certain ones have 1 − p_t = 0, where d/dx x^γ is infinite for γ < 1
    # and times nll = 0 would give NaN; the clamp gives them a zero gradient instead.
    return (1.0 - p_true_N).clamp_min(1e-12).pow(gamma) * nll_N


def chunked_loss_sum(
    logits_BTV: torch.Tensor,
    targets_BT: torch.Tensor,
    chunk_size: int,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    focal_gamma: float = 0.0,
) -> torch.Tensor:
    """Sum of :func:`token_losses` computed ``chunk_size`` sequence positions at a time.

    Each chunk's fp32 log-softmax is freed after its forward and recomputed in backward
    (activation checkpointing), so at any moment fp32 logits exist for at most
    B·chunk_size rows rather than all B·T; the gradient written back into ``logits_BTV`` keeps
    its dtype. Only per-row losses (B·T floats, two per row with label smoothing) are kept and
    summed once, in fp64 where the device has it, combined like ``F.cross_entropy`` combines them
    ((1−ε)·Σ nll + ε/V·Σ(−Σ_v log p_v)); the CPU kernel of ``reduction="sum"`` also accumulates
    in fp64, so the value matches the unchunked loss to fp32 rounding, and the gradient is the
    same computation row by row.

    Args:
        logits_BTV: (B, T, V) logits, position t already aligned with ``targets_BT[:, t]``.
        targets_BT: (B, T) long targets (``ignore_index`` = no loss).
        chunk_size: sequence positions per chunk, ≥ 1.
        ignore_index: label value that contributes nothing.
        label_smoothing: ε.
        focal_gamma: γ.

    Returns:
        fp32 scalar, the sum over valid positions.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    vocab = logits_BTV.shape[-1]
    smoothed = label_smoothing > 0 and focal_gamma == 0.0

    def chunk_rows(logits_BZV: torch.Tensor, targets_BZ: torch.Tensor) -> torch.Tensor:
        logits_NV, targets_N = logits_BZV.reshape(-1, vocab), targets_BZ.reshape(-1)  # N = B·Z
        if not smoothed:
            return token_losses(logits_NV, targets_N, ignore_index, 0.0, focal_gamma)[:, None]  # (N, 1)
        logp_NV = F.log_softmax(logits_NV.float(), dim=-1)  # (N, V) fp32, this chunk only
        nll_N = F.nll_loss(logp_NV, targets_N, ignore_index=ignore_index, reduction="none")
        smooth_N = -logp_NV.sum(dim=-1).masked_fill(targets_N == ignore_index, 0.0)
        return torch.stack([nll_N, smooth_N], dim=1)  # (N, 2)

    recompute = torch.is_grad_enabled() and logits_BTV.requires_grad
    rows: list[torch.Tensor] = []
    for start in range(0, logits_BTV.shape[1], chunk_size):
        logits_BZV = logits_BTV[:, start:start + chunk_size]  # (B, Z, V) view, no copy
        targets_BZ = targets_BT[:, start:start + chunk_size]  # (B, Z)
        if recompute:
            rows.append(checkpoint(chunk_rows, logits_BZV, targets_BZ, use_reentrant=False))
        else:
            rows.append(chunk_rows(logits_BZV, targets_BZ))
    rows_N2 = torch.cat(rows)  # (B·T, 1 or 2)
    if rows_N2.device.type == "mps":  # no float64 there
        sums = rows_N2.sum(dim=0)
    else:
        sums = rows_N2.sum(dim=0, dtype=torch.float64).float()
    if smoothed:
        return (1.0 - label_smoothing) * sums[0] + sums[1] * (label_smoothing / vocab)
    return sums[0]


def causal_lm_objective(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    cfg: LossConfig | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Mean next-token loss as configured by ``model.loss`` (position t predicts ``labels[:, t+1]``).

    With the default :class:`LossConfig` this equals :func:`~Ava.losses.causal_lm_loss`. No valid
    label at all gives 0, without a host sync.

    Args:
        logits_BTV: (B, T, V) logits, any float dtype.
        labels_BT: (B, T) long targets aligned with the inputs (shifted here), -100 = ignore.
        cfg: label smoothing, focal γ and chunk size; None = plain cross-entropy.
        ignore_index: label value to skip.

    Returns:
        fp32 scalar.
    """
    cfg = cfg or LossConfig()
    # Shift the labels, not the logits: the last position gets ignore_index, so the logits are
    # used whole (a view) — slicing them would copy (B, T, V) forward and zero-fill it backward.
    targets_BT = shifted_targets(labels_BT, ignore_index)
    V = logits_BTV.shape[-1]
    if cfg.chunk_size is not None:
        total = chunked_loss_sum(logits_BTV, targets_BT, cfg.chunk_size, ignore_index,
                                 cfg.label_smoothing, cfg.focal_gamma)
    elif cfg.focal_gamma == 0.0:  # exactly causal_lm_loss (one fused reduction)
        total = F.cross_entropy(logits_BTV.reshape(-1, V).float(), targets_BT.reshape(-1),
                                ignore_index=ignore_index, reduction="sum", label_smoothing=cfg.label_smoothing)
    else:
        total = token_losses(logits_BTV.reshape(-1, V), targets_BT.reshape(-1),
                             ignore_index, cfg.label_smoothing, cfg.focal_gamma).sum()
    count = (targets_BT != ignore_index).sum().clamp(min=1)
    return total / count


class UncertaintyWeighting(nn.Module):
    """Learned homoscedastic-uncertainty weights of loss terms (Kendall, Gal & Cipolla 2018).

    Term i becomes ``exp(−s_i)·L_i + s_i/2`` with ``s_i = log σ_i²`` (the paper's form for a
    likelihood whose scale is ``1/σ²``); s starts at 0, so training starts from the unweighted
    sum. The parameters are ``log_vars`` (one per term, in ``terms`` order), registered on the
    model so the optimizer trains them and checkpoints save them.

    The module returns the *change* it makes to the plain sum, so the model keeps
    ``loss = lm_loss + Σ aux_losses`` with ``lm_loss`` the unweighted objective (val loss and
    perplexity stay comparable).

    Args:
        terms: names of the weighted terms (``lm_loss`` or keys of ``aux_losses``).
    """

    def __init__(self, terms: list[str]) -> None:
        super().__init__()
        if not terms or len(set(terms)) != len(terms):
            raise ValueError(f"need distinct term names, got {terms}")
        self.terms = list(terms)
        self.log_vars = nn.Parameter(torch.zeros(len(terms)))

    def weights(self) -> dict[str, torch.Tensor]:
        """Current weights ``exp(−s_i)`` per term (detached)."""
        return {name: w for name, w in zip(self.terms, torch.exp(-self.log_vars.detach()))}

    def forward(self, named_losses: dict[str, torch.Tensor]) -> torch.Tensor:
        """``Σ_i [(exp(−s_i) − 1)·L_i + s_i/2]`` over the configured terms.

        Args:
            named_losses: every loss term by name (must hold each configured term).

        Returns:
            fp32 scalar to add to the plain sum of the terms.
        """
        missing = [name for name in self.terms if name not in named_losses]
        if missing:
            raise KeyError(f"uncertainty weighting: terms {missing} are not produced (have {sorted(named_losses)})")
        losses = torch.stack([named_losses[name].float() for name in self.terms])  # (terms,)
        s = self.log_vars.float()  # (terms,)
        return ((torch.exp(-s) - 1.0) * losses + 0.5 * s).sum()
