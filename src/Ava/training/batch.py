"""Training batches: the dict the data pipeline yields, and what the trainer does with it.

A batch is ``{"input_ids", "labels", "position_ids", "document_ids"}`` (each ``(B, T)`` int64)
plus ``"source"`` (``(B,)``, the mixture source of each row) — see
:func:`Ava.data.packing.window_sample`. A bare ``(B, T)`` tensor of ids is accepted everywhere
too (labels = ids, default positions, one source), for tests and small scripts.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.packing import positions_from_documents

Batch = dict[str, torch.Tensor]


def as_batch(batch: Batch | torch.Tensor) -> Batch:
    """A dict batch; a bare ``(B, T)`` id tensor becomes ``{"input_ids": ids, "labels": ids}``."""
    if isinstance(batch, torch.Tensor):
        return {"input_ids": batch, "labels": batch}
    return batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def model_inputs(batch: Batch, document_mask: bool) -> dict[str, Any]:
    """Keyword arguments of the model's forward for ``batch`` (labels included)."""
    inputs: dict[str, Any] = {"labels": batch["labels"], "position_ids": batch.get("position_ids")}
    if document_mask and "document_ids" in batch:
        inputs["document_ids"] = batch["document_ids"]
    return inputs


def predicted_tokens(batch: Batch) -> int:
    """Positions that carry a label after the shift (what the mean loss averages over)."""
    return int((batch["labels"][:, 1:] != -100).sum())


def cut_rows(batch: Batch | torch.Tensor, t: int) -> Batch | torch.Tensor:
    """Cut each ``(B, T)`` row into ``⌊T/t⌋`` rows of ``t`` tokens (rows of one window adjacent).

    Position ids restart at each new row (and still at each document start inside it).
    """
    if isinstance(batch, torch.Tensor):
        B, T = batch.shape
        return batch if t >= T else batch[:, : (T // t) * t].reshape(B * (T // t), t)
    B, T = batch["input_ids"].shape
    if t >= T:
        return batch
    pieces = T // t
    out = {k: v[:, : pieces * t].reshape(B * pieces, t) for k, v in batch.items() if v.dim() == 2}
    if "source" in batch:
        out["source"] = batch["source"].repeat_interleave(pieces)
    if "document_ids" in out:
        out["position_ids"] = positions_from_documents(out["document_ids"])
    elif "position_ids" in out:
        out.pop("position_ids")  # default arange positions per row
    return out
