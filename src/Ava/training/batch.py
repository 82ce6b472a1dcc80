"""Training batches: the dict the data pipeline yields, and what the trainer does with it.

A batch is ``{"input_ids", "labels", "position_ids", "document_ids"}`` (each ``(B, T)`` int64)
plus ``"source"`` (``(B,)``, the mixture source of each row) — see
:func:`Ava.data.packing.window_sample`. Padded unpacked rows (:func:`Ava.data.rows.pad_rows`)
also carry ``"token_mask"`` (``(B, T)`` bool, False = padding), which the model's routing
statistics read; packed windows have none (every token is real). A bare ``(B, T)`` tensor of ids
is accepted everywhere too (labels = ids, default positions, one source), for tests and small
scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..data.packing import positions_from_documents
from ..errors import AvaConfigError

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
    """Keyword arguments of the model's forward for ``batch`` (labels included; ``token_mask``
    when the batch has one, so padding stays out of the routing statistics)."""
    inputs: dict[str, Any] = {"labels": batch["labels"], "position_ids": batch.get("position_ids")}
    if document_mask and "document_ids" in batch:
        inputs["document_ids"] = batch["document_ids"]
    if "token_mask" in batch:
        inputs["token_mask"] = batch["token_mask"]
    return inputs


def predicted_tokens(batch: Batch) -> int:
    """Positions that carry a label after the shift (what the mean loss averages over)."""
    return int((batch["labels"][:, 1:] != -100).sum())


class StepBatches(list):
    """One optimizer step's micro-batches of unpacked rows (``data.packing: false``).

    A list like any step's micro-batches, plus the step's labelled positions over every
    data-parallel rank (``loss_tokens``, known on the host from the batch plan): the trainer
    weights each micro-batch's loss by its share of them (:func:`token_loss_weights`); and the
    step's real (unpadded) tokens over every rank (``real_tokens``), what the token counts and
    tokens/s report.
    """

    def __init__(self, batches: list[Batch], loss_tokens: int, real_tokens: int | None = None) -> None:
        super().__init__(batches)
        self.loss_tokens = loss_tokens
        self.real_tokens = real_tokens


def token_loss_weights(micro_batches: list[Batch | torch.Tensor], ranks: int) -> list[float] | None:
    """Per-micro-batch weights of the main loss so the step's gradient is that of the mean loss
    over all its labelled positions, on every rank together.

    Micro-batch i of a rank gets ``n_i · ranks / N`` (``n_i`` its labelled positions, ``N`` the
    step's over all ranks; ``ranks`` because the data-parallel gradient is the ranks' mean). The
    counts come from the host copies of the batches, before any forward.

    Args:
        micro_batches: the step's micro-batches; a :class:`StepBatches` carries ``N``.
        ranks: data-parallel ranks.

    Returns:
        One weight per micro-batch, or None for batches without a step count (packed windows:
        each micro-batch's mean loss weighs ``1 / len(micro_batches)``, as it always has).
    """
    total = getattr(micro_batches, "loss_tokens", None)
    if total is None:
        return None
    counts = [predicted_tokens(as_batch(b)) for b in micro_batches]
    return [n * ranks / max(int(total), 1) for n in counts]


def step_loss_shares(terms: dict[str, torch.Tensor], accum: int, weight: float | None) -> dict[str, torch.Tensor]:
    """A micro-batch's contribution to the step's loss terms (what its backward differentiates).

    Args:
        terms: ``{"loss", "lm_loss", **aux}`` of the micro-batch (``loss`` = ``lm_loss`` + the rest).
        accum: micro-batches in the step.
        weight: the micro-batch's share of the step's labelled positions
            (:func:`token_loss_weights`); None = every term ``/ accum``.

    Returns:
        Every term scaled: with a weight, ``lm_loss · weight`` and the rest of the loss (balancing
        terms, MTP) ``/ accum``, per micro-batch as before.
    """
    if weight is None:
        return {name: value / accum for name, value in terms.items()}
    shares = {name: value / accum for name, value in terms.items() if name not in ("loss", "lm_loss")}
    lm = terms["lm_loss"] * weight
    shares["lm_loss"] = lm
    shares["loss"] = lm + (terms["loss"] - terms["lm_loss"]) / accum
    return shares


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


@dataclass(frozen=True)
class GlobalBatch:
    """How one optimizer step's sequences are spread over micro-batches and data-parallel ranks.

    The global batch (sequences per optimizer step) defines the optimization and the data order;
    the number of ranks only decides who computes which rows. Each step draws ``grad_accum``
    global micro-batches of ``micro_rows`` = ``per_rank`` × ``ranks`` consecutive sequences of the
    epoch order, and rank r reads rows r, r + ranks, … of each (:meth:`Parallelism.shard`).

    Attributes:
        per_rank: sequences per micro-batch on one rank (``training.batch_size``).
        ranks: data-parallel ranks (processes reading different rows).
        grad_accum: micro-batches per optimizer step.
    """

    per_rank: int
    ranks: int
    grad_accum: int

    @property
    def micro_rows(self) -> int:
        """Sequences of one global micro-batch (all ranks together)."""
        return self.per_rank * self.ranks

    @property
    def size(self) -> int:
        """Sequences per optimizer step (the global batch)."""
        return self.micro_rows * self.grad_accum

    @classmethod
    def resolve(cls, training: Any, ranks: int = 1) -> "GlobalBatch":
        """The plan of ``training`` (a :class:`~Ava.config.TrainingSection`) on ``ranks`` data-parallel ranks.

        ``training.global_batch_size`` null: ``grad_accum_steps`` as set. Otherwise the global batch
        must split evenly into micro-batches of ``batch_size`` on every rank.

        Raises:
            AvaConfigError: the global batch is not a multiple of ``batch_size × ranks``.
        """
        if training.global_batch_size is None:
            return cls(training.batch_size, ranks, training.grad_accum_steps)
        per_micro = training.batch_size * ranks
        if training.global_batch_size % per_micro:
            raise AvaConfigError(
                f"training.global_batch_size: {training.global_batch_size} sequences do not split into micro-batches "
                f"of training.batch_size={training.batch_size} on {ranks} data-parallel rank{'s' if ranks > 1 else ''}; "
                f"use a multiple of {per_micro} or change batch_size"
            )
        return cls(training.batch_size, ranks, training.global_batch_size // per_micro)
