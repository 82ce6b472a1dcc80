"""The trainer's data feed: micro-batches per optimizer step, the data cursor, token accounting.

An object the trainer holds (registered as the ``data_cursor`` stateful part). Indexed data (in
memory or prepared shards) is drawn through the progressive schedule's batch sampler; a stream
(``data.streaming``) through :class:`~Ava.data_streaming.StreamBatcher`. Either way the batches
depend only on the config and the cursor, never on the worker count; which rows of each batch
this process reads comes from the :class:`~Ava.training.parallel.Parallelism`. Unpacked rows
(``data.packing: false``) follow the plans of :mod:`Ava.data.dynamic_batching` (fixed rows or a
token budget per micro-batch), padded per micro-batch by :func:`~Ava.data.rows.pad_rows`.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

from ..config import EnhancedTrainingConfig
from ..data import PreparedData
from ..data.dynamic_batching import EpochPlan, fixed_padding_share, plan_epoch
from ..data.rows import pad_rows
from ..data_streaming import StreamBatcher, StreamCursor, StreamingDataset
from ..errors import AvaCheckpointError, AvaDataError
from .parallel import Parallelism
from .batch import StepBatches
from .progressive_training import ProgressiveSchedule
from .state import TrainProgress

logger = logging.getLogger(__name__)


class _RankRows(Sampler[list[int]]):
    """A batch sampler's global batches cut to this rank's rows (:meth:`Parallelism.shard`)."""

    def __init__(self, batches: Sampler[list[int]], parallel: Parallelism) -> None:
        self.batches = batches
        self.parallel = parallel

    def __iter__(self) -> Iterator[list[int]]:
        for indices in self.batches:
            yield self.parallel.shard(list(indices))

    def __len__(self) -> int:
        return len(self.batches)


class DataFeed:
    """Hands the trainer ``grad_accum_steps`` micro-batches per optimizer step and keeps the cursor.

    Args:
        config: the resolved training config.
        progressive: the batch-size / row-length / curriculum schedule.
        progress: the run's counters (the feed stops at ``total_steps`` of ``progress.step``).
        parallel: this process's parallelism (rank, data shard).
    """

    def __init__(self, config: EnhancedTrainingConfig, progressive: ProgressiveSchedule,
                 progress: TrainProgress, parallel: Parallelism) -> None:
        self.config = config
        self.progressive = progressive
        self.progress = progress
        self.parallel = parallel
        self.data: PreparedData | None = None
        self.epoch = 0
        self.batches_in_epoch = 0  # micro-batches of the current epoch handed out by the loader
        self._cursor = (0, 0)  # (epoch, batches_in_epoch) after the last completed step
        self.source_tokens: dict[str, int] = {}  # training tokens drawn from each source
        self._step_counts: torch.Tensor | None = None  # this step's per-source tokens on this rank
        self._cursor_source_tokens: dict[str, int] = {}  # the same, after the last completed step
        self.stream_cursor: StreamCursor | None = None  # data.streaming: position after the last step
        self._plans: dict[int, EpochPlan] = {}  # data.packing false: the batch plans of recent epochs
        self._positions = [0, 0]  # data.packing false: (real tokens, padded positions) since metrics()

    def attach(self, data: PreparedData) -> None:
        """Feed from ``data`` (prepared by the trainer's setup)."""
        self.data = data

    # -- the cursor (stateful part) ----------------------------------------------------------

    def commit(self) -> None:
        """Mark the step just taken as complete: the cursor a checkpoint saves moves past it."""
        self._cursor = (self.epoch, self.batches_in_epoch)
        self._cursor_source_tokens = dict(self.source_tokens)

    def state_dict(self) -> dict[str, Any]:
        """Where the data stands after the last completed step.

        The sample order is a pure function of (seed, epoch, position) — see
        :class:`~Ava.data.mixture.MixtureDataset` — computed in the main process; DataLoader
        workers only turn indices into samples and keep no state, so ``(epoch,
        batches_in_epoch)`` is the whole cursor for any worker count. The per-source token counts
        (the mixture's accounting) and the data's fingerprint are kept to report and to check.
        """
        return {
            "epoch": self._cursor[0], "batches_in_epoch": self._cursor[1],
            "source_tokens": dict(self._cursor_source_tokens),
            "num_workers": self.config.data.num_workers,
            "rank": self.parallel.rank, "world_size": self.parallel.world_size,
            "global_batch": self.progressive.batch.size,
            "fingerprint": self._fingerprint(),
            "stream": self.stream_cursor.to_dict() if self.stream_cursor is not None else None,
            **({"batching": self._batching()} if not self.config.data.packing else {}),
        }

    def _batching(self) -> dict[str, Any]:
        """How unpacked rows are grouped: what the cursor's unit counts mean (the plan depends on
        the rows per unit without a budget, and a step on its units; not on how ranks share them)."""
        data = self.config.data
        budget = data.max_tokens_per_batch
        return {"packing": data.packing, "max_tokens_per_batch": budget,
                "unit_rows": self.progressive.batch.micro_rows if budget is None else None,
                "units_per_step": self._units_per_step()}

    def load_state_dict(self, cursor: dict[str, Any]) -> None:
        """Continue from a saved cursor (warns when the data changed since).

        The cursor counts global micro-batches, so it holds for any number of ranks as long as the
        global batch is the same.

        Raises:
            AvaCheckpointError: the run was saved with another global batch, or grouped its
                unpacked rows otherwise (``data.packing``, ``data.max_tokens_per_batch``, rows
                per micro-batch, micro-batches per step).
        """
        saved_rows = cursor.get("batching", {"packing": True, "max_tokens_per_batch": None})
        now_rows = self._batching() if not self.config.data.packing else {"packing": True, "max_tokens_per_batch": None}
        if saved_rows != now_rows:
            raise AvaCheckpointError(
                f"the checkpoint grouped its rows as {saved_rows}, this config as {now_rows}, so its data cursor "
                "points elsewhere; resume with the run's own data.packing, data.max_tokens_per_batch, "
                "training.batch_size, training.grad_accum_steps and number of ranks"
            )
        saved_batch, batch = cursor.get("global_batch"), self.progressive.batch
        # a token budget sizes steps in micro-batches (checked above), not in sequences
        if saved_batch is not None and saved_batch != batch.size and self.config.data.max_tokens_per_batch is None:
            raise AvaCheckpointError(
                f"the checkpoint was trained with a global batch of {saved_batch} sequences "
                f"({cursor.get('world_size', 1)} rank{'s' if cursor.get('world_size', 1) != 1 else ''}), this run has "
                f"{batch.size} ({batch.ranks} data-parallel rank{'s' if batch.ranks != 1 else ''}); resume with "
                f"training.global_batch_size={saved_batch}"
            )
        self.epoch, self.batches_in_epoch = cursor["epoch"], cursor["batches_in_epoch"]
        self._cursor = (self.epoch, self.batches_in_epoch)
        self.source_tokens = dict(cursor.get("source_tokens", {}))
        self._cursor_source_tokens = dict(self.source_tokens)
        if cursor.get("stream") is not None:
            self.stream_cursor = StreamCursor.from_dict(cursor["stream"])
        saved, now = cursor.get("fingerprint"), self._fingerprint()
        if saved is not None and saved != now:
            logger.warning("the data changed since the checkpoint (%s, now %s): training goes on from the "
                           "same position, but not over exactly the batches the first run would have seen",
                           saved, now)

    def _fingerprint(self) -> dict[str, Any]:
        assert self.data is not None
        windows = "stream" if isinstance(self.data.train, StreamingDataset) else len(self.data.train)
        return {"train_windows": windows, "sources": list(self.data.source_names)}

    # -- accounting --------------------------------------------------------------------------

    def count_source_tokens(self, batch: dict[str, torch.Tensor]) -> None:
        """Count a micro-batch's tokens per source (mixture accounting), on the host copy of the
        batch; the trainer takes the step's counts (:meth:`take_step_counts`), sums them over the
        ranks and hands them back (:meth:`add_source_tokens`)."""
        if "source" not in batch or self.data is None:
            return
        if not self.config.data.packing and "document_ids" in batch:  # real tokens of padded rows
            real_B = (batch["document_ids"].cpu() == 0).sum(dim=1)
            counts = torch.bincount(batch["source"].cpu(), weights=real_B.double(),
                                    minlength=len(self.data.source_names)).long()
        else:
            per_row = batch["input_ids"].shape[1]
            counts = torch.bincount(batch["source"].cpu(), minlength=len(self.data.source_names)) * per_row
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts

    def take_step_counts(self) -> torch.Tensor | None:
        """This step's (sources,) token counts on this rank (None without sources); resets them."""
        counts, self._step_counts = self._step_counts, None
        return counts

    def add_source_tokens(self, counts: torch.Tensor) -> None:
        """Add a step's (sources,) token counts (every rank's) to the run's."""
        for name, count in zip(self.data.source_names, counts.tolist()):
            self.source_tokens[name] = self.source_tokens.get(name, 0) + int(count)

    def metrics(self) -> dict[str, float]:
        """``data/padding``: share of padded positions in the steps since the last call, over every
        rank (``data.packing: false``; empty otherwise). Resets the count."""
        real, padded = self._positions
        self._positions = [0, 0]
        if self.config.data.packing or not padded:
            return {}
        return {"data/padding": 1.0 - real / padded}

    # -- batches -----------------------------------------------------------------------------

    def optimizer_steps(self, total_steps: int) -> Iterator[list[torch.Tensor]]:
        """Yield ``grad_accum_steps`` micro-batches per optimizer step, epoch after epoch.

        The order comes from :class:`~Ava.data.sampling.EpochSampler` (seeded by seed + epoch;
        epoch 0's first steps sorted by a curriculum if one is set), resumed at
        ``batches_in_epoch``, so the batches do not depend on worker count or interruptions. A
        partial accumulation group at the epoch's end is dropped. Micro-batch size and row length
        follow the progressive schedule (constant ``(batch_size, seq_len)`` unless configured).
        """
        assert self.data is not None, "attach() the data first"
        accum = self.progressive.batch.grad_accum
        workers = self.config.data.num_workers
        if workers:
            # HF tokenizers' thread pool must not be used in forked workers (it warns and may hang)
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if isinstance(self.data.train, StreamingDataset):
            yield from self._stream_steps(total_steps)
            return
        if not self.config.data.packing:
            yield from self._row_steps(total_steps)
            return
        pin = self.parallel.device.type == "cuda"
        while self.progress.step < total_steps:
            sampler = self.progressive.batch_sampler(self.data.train, self.epoch, self.progress.step,
                                                     self.batches_in_epoch)
            loader = DataLoader(self.data.train, batch_sampler=_RankRows(sampler, self.parallel),
                                num_workers=workers, persistent_workers=False, pin_memory=pin)
            pending: list[torch.Tensor] = []
            for batch in loader:
                pending.append(batch)
                self.batches_in_epoch += 1
                if len(pending) == accum:
                    yield self.progressive.shape(pending, self.progress.step)
                    pending = []
                    if self.progress.step >= total_steps:
                        return
            self.epoch += 1
            self.batches_in_epoch = 0

    # -- unpacked rows (data.packing: false) ---------------------------------------------------

    def _units_per_step(self) -> int:
        """Plan units per optimizer step: ``grad_accum × ranks`` with a token budget (a unit is one
        rank's micro-batch), else ``grad_accum`` (a unit is a global micro-batch, split by rows)."""
        plan = self.progressive.batch
        return plan.grad_accum * (plan.ranks if self.config.data.max_tokens_per_batch is not None else 1)

    def _plan(self, epoch: int) -> EpochPlan:
        """The batch plan of ``epoch`` (the last few are kept)."""
        if epoch not in self._plans:
            data = self.config.data
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = plan_epoch(self.data.train, self.config.run.seed, epoch,
                                            self.progressive.batch.micro_rows, data.max_tokens_per_batch)
        return self._plans[epoch]

    def _row_steps(self, total_steps: int) -> Iterator[StepBatches]:
        """``grad_accum_steps`` padded micro-batches per step from the epoch plans, from the cursor on.

        Each step carries its labelled positions over every rank (the trainer's per-token loss
        normalisation); its real and padded positions feed :meth:`metrics`.
        """
        plan_b, budget = self.progressive.batch, self.config.data.max_tokens_per_batch
        ranks, rank, accum = plan_b.ranks, self.parallel.rank if plan_b.ranks > 1 else 0, plan_b.grad_accum
        per_step = self._units_per_step()
        split = 1 if budget is not None else ranks  # a fixed unit is split over the ranks by rows
        collate = functools.partial(pad_rows, pad_id=self.data.tokenizer.pad_id)
        pin = self.parallel.device.type == "cuda"
        while self.progress.step < total_steps:
            plan = self._plan(self.epoch)
            usable = len(plan) // per_step * per_step
            if usable == 0:
                raise AvaDataError(f"epoch {self.epoch + 1} holds fewer micro-batches than one step needs "
                                   f"({per_step}); lower data.max_tokens_per_batch or training.grad_accum_steps")
            first = self.batches_in_epoch
            mine: list[list[int]] = []  # this rank's micro-batches, cursor on
            for s0 in range(first, usable, per_step):
                if budget is not None:
                    mine += [plan.units[s0 + j * ranks + rank] for j in range(accum)]
                else:
                    mine += [plan.units[s0 + j][rank::ranks] for j in range(accum)]
            loader = DataLoader(self.data.train, batch_sampler=mine, num_workers=self.config.data.num_workers,
                                collate_fn=collate, persistent_workers=False, pin_memory=pin)
            pending: list[dict[str, torch.Tensor]] = []
            for batch in loader:
                pending.append(batch)
                if len(pending) < accum:
                    continue
                units = range(self.batches_in_epoch, self.batches_in_epoch + per_step)
                step_real = 0
                for u in units:
                    real, padded = plan.unit_positions(u, split)
                    step_real += real
                    self._positions = [self._positions[0] + real, self._positions[1] + padded]
                self.batches_in_epoch += per_step
                yield StepBatches(pending, sum(plan.unit_loss_tokens(u) for u in units), real_tokens=step_real)
                pending = []
                if self.progress.step >= total_steps:
                    return
            self.epoch += 1
            self.batches_in_epoch = 0

    def _row_total_steps(self) -> int:
        """Optimizer steps of the whole run over unpacked rows, and the start-up padding line."""
        cfg, data = self.config.training, self.config.data
        per_step = self._units_per_step()
        plan = self._plan(0)
        if len(plan) < per_step:
            how = (f"micro-batches of at most data.max_tokens_per_batch={data.max_tokens_per_batch} tokens"
                   if data.max_tokens_per_batch is not None else f"micro-batches of {self.progressive.batch.micro_rows} rows")
            raise AvaDataError(
                f"the training split has {len(self.data.train)} rows, {len(plan)} {how}, fewer than one step needs "
                f"({per_step}); lower training.batch_size, data.max_tokens_per_batch or training.grad_accum_steps, "
                "or add data"
            )
        if self.parallel.is_main:
            ranks = self.progressive.batch.ranks
            expected = plan.padding_share(1 if data.max_tokens_per_batch is not None else ranks)
            if data.max_tokens_per_batch is not None:
                fixed = fixed_padding_share(plan.order_lengths, self.config.training.batch_size)
                logger.info("data.packing false: %d rows per epoch in %d micro-batches of at most %d tokens; "
                            "expected padding %.1f%% (fixed micro-batches of %d rows: %.1f%%)",
                            len(plan.lengths), len(plan), data.max_tokens_per_batch, 100 * expected,
                            self.config.training.batch_size, 100 * fixed)
            else:
                logger.info("data.packing false: %d rows per epoch in %d micro-batches of %d rows; expected "
                            "padding %.1f%% (set data.max_tokens_per_batch to batch by length)",
                            len(plan.lengths), len(plan), self.progressive.batch.micro_rows, 100 * expected)
        if data.max_tokens_per_batch is None or not hasattr(self.data.train, "window_of"):
            total = (len(plan) // per_step) * cfg.num_epochs  # every epoch plans as many units
        else:  # a mixture draws other rows each epoch: plan every epoch the run reaches
            total = 0
            for epoch in range(cfg.num_epochs):
                total += len(self._plan(epoch)) // per_step
                if cfg.max_steps and total >= cfg.max_steps:
                    break
        return min(total, cfg.max_steps) if cfg.max_steps else total

    def _stream_steps(self, total_steps: int) -> Iterator[list[dict[str, torch.Tensor]]]:
        """``grad_accum_steps`` micro-batches per step from a stream (``data.streaming``).

        The stream's cursor (chunk, window) after each step's last micro-batch is kept in
        ``self.stream_cursor`` for the checkpoint; a resumed run starts there.
        """
        plan = self.progressive.batch
        # Every rank reads the stream's global micro-batches and keeps its rows (rank r: r, r + R, ...).
        batcher = StreamBatcher(self.data.train, plan.micro_rows, self.config.data.num_workers,
                                cursor=self.stream_cursor, pin_memory=self.parallel.device.type == "cuda")
        self.data.report = batcher.report  # the stream's reads, filled as chunks arrive (reported at the end)
        pending: list[dict[str, torch.Tensor]] = []
        for batch, cursor in batcher:
            if plan.ranks > 1:
                batch = {k: v[self.parallel.rank::plan.ranks] for k, v in batch.items()}
            pending.append(batch)
            if len(pending) == plan.grad_accum:
                self.stream_cursor = cursor
                yield pending
                pending = []
                if self.progress.step >= total_steps:
                    return

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (``max_steps`` bounds ``num_epochs``)."""
        assert self.data is not None
        train = self.data.train
        cfg = self.config.training
        if isinstance(train, StreamingDataset):
            assert cfg.max_steps is not None  # a config rule: a stream has no length
            return cfg.max_steps
        if not self.config.data.packing:
            return self._row_total_steps()
        num_windows = train if isinstance(train, int) else len(train)
        plan = self.progressive.batch
        if num_windows < plan.size:
            how = (f"training.global_batch_size = {plan.size}" if cfg.global_batch_size is not None else
                   f"batch_size × grad_accum_steps{' × ranks' if plan.ranks > 1 else ''} = {plan.size}")
            raise AvaDataError(
                f"the training split has {num_windows} sequences of data.seq_len={self.config.data.seq_len} "
                f"tokens, fewer than one step needs ({how}); lower training.batch_size"
                f"{' or training.global_batch_size' if cfg.global_batch_size is not None else ''} or data.seq_len, "
                "or add data"
            )
        total = self.progressive.steps_in_epochs(num_windows, cfg.num_epochs)  # a batch ramp adds steps
        return min(total, cfg.max_steps) if cfg.max_steps else total
