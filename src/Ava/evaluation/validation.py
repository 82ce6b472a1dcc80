"""The validation loss: one function behind the trainer's evaluations and ``ava eval``.

Legend: B rows of a batch, T positions, V vocabulary.

The loss is the model's own objective (``lm_loss``: cross-entropy, or the label-smoothed / focal
loss when ``model.loss`` sets one) averaged over every position that carries a label, weighted by
that count across batches, so a batch with masked positions counts for what it holds. Scoring the
predictions too (``calibration``) adds the plain cross-entropy from the logits (``nll``, comparable
across objectives), top-1 accuracy and calibration from the same forward passes. The MoE routing
metrics come from :mod:`Ava.models.routing_metrics` (its numeric convention applies).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, SequentialSampler, default_collate

from ..data.packing import IGNORE_INDEX
from ..models.routing_metrics import RoutingTotals
from .calibration import CalibrationBins

if TYPE_CHECKING:
    from ..models import EnhancedMoEModel

Batch = dict[str, torch.Tensor]


@torch.no_grad()
def validation_loss(
    model: EnhancedMoEModel,
    dataset: Dataset,
    *,
    batch_size: int,
    max_batches: int | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    document_mask: bool = False,
    calibration: CalibrationBins | None = None,
    routing: RoutingTotals | None = None,
    on_batch: Callable[[int], None] | None = None,
    extra_inputs: Callable[[Batch], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Mean loss over the first batches of ``dataset``, read in order, with the MoE load diagnostics.

    The model runs in eval mode (its previous mode is restored afterwards) without gradients.

    Args:
        model: the model.
        dataset: samples as the data pipeline yields them (dicts with ``input_ids``, ``labels``
            and optionally ``position_ids`` / ``document_ids``, each (T,)) or bare (T,) id
            tensors (labels = ids). Samples of unequal length are right-padded within a batch
            (padding carries no label, so causal attention keeps it out of every scored position,
            and the model's ``token_mask`` keeps it out of the routing metrics).
        batch_size: samples per forward pass.
        max_batches: stop after this many batches; None = the whole dataset.
        device: where to run; None = where the model's parameters are.
        autocast_dtype: run the forward under ``torch.autocast`` with this dtype (e.g.
            ``torch.bfloat16``); None = no autocast.
        document_mask: pass ``document_ids`` to the model (block-diagonal attention inside
            packed rows), as ``data.document_mask`` does in training.
        calibration: when given, every scored position's top-1 probability and correctness are
            added to it, and the result also holds ``nll``, ``accuracy`` and ``tokens``.
        routing: when given, every batch's router statistics are also added to it (to total
            several calls, e.g. several sources of ``ava eval``).
        on_batch: called after each batch with its number of samples (a progress bar's update).
        extra_inputs: more keyword arguments of the forward for a batch (on the device), e.g. the
            replay memory's cross-attention context (``memory.context_items``).

    Returns:
        ``loss`` (nats per predicted token; nan when nothing was scored), ``ppl``
        (``exp(min(loss, 50))``); with MoE layers ``expert_load`` and ``expert_load_layers``
        (:func:`~Ava.models.routing_metrics.expert_load_shares`) and the scalars of
        :func:`~Ava.models.routing_metrics.moe_diagnostics` as floats; with ``calibration`` also
        ``nll`` (plain cross-entropy of the logits, nats per predicted token, whatever
        ``model.loss`` trains), ``accuracy`` (top-1) and ``tokens`` (positions scored, int).
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=SequentialSampler(dataset), collate_fn=_collate)
    loss_sum, count, correct, nll_sum = 0.0, 0, 0, 0.0
    totals = RoutingTotals()
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with _autocast(device, autocast_dtype):
            out = model(batch["input_ids"], **_forward_inputs(batch, document_mask),
                        **(extra_inputs(batch) if extra_inputs is not None else {}))
        n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())  # positions that carry a label
        loss_sum += out.lm_loss.item() * n
        count += n
        totals.add(out.router_stats)
        if routing is not None:
            routing.add(out.router_stats)
        if calibration is not None:
            right, nll = _add_predictions(calibration, out.logits, batch["labels"])
            correct, nll_sum = correct + right, nll_sum + nll
        if on_batch is not None:
            on_batch(int(batch["input_ids"].shape[0]))
    model.train(was_training)
    loss = loss_sum / count if count else float("nan")
    result: dict[str, Any] = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
    result.update(totals.metrics())
    if calibration is not None:
        result["nll"] = nll_sum / count if count else float("nan")
        result["accuracy"] = correct / count if count else float("nan")
        result["tokens"] = count
    return result


def _forward_inputs(batch: Batch, document_mask: bool) -> dict[str, Any]:
    """Keyword arguments of the model's forward for ``batch`` (labels included; ``token_mask``
    when the batch was padded)."""
    inputs: dict[str, Any] = {"labels": batch["labels"], "position_ids": batch.get("position_ids")}
    if document_mask and "document_ids" in batch:
        inputs["document_ids"] = batch["document_ids"]
    if "token_mask" in batch:
        inputs["token_mask"] = batch["token_mask"]
    return inputs


def _add_predictions(
    calibration: CalibrationBins, logits_BTV: torch.Tensor, labels_BT: torch.Tensor
) -> tuple[int, float]:
    """Score every labelled position: add its top-1 confidence and correctness to ``calibration``.

    Returns:
        How many top-1 predictions were right, and the summed cross-entropy (nats).
    """
    logprobs_BTV = logits_BTV[:, :-1].float().log_softmax(dim=-1)  # position t predicts label t + 1
    target_BT = labels_BT[:, 1:]
    valid_BT = target_BT != IGNORE_INDEX
    nll_BT = -logprobs_BTV.gather(-1, target_BT.clamp_min(0)[..., None]).squeeze(-1)
    top = logprobs_BTV.max(dim=-1)
    correct_BT = top.indices == target_BT
    calibration.add(top.values[valid_BT].exp(), correct_BT[valid_BT].float())
    return int(correct_BT[valid_BT].sum()), float(nll_BT[valid_BT].sum())


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _collate(samples: Sequence[Batch | torch.Tensor]) -> Batch:
    """Stack samples into a batch; bare id tensors become ``{input_ids, labels}``.

    Samples of one length stack as the training loader stacks them; shorter ones are
    right-padded (ids 0, labels :data:`IGNORE_INDEX`, default positions) and the batch gets a
    ``token_mask`` ((B, T) bool, False = padding) for the model's routing statistics.
    """
    rows = [{"input_ids": s, "labels": s} if isinstance(s, torch.Tensor) else s for s in samples]
    width = max(len(r["input_ids"]) for r in rows)
    if all(len(r["input_ids"]) == width for r in rows):
        return default_collate(rows)
    padded = []
    for r in rows:
        pad = width - len(r["input_ids"])
        padded.append({
            "input_ids": torch.nn.functional.pad(r["input_ids"], (0, pad), value=0),
            "labels": torch.nn.functional.pad(r["labels"], (0, pad), value=IGNORE_INDEX),
            "token_mask": torch.arange(width) < len(r["input_ids"]),
        })
    return default_collate(padded)
