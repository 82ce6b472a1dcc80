"""Causal language-modelling cross-entropy (HF convention: labels aligned with input ids).

Shape suffixes: see ``Ava/__init__.py``; here B batch, T sequence, V vocabulary, N the B·T
flattened positions (the last of each row has no target).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shifted_targets(labels_BT: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``labels[:, t+1]`` at position t, ``ignore_index`` at the last position: (B, T) long.

    Next-token losses shift the labels rather than slicing the logits, so the (B, T, V) logits
    are used whole (no copy forward, no zero-filled slice gradient backward).
    """
    return F.pad(labels_BT[:, 1:], (0, 1), value=ignore_index)


def causal_lm_loss(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Mean next-token cross-entropy over the labels that are not ``ignore_index``.

    Position t predicts ``labels[:, t+1]``; the shift happens here, so callers pass labels equal
    to (a masked copy of) ``input_ids``. Computed in fp32: a bf16 log-softmax over a large
    vocabulary loses ~2 digits. With no valid label at all the loss is 0 (not NaN), without a
    host sync.

    Args:
        logits_BTV: (B, T, V) logits, any float dtype.
        labels_BT: (B, T) long targets, ``ignore_index`` where no loss is wanted.
        ignore_index: label value to skip.
        label_smoothing: as in ``F.cross_entropy``.

    Returns:
        fp32 scalar.
    """
    vocab = logits_BTV.shape[-1]
    logits_NV = logits_BTV.reshape(-1, vocab).float()  # (B·T, V): a view in fp32
    labels_N = shifted_targets(labels_BT, ignore_index).reshape(-1)  # (B·T,)
    total = F.cross_entropy(
        logits_NV, labels_N, ignore_index=ignore_index, reduction="sum", label_smoothing=label_smoothing
    )
    count = (labels_N != ignore_index).sum().clamp(min=1)
    return total / count


def causal_lm_row_losses(
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Each row's mean next-token cross-entropy: (B,) fp32, NaN for a row without a valid label.

    The per-row form of :func:`causal_lm_loss` (no label smoothing), for scoring sequences (the
    replay memory's importance); the training loss itself never calls it.
    """
    B, T, vocab = logits_BTV.shape
    labels_BT = shifted_targets(labels_BT, ignore_index)
    token_BT = F.cross_entropy(
        logits_BTV.reshape(-1, vocab).float(), labels_BT.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).reshape(B, T)
    count_B = (labels_BT != ignore_index).sum(dim=1)
    return token_BT.sum(dim=1) / count_B  # 0 / 0 = NaN: no target in the row
