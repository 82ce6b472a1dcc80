"""Progressive training: sequence-length warmup, batch-size ramp and an easy-to-hard curriculum.

One :class:`ProgressiveSchedule`, built from the ``progressive`` config section, decides for every
optimizer step ``s`` how many windows a micro-batch holds, how long its rows are, and in which
order epoch 0 hands out its windows. Every decision is a pure function of the config, the seed
and ``s``, so the trainer's data cursor ``(epoch, batches_in_epoch)`` plus its step identify the
exact position in the data and a resumed run sees what an uninterrupted one would have seen.

Design choices:

- **Sequence-length warmup reshapes, it does not truncate.** A ``(B, T)`` micro-batch of
  ``data.seq_len = T`` windows becomes ``(B·⌊T/t⌋, t)``: each window is cut into ``⌊T/t⌋`` rows
  of the scheduled length ``t``. Tokens per step stay (nearly) constant, so the LR schedule,
  ``_total_steps`` and the data cursor (counted in windows) mean what they mean without warmup.
  When ``t`` does not divide ``T`` the last ``T mod t`` tokens of each window are not trained on
  (choose ``start`` and ``multiple_of`` dividing ``T`` to lose nothing); ``tokens`` counts the
  tokens actually trained on. Attention FLOPs are lower while ``t < T``; MFU still assumes ``T``.
- **The batch-size ramp changes the micro-batch size, not the accumulation count.** Windows are
  taken from the epoch order in sequence, ``b(s)·grad_accum_steps`` per step, so the order of
  windows is the same as without the ramp and only the grouping changes. A step whose group no
  longer fits in the epoch starts the next epoch (as the fixed-size loader drops its partial
  group). Smaller early steps mean more steps per epoch, so ``total_steps`` simulates the ramp.
- **The curriculum reorders a prefix of the seeded order.** The windows the first
  ``curriculum.steps`` steps of epoch 0 would receive in the seeded random order are sorted by a
  difficulty score (stable, ties keep their random order); everything after is untouched. Each
  window is still seen once per epoch, the curriculum covers the whole difficulty range, and from
  step ``curriculum.steps`` on the run is exactly the random-order run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..config import EnhancedTrainingConfig
from ..data.packing import PackedDataset
from ..data.sampling import EpochSampler
from ..errors import AvaCheckpointError, AvaConfigError
from .batch import GlobalBatch, as_batch, cut_rows

logger = logging.getLogger(__name__)


def _ramp(start: int | None, target: int, steps: int, step: int) -> float:
    """Linear value from ``start`` at step 0 to ``target`` at ``steps`` (``target`` when off)."""
    if start is None or steps == 0 or step >= steps:
        return float(target)
    return start + (target - start) * step / steps


def window_difficulty(dataset: Dataset, indices: Sequence[int] | np.ndarray, by: str) -> np.ndarray:
    """A cheap difficulty score per window (higher = harder).

    Args:
        dataset: the packed training windows.
        indices: ``(W,)`` window indices to score.
        by: ``distinct_tokens`` (number of distinct ids in the window) or ``rarity`` (mean
            ``-log p(token)`` under the unigram counts of the whole split).

    Returns:
        ``(W,)`` float64 scores.
    """
    idx = np.asarray(indices, dtype=np.int64)
    windows_WT = np.stack([dataset[int(i)]["input_ids"].numpy() for i in idx]) if idx.size else np.zeros((0, 1), np.int64)
    if by == "distinct_tokens":
        sorted_WT = np.sort(windows_WT, axis=1)
        return 1.0 + (np.diff(sorted_WT, axis=1) != 0).sum(axis=1).astype(np.float64)
    if by == "rarity":
        if isinstance(dataset, PackedDataset):
            all_tokens = dataset.tokens.astype(np.int64)
        else:  # a mixture: the windows it draws in one epoch
            all_tokens = np.concatenate([dataset[i]["input_ids"].numpy() for i in range(len(dataset))])
        counts_V = np.bincount(all_tokens)
        neg_log_p_V = np.log(counts_V.sum()) - np.log(np.maximum(counts_V, 1))
        return neg_log_p_V[windows_WT].mean(axis=1)
    raise ValueError(f"unknown difficulty score {by!r}")


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batches of window indices for consecutive optimizer steps of one epoch.

    Step ``s`` takes ``grad_accum_steps`` micro-batches of ``batch_size(s)`` windows each from
    ``order``, in sequence; iteration ends before the first step whose group does not fit.

    Args:
        order: ``(N,)`` the epoch's window order.
        start: windows of ``order`` already consumed.
        first_step: the global step the first yielded group belongs to.
        batch_size: windows per micro-batch at a given step.
        grad_accum_steps: micro-batches per step.
    """

    def __init__(self, order: torch.Tensor, start: int, first_step: int, batch_size: Callable[[int], int],
                 grad_accum_steps: int) -> None:
        self.order = order
        self.start = start
        self.first_step = first_step
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        pos, step, n = self.start, self.first_step, len(self.order)
        while True:
            b = self.batch_size(step)
            if pos + b * self.grad_accum_steps > n:
                return
            for _ in range(self.grad_accum_steps):
                yield self.order[pos:pos + b].tolist()
                pos += b
            step += 1

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ProgressiveSchedule:
    """Per-step micro-batch size, row length and epoch order of a run.

    Args:
        config: the resolved training config (``progressive``, ``training``, ``data.seq_len``,
            ``run.seed`` are read).
        batch: the global batch plan (default: one process, from ``config.training``); batch sizes
            here are global micro-batches (all data-parallel ranks' rows).

    Example::

        schedule = ProgressiveSchedule(config)
        schedule.seq_len(0), schedule.batch_size(0)   # what step 0 trains on
    """

    def __init__(self, config: EnhancedTrainingConfig, batch: GlobalBatch | None = None) -> None:
        batch = batch if batch is not None else GlobalBatch.resolve(config.training)
        self.batch = batch
        self.settings = config.progressive
        self.full_seq_len = config.data.seq_len
        self.full_batch_size = batch.micro_rows  # a global micro-batch: every data-parallel rank's rows
        self.grad_accum_steps = batch.grad_accum
        if batch.ranks > 1 and self.settings.batch_size_ramp.start is not None:
            raise AvaConfigError(
                f"progressive.batch_size_ramp: a ramped micro-batch cannot be split evenly over {batch.ranks} "
                "data-parallel ranks; set it to null or train on one process"
            )
        self.seed = config.run.seed
        self._applied: tuple[int, int] | None = None  # (micro-batch windows, row length) last applied

    @property
    def active(self) -> bool:
        """Whether any part of progressive training changes something."""
        p = self.settings
        return (
            (p.seq_len_warmup.start is not None and p.seq_len_warmup.steps > 0)
            or (p.batch_size_ramp.start is not None and p.batch_size_ramp.steps > 0)
            or (p.curriculum.by != "none" and p.curriculum.steps > 0)
        )

    # -- per-step values ----------------------------------------------------------------------

    def seq_len(self, step: int) -> int:
        """Row length ``t`` at 0-based optimizer step ``step``.

        ``t = clamp(⌊lin/m⌋·m, start, T)``, ``lin = start + (T − start)·step/steps``,
        ``m = multiple_of``, and ``T`` from step ``steps`` on.
        """
        w = self.settings.seq_len_warmup
        T = self.full_seq_len
        if w.start is None or w.steps == 0 or step >= w.steps:
            return T
        lin = _ramp(w.start, T, w.steps, step)
        return min(max(int(lin // w.multiple_of) * w.multiple_of, w.start), T)

    def batch_size(self, step: int) -> int:
        """Windows per micro-batch at ``step``: ``⌊start + (B − start)·step/steps⌋``, then ``B``."""
        r = self.settings.batch_size_ramp
        return int(_ramp(r.start, self.full_batch_size, r.steps, step))

    def shape(self, micro_batches: list, step: int) -> list:
        """Cut each ``(B, T)`` micro-batch of ``step`` into rows of the scheduled length.

        Args:
            micro_batches: the step's micro-batches (dict batches or ``(B, T)`` id tensors).
            step: the 0-based step they are for.

        Returns:
            The same tensors when ``t = T``; else each as ``(B·⌊T/t⌋, t)`` (rows of one window
            stay adjacent, in order).
        """
        t = self.seq_len(step)
        applied = (as_batch(micro_batches[0])["input_ids"].shape[0], t)
        if self.active and applied != self._applied:
            logger.info("progressive training, step %d: %d windows per micro-batch, rows of %d tokens",
                        step + 1, *applied)
        self._applied = applied
        return [cut_rows(batch, t) for batch in micro_batches]

    def metrics(self) -> dict[str, float]:
        """``micro_batch_size`` and ``seq_len`` of the last step (empty when inactive)."""
        if not self.active or self._applied is None:
            return {}
        return {"micro_batch_size": float(self._applied[0]), "seq_len": float(self._applied[1])}

    # -- data order and run length ----------------------------------------------------------

    def _fitting_windows(self, num_windows: int, first_step: int, start: int, max_steps: int | None) -> tuple[int, int]:
        """Walk steps from ``first_step`` at position ``start`` until the epoch or ``max_steps`` ends.

        Returns:
            ``(steps taken, position reached)``.
        """
        r = self.settings.batch_size_ramp
        ramp_end = r.steps if r.start is not None else 0
        pos, step = start, first_step
        while max_steps is None or step < first_step + max_steps:
            if step >= ramp_end:  # constant size from here: jump to the end
                per = self.full_batch_size * self.grad_accum_steps
                fit = (num_windows - pos) // per
                if max_steps is not None:
                    fit = min(fit, first_step + max_steps - step)
                return step + fit - first_step, pos + fit * per
            need = self.batch_size(step) * self.grad_accum_steps
            if pos + need > num_windows:
                break
            pos += need
            step += 1
        return step - first_step, pos

    def steps_in_epochs(self, num_windows: int, num_epochs: int) -> int:
        """Optimizer steps that ``num_epochs`` passes over ``num_windows`` windows hold.

        Without a batch ramp this is ``num_epochs · ⌊N / (batch_size·grad_accum_steps)⌋``.
        """
        step = 0
        for _ in range(num_epochs):
            taken, _ = self._fitting_windows(num_windows, step, 0, None)
            if taken == 0:
                break
            step += taken
        return step

    def epoch_position(self, step: int, batches_in_epoch: int) -> int:
        """Windows of the current epoch consumed once ``step`` steps are done.

        Args:
            step: optimizer steps done.
            batches_in_epoch: micro-batches of this epoch handed out (whole steps only).

        Returns:
            The position in the epoch order where the next step starts.
        """
        done = batches_in_epoch // self.grad_accum_steps
        return sum(self.batch_size(s) for s in range(step - done, step)) * self.grad_accum_steps

    def curriculum_windows(self, num_windows: int) -> int:
        """How many windows of epoch 0 the curriculum orders (those of its first steps)."""
        c = self.settings.curriculum
        if c.by == "none" or c.steps == 0:
            return 0
        _, pos = self._fitting_windows(num_windows, 0, 0, c.steps)
        return pos

    def epoch_order(self, dataset: Dataset, epoch: int) -> torch.Tensor:
        """The window order of ``epoch``: seeded random, with epoch 0's curriculum prefix sorted.

        Args:
            dataset: the training windows (scored when the curriculum is on).
            epoch: 0-based epoch.

        Returns:
            ``(N,)`` int64 permutation of the window indices.
        """
        n = len(dataset)
        order = EpochSampler(n, self.seed, epoch).order()
        w = self.curriculum_windows(n) if epoch == 0 else 0
        if w == 0:
            return order
        scores = window_difficulty(dataset, order[:w].numpy(), self.settings.curriculum.by)
        easy_first = torch.from_numpy(np.argsort(scores, kind="stable"))
        return torch.cat([order[:w][easy_first], order[w:]])

    def batch_sampler(self, dataset: Dataset, epoch: int, step: int, batches_in_epoch: int) -> StepBatchSampler:
        """Micro-batches of ``epoch`` from the trainer's cursor on.

        Args:
            dataset: the training windows.
            epoch: the cursor's epoch.
            step: optimizer steps done.
            batches_in_epoch: the cursor's micro-batches of this epoch.

        Returns:
            A batch sampler for ``DataLoader(batch_sampler=...)``.
        """
        # Indices carry the epoch (epoch · len + i): a mixture draws other windows each epoch.
        order = self.epoch_order(dataset, epoch) + epoch * len(dataset)
        return StepBatchSampler(order, self.epoch_position(step, batches_in_epoch),
                                step, self.batch_size, self.grad_accum_steps)

    # -- checkpoint state -------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {"settings": self.settings.model_dump(), "seq_len": self.full_seq_len,
                "batch_size": self.full_batch_size, "grad_accum_steps": self.grad_accum_steps}

    def state_dict(self) -> dict[str, Any]:
        """The settings the run's data positions were computed with, and the last applied shape."""
        return {**self._fingerprint(), "applied": list(self._applied) if self._applied else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from :meth:`state_dict`.

        Raises:
            AvaCheckpointError: the checkpoint was written with other progressive settings, so its
                data cursor would point elsewhere in this schedule.
        """
        saved = {k: state.get(k) for k in self._fingerprint()}
        if saved != self._fingerprint():
            raise AvaCheckpointError(
                f"the checkpoint's progressive schedule {saved} differs from this config's "
                f"{self._fingerprint()}; resume with the run's own progressive settings"
            )
        self._applied = tuple(state["applied"]) if state.get("applied") else None
