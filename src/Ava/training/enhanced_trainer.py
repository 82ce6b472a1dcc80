"""The trainer: orchestrates run folder, data, optimisation loop, evaluation and checkpoints.

``train()`` reads as setup → loop → finish; ``train_step()`` holds forward, backward, health
check, clip and optimizer step. Every concern it touches lives in its own module and object:
the parallelism seam (:mod:`.parallel`: device, model building, collectives, data shard), the
data feed (:mod:`.data_feed`), schedules, gradient health, metrics, checkpoints and run folders.
Everything that changes during training is registered once in :attr:`states`
(:mod:`.state`); a checkpoint saves that registry and ``--resume`` restores it, bit-exactly on CPU.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import signal
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..config import EnhancedTrainingConfig, TokenizerConfig, check_compatibility
from ..config.training_config import adopt_tokenizer_vocab
from ..config.feature_compatibility import raise_on_errors, tokenizer_vocab_issues
from ..data import PreparedData, prepare_data
from ..data.records import plural
from ..errors import AvaConfigError, AvaError, AvaTrainingError
from ..evaluation.validation import validation_loss
from ..layers.experts import describe_auto
from ..layers.lora import LORA_FILE, lora_modules
from ..memory import build_replay_memory
from ..models.routing_metrics import accumulate_router_stats, add_loads, moe_diagnostics
from ..optimization import build_optimizer
from ..optimization.qat import set_qat_step
from ..optimization.sophia import refresh_hessian
from ..utils.allocator import tune_cpu_allocator
from ..utils.async_logging import AsyncSink
from ..utils.checkpoint import CheckpointWriter, list_checkpoints, load_training_state, read_weights
from ..utils.distributed_checkpoint import (
    ShardedCheckpointWriter, consolidate, is_sharded, load_sharded, load_sharded_state,
)
from ..utils.logging import setup_logging
from ..utils.output_paths import check_output_dir
from .adaptive_lr import PlateauLR, build_plateau
from .batch import GlobalBatch, as_batch, model_inputs, step_loss_shares, to_device, token_loss_weights
from .data_feed import DataFeed
from .early_stopping import EarlyStopping
from .finetune import AdapterWeights, adopt_base, base_identity, build_finetune_model, finetune_summary, lora_spec
from .gradient_health import GradientHealthMonitor, Verdict, layer_grad_norms
from .gradient_surgery import build_surgery, surgery_backward
from .lr_manager import build_scheduler
from .memory_estimate import check_fits
from .memory_monitor import memory_snapshot, oom_hint, rss_mb
from .metrics import MetricsWriter, MoECollapseAlarm, StepTimer, measure_matmul_peak, start_wandb
from .distributed_health_checker import DistributedHealthChecker
from .distributed_manager import build_parallelism
from .parallel import Parallelism
from .precision import MixedPrecision
from .progressive_training import ProgressiveSchedule
from .run_manager import (
    RunLock,
    RunPaths,
    TrainingSummary,
    check_resume_config,
    create_run_folder,
    resolve_resume,
    seed_everything,
    write_summary,
)
from .state import MODEL_KEY, BalancingSchedule, ModelWeights, RNGState, StateRegistry, TrainProgress

logger = logging.getLogger(__name__)


@dataclass
class _LoopEnd:
    """How the loop ended: the last logged train loss, early stopping, the final checkpoint."""

    train_loss: float
    stopped_early: bool
    checkpoint: Path | None


class EnhancedModularTrainer:
    """Trains an :class:`~Ava.models.EnhancedMoEModel` as described by a config.

    A freshly constructed model is initialised from ``run.seed`` when training starts (so the
    Quick Start below and :meth:`from_config` start from the same weights); a model whose weights
    were loaded (``from_pretrained``, ``load_state_dict``) is trained from those weights.

    Args:
        model: the model, built from ``config.model``.
        config: the resolved training config.
        parallel: how training is spread over processes (default: from ``config.distributed``).

    Example::

        config = EnhancedTrainingConfig.from_yaml("config.yaml")
        model = EnhancedMoEModel(config.model)
        summary = EnhancedModularTrainer(model, config).train()
    """

    def __init__(self, model: torch.nn.Module, config: EnhancedTrainingConfig,
                 parallel: Parallelism | None = None) -> None:
        self.config = config
        self.parallel = parallel if parallel is not None else build_parallelism(config)
        self.device = self.parallel.device
        self.engine = model  # what the step calls: the model, or the strategy's wrapper (DDP)
        self.model = self.parallel.unwrap(model)  # the model itself: its methods, config and weights
        self._model_prepared = False  # initialised, placed and wrapped by the parallelism seam
        self._owns_model = False  # built by from_config: rebuilt when the tokenizer settles model.vocab_size
        self.progress = TrainProgress()
        self.health = GradientHealthMonitor(config.gradient.health)
        self.moe_alarm = MoECollapseAlarm(config.training.moe_alarm)
        self.early_stopping = EarlyStopping(config.evaluation.early_stopping)
        self.surgery = build_surgery(config.gradient.surgery, config.run.seed)
        self.precision = MixedPrecision(config.precision, self.device)  # autocast dtype; fp16 loss scaling
        # The global batch over the data-parallel ranks; micro-batch size, row length, epoch order per step.
        self.progressive = ProgressiveSchedule(config, GlobalBatch.resolve(config.training, self.parallel.dp_size))
        self.feed = DataFeed(config, self.progressive, self.progress, self.parallel)
        self.data: PreparedData | None = None
        self.paths: RunPaths | None = None
        self._run_lock: RunLock | None = None  # held on the run folder while training (rank 0)
        self._created_run = False  # this process made the run folder (removed again if nothing trained)
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.plateau: PlateauLR | None = None
        self.total_steps = 0  # set by prepare()
        self.checkpoints: CheckpointWriter | None = None
        self._last_good_checkpoint: Path | None = None
        self._stop_signal: str | None = None  # set by SIGINT/SIGTERM: stop after this step
        # Several ranks: set when the step's all-reduce shows a signal on any rank, so all stop after the same step.
        self._stop_agreed = False
        self._last_save = time.perf_counter()  # when the last checkpoint was saved (checkpoint.every_minutes)
        self._save_due = False  # this step ends with a time-based save (agreed by every rank)
        self._on_step: Callable[[int], None] | None = None  # train()'s per-step callback
        self._rank_loss: torch.Tensor | None = None  # the last step's loss on this rank alone
        self._segment_start = time.perf_counter()  # this segment's start; train() resets it
        self._wall_before = 0.0  # training wall time of the run's earlier segments
        # Every part with training state, once; the optimizer, scheduler and plateau LR join
        # when prepare() builds them. Saving, resuming and rolling back walk this registry.
        one_process_only = ("finetune" if config.finetune is not None
                            else "precision.param_dtype: bf16" if config.precision.param_dtype == "bf16" else None)
        if one_process_only and self.parallel.world_size > 1:  # their state is not in the sharded checkpoints yet
            raise AvaConfigError(f"{one_process_only} trains on one process for now (its checkpoint state is not "
                                 f"written by the {self.parallel.world_size}-process sharded checkpoints); "
                                 "run without --nproc / torchrun")
        self.states = StateRegistry()
        # A fine-tune's checkpoints hold its adapters only; lora.json says how to rebuild base + adapters.
        self._extra_files: dict[str, str] = {}
        if config.finetune is not None and not lora_modules(self.model):
            raise AvaConfigError("the config has a finetune section but the model has no LoRA adapters; build the "
                                 "trainer with EnhancedModularTrainer.from_config(config), which loads the base")
        self.states.register(MODEL_KEY, AdapterWeights(self.model) if config.finetune is not None
                             else ModelWeights(self.model, self.parallel))
        self.states.register("progress", self.progress)
        self.states.register("rng", RNGState())
        self.states.register("data_cursor", self.feed)
        self.states.register("health", self.health)
        self.states.register("early_stopping", self.early_stopping)
        self.states.register("moe_alarm", self.moe_alarm)
        self.states.register("progressive", self.progressive, optional=True)
        self.states.register("coef_schedules", BalancingSchedule(self.model), optional=True)
        if self.surgery is not None:
            self.states.register("surgery", self.surgery, optional=True)
        if self.precision.scaling:
            self.states.register("loss_scaler", self.precision, optional=True)
        # memory.enabled: episodic replay (rows mixed in before the forward, scored after the backward)
        self.memory = build_replay_memory(config.memory, config.run.seed, self.parallel.world_size)
        if self.memory is not None:
            self.states.register("memory", self.memory, optional=True)

    @classmethod
    def from_config(cls, config: EnhancedTrainingConfig) -> "EnhancedModularTrainer":
        """A trainer with a new model built by the parallelism seam (what ``ava train`` runs).

        Args:
            config: the resolved training config.

        Returns:
            The trainer; its model is initialised from ``run.seed``.
        """
        parallel = build_parallelism(config)
        base = None
        if config.finetune is not None:  # the base's architecture and tokenizer
            config, base = adopt_base(config)
        # Before the model is built or a run folder made: a run that cannot fit stops in one line.
        check_fits(config, parallel.device, ranks=parallel.world_size)
        if base is None:
            model = parallel.build_model(config)
        else:
            model = parallel.prepare_model(build_finetune_model(config, base), config)
        trainer = cls(model, config, parallel)
        trainer._model_prepared = True
        trainer._owns_model = base is None  # a fine-tune's vocabulary is the base's
        if base is not None:
            spec = lora_spec(config, trainer.model, base_identity(base))
            trainer._extra_files = {LORA_FILE: json.dumps(spec, indent=2)}
        return trainer

    # the run's counters, kept in the registered ``progress`` part
    step = property(lambda self: self.progress.step)
    tokens = property(lambda self: self.progress.tokens)
    best_val = property(lambda self: self.progress.best_val)
    last_val = property(lambda self: self.progress.last_val)

    # ------------------------------------------------------------------------------------
    # setup → loop → finish
    # ------------------------------------------------------------------------------------

    def train(self, resume: str | Path | None = None,
              on_step: Callable[[int], None] | None = None) -> TrainingSummary:
        """Run training to the end and return its summary.

        Args:
            resume: ``"auto"`` (the newest run of this config's name with a good checkpoint;
                a fresh run when there is none), a run folder or a checkpoint folder. The run
                continues in the same run folder, bit-exactly on CPU.
            on_step: called with the step count after every optimizer step (a distributed run's
                heartbeat, :meth:`~Ava.training.rank_aware_error_handler.RankErrors.heartbeat`).

        Raises:
            AvaConfigError / AvaDataError / AvaCheckpointError: a problem found before the first
                step, named with its key, file or checkpoint.
            AvaTrainingError: the MoE collapse alarm stopped the run (``training.moe_alarm.action:
                stop``), after the step that fired it was logged and checkpointed and
                ``summary.json`` written (its ``stopped_by_alarm`` holds the message).
        """
        self._segment_start = time.perf_counter()
        try:
            checkpoint = self._setup(resume)
            if checkpoint is not None and self.step >= self.total_steps:
                return self._already_finished(checkpoint)
            self._on_step = on_step
            end = self._loop()
            return self._finish(end, checkpoint)
        except BaseException:
            self._discard_untrained_run()
            raise
        finally:
            if self._run_lock is not None:
                self._run_lock.release()
                self._run_lock = None

    def _discard_untrained_run(self) -> None:
        """A new run that failed before its first step leaves no folder behind (the error says why).

        One process only: the ranks of a distributed run keep their logs in the folder.
        """
        paths = self.paths
        if (not self._created_run or paths is None or self.step > 0 or self.parallel.world_size > 1
                or list_checkpoints(paths.checkpoints)):
            return
        setup_logging(self.config.logging.level)  # close the run's log file before removing it
        shutil.rmtree(paths.root, ignore_errors=True)
        self.paths = None

    def _setup(self, resume: str | Path | None) -> Path | None:
        """Run folder, logging, seeds, data, model, optimizer and (when resuming) the saved state.

        Returns:
            The checkpoint resumed from, or None for a fresh run.
        """
        cfg, parallel = self.config, self.parallel
        raise_on_errors(check_compatibility(cfg, environment=True), "config")
        # Rank 0 finds or creates the run folder; the other ranks take its answer.
        paths, checkpoint, changes = parallel.on_main(lambda: self._run_folder(resume), share=True)
        self.paths = paths
        if parallel.is_main:
            setup_logging(cfg.logging.level, paths.log_file)
        else:  # every rank keeps its own log; only rank 0 talks on the console (errors excepted)
            setup_logging(cfg.logging.level, paths.root / "logs" / f"train.rank{parallel.rank}.log", "ERROR")
        if checkpoint is not None:
            logger.info("resuming %s from %s", paths.root, checkpoint)
            for change in changes:
                logger.info("config change on resume: %s", change)
        else:
            logger.info("run folder: %s", paths.root)
        seed_everything(cfg.run.seed)
        if cfg.performance.cpu_allocator == "tuned":
            tune_cpu_allocator()
        if cfg.run.num_threads is not None:
            torch.set_num_threads(cfg.run.num_threads)

        # Rank 0 prepares the data first (it may train the tokenizer and fill the corpus cache);
        # the other ranks then read the same splits with that tokenizer.
        data = parallel.on_main(lambda: self._prepare_data(checkpoint is not None, own_tokenizer=True))
        if not parallel.is_main:
            data = self._prepare_data(checkpoint is not None, own_tokenizer=False)
        self.prepare(data, paths.config if checkpoint is not None else None)
        if checkpoint is None and parallel.is_main:  # the resolved model.vocab_size (the folder has the estimate)
            cfg.to_yaml(paths.config)
        if parallel.sharded_checkpoints:
            self.checkpoints = ShardedCheckpointWriter(paths.checkpoints, cfg.checkpoint.keep_last,
                                                       cfg.checkpoint.keep_best, cfg.checkpoint.async_save)
        else:
            self.checkpoints = CheckpointWriter(paths.checkpoints, cfg.checkpoint.keep_last,
                                                cfg.checkpoint.keep_best, cfg.checkpoint.async_save)
        if checkpoint is not None:
            self._restore(checkpoint)
            if self.step < self.total_steps and parallel.is_main:  # a finished run is left exactly as it is
                cfg.to_yaml(paths.config)
        self._wall_before = self.progress.wall_time_s  # the earlier segments' training time
        self._log_plan(self.total_steps)
        return checkpoint

    def _run_folder(self, resume: str | Path | None) -> tuple[RunPaths, Path | None, list[str]]:
        """The run folder (a new one, or the resumed run's), the checkpoint resumed from, the config changes."""
        run_dir, checkpoint = resolve_resume(self.config, resume) if resume is not None else (None, None)
        if run_dir is not None:
            check_output_dir(run_dir, "--resume")
            self._run_lock = RunLock.acquire(run_dir)
            return RunPaths(run_dir), checkpoint, check_resume_config(run_dir, self.config)
        check_output_dir(self.config.run.output_dir, "run.output_dir")
        paths, self._run_lock = create_run_folder(self.config)
        self._created_run = True
        return paths, None, []

    def _prepare_data(self, resumed: bool, own_tokenizer: bool) -> PreparedData:
        """The splits; a new run's first rank trains (or copies) the tokenizer into the run folder,
        a resumed run and the other ranks read the run's own tokenizer, never a retrained one."""
        cfg, paths = self.config, self.paths
        data_cfg = cfg.data
        if resumed or not own_tokenizer:
            data_cfg = cfg.data.model_copy(update={"tokenizer": TokenizerConfig(path=str(paths.tokenizer))})
        return prepare_data(data_cfg, cfg.run.seed, None if resumed or not own_tokenizer else paths.tokenizer,
                            eval_windows=cfg.training.eval_batches * cfg.training.batch_size)

    def prepare(self, data: PreparedData, resumed_config: Path | None = None) -> int:
        """Attach ``data``, prepare the model and build the optimizer and schedules.

        What :meth:`train` does before its first step, without a run folder; ``ava lr-find``
        calls it to drive :meth:`train_step` over the training's own data and optimizer.

        Args:
            data: the prepared splits and tokenizer.
            resumed_config: a resumed run's ``config.yaml``: a derived ``model.vocab_size`` keeps
                the size saved there (what its checkpoints hold).

        Returns:
            The run's total optimizer steps.
        """
        cfg = self.config
        self.data = data
        self.feed.attach(data)
        self._fit_vocab(data, resumed_config)
        self._check_vocab(data)
        if not self._model_prepared:
            self.engine = self.parallel.prepare_model(self.model, cfg)
            self._model_prepared = True
        self.total_steps = total_steps = self.feed.total_steps()
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.training.learning_rate, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.training.learning_rate, total_steps)
        self.plateau = build_plateau(self.scheduler, cfg.scheduler.plateau, cfg.training.learning_rate)
        master = self.precision.attach(self.optimizer)  # precision.param_dtype bf16: fp32 master weights
        self.states.register("optimizer", self.optimizer)
        if master is not None:
            self.states.register("master_weights", master)
        self.states.register("scheduler", self.scheduler)
        if self.plateau is not None:
            self.states.register("plateau", self.plateau, optional=True)
        return total_steps

    def _loop(self) -> _LoopEnd:
        """Optimizer steps until the end, early stopping, the alarm or a signal; then the final save."""
        cfg, paths, total_steps = self.config, self.paths, self.total_steps
        resumed = self.step > 0
        peak = measure_matmul_peak(self.device, torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32)
        flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        if self.parallel.is_main:  # rank 0 writes the run's metrics for all ranks (the values are global)
            sink = MetricsWriter(paths.metrics, paths.tensorboard if cfg.logging.tensorboard else None,
                                 resume_step=self.step if resumed else None,
                                 wandb_run=start_wandb(cfg, paths.root, resume=resumed))
            writer = AsyncSink(sink) if cfg.logging.async_metrics else sink
        else:
            writer = _NoMetrics()
        timer = StepTimer(self.device, cfg.logging.time_breakdown)
        ranks = None  # distributed runs: compare the ranks every distributed.health_every steps
        if self.parallel.world_size > 1 and cfg.distributed.health_every:
            ranks = DistributedHealthChecker(self.parallel, cfg.distributed.health_every)
        train_loss = float("nan")
        stopped_early = False
        self._last_save = time.perf_counter()  # checkpoint.every_minutes counts training time from here
        try:
            bar = self._progress_bar(total_steps)
            # tokens/s counts training only: evaluation and checkpoint time (``paused``) is left out
            window_tokens, window_start, paused = 0, time.perf_counter(), 0.0
            step_end = time.perf_counter()
            for micro_batches in self._stop_on_signals(self.feed.optimizer_steps(total_steps)):
                timer.mark("data")
                step_start = time.perf_counter()
                metrics = self._guarded_step(micro_batches, timer)
                if ranks is not None:
                    now = time.perf_counter()
                    metrics.update(ranks.on_step(
                        self.step, loss=self._rank_loss, grad_norm=metrics["grad_norm"], step_time_s=now - step_end,
                        data_wait_s=step_start - step_end, memory_bytes=_memory_bytes(self.device), model=self.model))
                step_end = time.perf_counter()
                if self._on_step is not None:
                    self._on_step(self.step)
                self.feed.commit()
                window_tokens += metrics.pop("tokens")
                bar.update(1)
                alarm_stop = self.moe_alarm.stop_reason
                if self.step % cfg.training.log_every == 0 or self.step == total_steps or alarm_stop:
                    elapsed = max(time.perf_counter() - window_start - paused, 1e-9)
                    values = self._log_values(metrics, window_tokens / elapsed, flops_per_token, peak, timer)
                    values["excluded_time_s"] = paused  # evaluation and checkpoint time, left out of tokens/s
                    train_loss = values["loss"]
                    writer.write(self.step, "train", values)
                    bar.set_postfix(loss=f"{values['lm_loss']:.3f}", lr=f"{values['lr']:.2e}",
                                    tok_s=f"{values['tokens_per_s']:,.0f}")
                    window_tokens, window_start, paused = 0, time.perf_counter(), 0.0
                pause_start = time.perf_counter()
                if cfg.logging.memory_every and self.step % cfg.logging.memory_every == 0:
                    writer.write(self.step, "memory", memory_snapshot(self.device))
                evaluated = False
                if self.data.val is not None and (self.step % cfg.training.eval_every == 0
                                                  or self.step == total_steps or alarm_stop):
                    stopped_early = self._validate(writer, total_steps)
                    evaluated = True
                save_every = cfg.training.save_every
                periodic = (save_every and self.step % save_every == 0) or self._save_due
                if stopped_early or (periodic and self.step < total_steps
                                     and not alarm_stop):  # an alarm stop saves once, below
                    self.save_checkpoint(val_loss=self.last_val if evaluated else None)
                paused += time.perf_counter() - pause_start
                if stopped_early:
                    logger.info("early stopping at step %d: no val-loss improvement in %d evaluations",
                                self.step, self.early_stopping.bad_evals)
                    break
                if alarm_stop:  # the step is logged and evaluated; the final checkpoint and summary follow
                    break
                if self._stop_signal is not None and (self.parallel.world_size == 1 or self._stop_agreed):
                    self._stop_after_signal(bar)
                timer.mark("other")  # bookkeeping above: not charged to the data wait
            bar.close()
            final = self.save_checkpoint(val_loss=self.last_val) if not stopped_early else self.checkpoints.last_path
            self.checkpoints.wait()
            if self.parallel.sharded_checkpoints and final is not None:  # generate/eval/export read one file
                self.parallel.on_main(lambda: consolidate(final))
        finally:
            writer.close()
        return _LoopEnd(train_loss, stopped_early, final)

    def _finish(self, end: _LoopEnd, resumed_from: Path | None) -> TrainingSummary:
        """Sample, write ``summary.json``, report what was skipped, and return the summary.

        Wall time, tokens and tokens/s are the whole run's, every resumed segment included.
        """
        paths, data = self.paths, self.data
        sample = self._sample()
        wall = self._count_wall_time()
        summary = TrainingSummary(
            run_dir=str(paths.root), checkpoint=str(end.checkpoint), steps=self.step, tokens=self.tokens,
            final_train_loss=end.train_loss, final_val_loss=self.last_val, best_val_loss=self.best_val,
            wall_time_s=wall, tokens_per_second=self.tokens / wall, sample=sample,
            skipped_steps=self.health.skipped, rollbacks=self.health.rollbacks,
            stopped_early=end.stopped_early, resumed_from=str(resumed_from) if resumed_from else None,
            stopped_by_alarm=self.moe_alarm.stop_reason,
        )
        if self.parallel.is_main:
            write_summary(paths, summary.to_dict())
        data.report.log()  # rows skipped / characters replaced under the sources' policies, again at the end
        if self.health.skipped:
            logger.warning("%d step(s) skipped by the gradient health check: %s", len(self.health.skipped),
                           ", ".join(f"{s} ({r})" for s, r in self.health.skipped[:10]))
        if self.health.rollbacks:
            logger.warning("rolled back to the last good checkpoint at step(s) %s", self.health.rollbacks)
        val_text = "n/a" if self.last_val is None else f"{self.last_val:.4f}"
        logger.info("done: %s, %s tokens in %.0f s; final val loss %s; run folder %s",
                    plural(self.step, "step"), f"{self.tokens:,}", wall, val_text, paths.root)
        if self.moe_alarm.stop_reason:
            raise AvaTrainingError(f"{self.moe_alarm.stop_reason} (checkpoint {end.checkpoint})")
        return summary

    def _log_values(self, metrics: dict[str, Any], tokens_per_s: float, flops_per_token: float, peak: float,
                    timer: StepTimer) -> dict[str, float]:
        """The train record of a logged step: step metrics, throughput, MFU, tokens, timings."""
        values = _to_floats(metrics)
        values["tokens_per_s"] = tokens_per_s
        values["mfu"] = tokens_per_s * flops_per_token / peak
        values["tokens"] = self.tokens
        if len(self.data.source_names) > 1:
            values.update({f"tokens/{name}": float(n) for name, n in self.feed.source_tokens.items()})
        values.update(self.progressive.metrics())
        values.update(self.feed.metrics())  # data/padding (data.packing false)
        values.update(timer.read())
        if self.config.logging.memory_every == 0:
            values.update(memory_snapshot(self.device))
        return values

    def _validate(self, writer: Any, total_steps: int) -> bool:
        """Evaluate, log, update best/last val loss and the plateau LR; True when early stopping fires."""
        val = self.evaluate()
        self.progress.last_val = val["loss"]
        self.progress.best_val = val["loss"] if self.best_val is None else min(self.best_val, val["loss"])
        writer.write(self.step, "val", val)
        logger.info("step %d/%d  val loss %.4f  ppl %.1f", self.step, total_steps, val["loss"], val["ppl"])
        stopped = self.early_stopping.update(val["loss"])
        if self.plateau is not None:  # plateau-adaptive LR: lower the schedule's peak when the val loss stalls
            self.plateau.step(val["loss"])
        return stopped

    def train_step(self, micro_batches: list[torch.Tensor], timer: StepTimer | None = None) -> dict[str, Any]:
        """One optimizer step over ``micro_batches`` (gradient accumulation).

        The step's loss and gradient norm go through the gradient health check: a non-finite
        or spiking step is skipped (no update), and after ``rollback_after`` bad steps in a row
        the last good checkpoint's model and optimizer state are restored.

        Args:
            micro_batches: ``grad_accum_steps`` batches: dicts from the data pipeline (see
                :mod:`Ava.training.batch`) or ``(B, T)`` tensors of token ids.
            timer: optional phase timer (forward / backward / optimizer).

        Returns:
            Step metrics (``loss``, ``lm_loss``, each aux term, ``grad_norm``, ``lr``,
            ``max_vio``, ``skipped``, ``coef/<name>`` for each balancing coefficient with a
            schedule in ``model.moe.coef_schedules``) and ``tokens`` (an int).
        """
        timer = timer or StepTimer(self.device, enabled=False)
        self.model.train()
        # Balancing-coefficient schedules follow the optimizer step (checkpointed, so resume continues them).
        self.model.set_balancing_step(self.step)
        if self.config.precision.qat is not None:  # fake-quantized weights from qat.start_step on
            set_qat_step(self.model, self.step)
        coefs = {f"coef/{name}": value
                 for name, value in self.model.balancing_coefficients(scheduled_only=True).items()}
        accum = len(micro_batches)
        # data.packing false: each micro-batch's loss weighs its share of the step's loss tokens (None: 1/accum)
        weights = token_loss_weights(micro_batches, self.parallel.dp_size)
        totals: dict[str, torch.Tensor] = {}
        loads: list[torch.Tensor] = []  # routed slots per expert (selection), for the bias update and metrics
        balance_loads: list[torch.Tensor] = []  # the global-batch loss's counts of earlier micro-batches
        router_acc: dict[str, torch.Tensor] = {}
        tokens = 0
        document_mask = self.config.data.document_mask
        # Balancing losses count f over the global micro-batch (every rank's rows).
        count_reduce = self.parallel.all_reduce if self.parallel.world_size > 1 else None
        for i, batch in enumerate(micro_batches):
            if self.memory is not None:  # replayed rows replace the last rows of the host batch
                batch = self.memory.mix(as_batch(batch), self.step)
            self.feed.count_source_tokens(as_batch(batch))  # from the host copy: no device read
            batch = to_device(as_batch(batch), self.device)
            input_ids = batch["input_ids"]  # (B, T)
            context = self._memory_context(batch)  # memory.context_items: retrieved before the forward
            # Gradients are reduced over the ranks once, in the step's last backward.
            with self.parallel.gradient_sync(self.engine, i == accum - 1):
                with self.precision.autocast(), self._memory_capture():
                    out = self.engine(input_ids, **model_inputs(batch, document_mask), **context,
                                      moe_load_prefix=balance_loads or None, moe_count_reduce=count_reduce)
                timer.mark("forward")
                terms = {"loss": out.loss, "lm_loss": out.lm_loss, **out.aux_losses}
                shares = None if weights is None else step_loss_shares(terms, accum, weights[i])
                if self.surgery is None:
                    self.precision.scale(out.loss / accum if shares is None else shares["loss"]).backward()
                else:
                    surgery_backward(self.model, self.surgery, {"lm_loss": out.lm_loss, **out.aux_losses}, accum)
            timer.mark("backward")
            if self.memory is not None:  # score the rows just trained on; store the fresh ones
                self.memory.observe(out, batch["labels"], self.model, accum, self.precision.loss_scale or 1.0)
            for name, value in terms.items():
                share = value.detach().float() / accum if shares is None else shares[name].detach().float()
                totals[name] = totals.get(name, 0.0) + share
            loads = add_loads(loads, [stats.tokens_per_expert for stats in out.router_stats])
            # The global-batch loss counts the unbiased top-k (DeepSeek-V3 eq. 18) over the step.
            balance_loads = add_loads(balance_loads, [stats.balance_tokens_per_expert for stats in out.router_stats])
            router_acc = accumulate_router_stats(router_acc, out.router_stats)
            tokens += input_ids.numel()
        self.parallel.finish_gradients(self.engine)
        # The whole batch's expert load over the data-parallel ranks: every rank then makes the
        # same aux-free bias update and logs the same diagnostics.
        loads = [self.parallel.all_reduce(load_E) for load_E in loads]
        self._rank_loss = totals["loss"]  # this rank's own, for the distributed health check
        flags, sources = None, self.feed.take_step_counts()  # (sources,) tokens this step, or None
        if self.parallel.world_size > 1:
            totals, flags, sources = self._global_totals(totals, sources)
            router_acc = self._global_router_stats(router_acc)
            tokens *= self.parallel.dp_size  # every rank reads as many rows
        if getattr(micro_batches, "real_tokens", None) is not None:  # unpacked rows: padding is not a token read
            tokens = micro_batches.real_tokens

        self.precision.unscale_(self.optimizer)  # fp16: clip and log the true gradients
        grad_clip = self.config.training.grad_clip
        params = self.precision.grad_params(self.model)  # the fp32 masters with precision.param_dtype bf16
        grad_norm = self.parallel.clip_grad_norm(params, grad_clip if grad_clip else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        # The step's one host read (on a GPU, its one synchronisation besides the all-to-all's
        # split sizes): the health check's loss and norm, the ranks' stop flag, the alarm's counts.
        (loss_value, norm_value, stop_value, save_value), host = _read_to_host(
            [totals["loss"], grad_norm, *(flags.unbind() if flags is not None else (None, None))],
            [*loads, *([sources] if sources is not None else [])])
        self._save_due = save_value > 0 if flags is not None else self._time_to_save()
        host_loads = [load_E.float() for load_E in host[:len(loads)]]
        if sources is not None:
            self.feed.add_source_tokens(host[-1].long())
        if stop_value > 0:  # a rank got SIGINT/SIGTERM before this step's all-reduce: every rank stops now
            self._stop_agreed = True
            self._stop_signal = self._stop_signal or "SIGTERM"
        overflow = self.precision.overflowed(loss_value, norm_value)
        if overflow:  # the loss scaler's business (skip, halve the scale), not a bad step for the health check
            verdict = Verdict(ok=False, reason="fp16 overflow")
            logger.info("step %d: fp16 gradients overflowed at loss scale %g; step skipped, scale halved",
                        self.step + 1, self.precision.loss_scale)
        else:
            verdict = self.health.check(self.step + 1, loss_value, norm_value)
        extra: dict[str, Any] = {}
        every = self.config.gradient.health.layer_grad_norms_every
        if every and (self.step + 1) % every == 0:
            extra = layer_grad_norms(self.model)
        if verdict.ok:
            self.precision.step(self.optimizer)
            if loads:  # aux-loss-free balancing: bias update from this step's load (no-op if off)
                self.model.update_expert_bias(loads)
        elif not overflow:
            logger.warning("step %d skipped: %s", self.step + 1, verdict.reason)
        loss_scale = self.precision.loss_scale  # the scale this step used
        self.precision.update()
        self.scheduler.step()
        self.precision.zero_grad(self.optimizer)
        if verdict.ok and hasattr(self.optimizer, "update_hessian") \
                and (self.step + 1) % self.config.optimizer.sophia_hessian_every == 0:
            input_ids = as_batch(micro_batches[-1])["input_ids"].to(self.device, non_blocking=True)
            refresh_hessian(self.model, self.optimizer, input_ids, self.precision.autocast)
        timer.mark("optimizer")
        self.progress.step += 1
        self.progress.tokens += tokens
        if verdict.rollback:
            self._rollback()
        metrics: dict[str, Any] = {**totals, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                                   "skipped": 0.0 if verdict.ok else 1.0, **coefs, **extra}
        if self.precision.scaling:
            metrics.update(loss_scale=loss_scale, overflow=float(overflow))
        if self.memory is not None:
            metrics.update(self.memory.metrics())
        if loads:
            metrics.update(moe_diagnostics(loads, router_acc))
            self.moe_alarm.on_step(self.step, host_loads, router_acc.get("layers"))
        return metrics

    def _memory_capture(self) -> Any:
        """The replay memory's capture of the final hidden states (memory.enabled), else a no-op."""
        return self.memory.capture(self.model) if self.memory is not None else contextlib.nullcontext()

    def _memory_context(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``context`` / ``context_mask`` of the forward from the replay memory (memory.context_items), else {}."""
        if self.memory is None:
            return {}
        context, context_mask = self.memory.context(batch, self.model)
        return {} if context is None else {"context": context, "context_mask": context_mask}

    def _global_totals(self, totals: dict[str, torch.Tensor], sources: torch.Tensor | None
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """The step's loss terms averaged over the ranks, in one all-reduce (fp64, so counts stay
        exact), so the health check, the log and early stopping see the global batch's values on
        every rank. Riding along: two flags, a stop signal that reached any rank and rank 0's "time
        for a checkpoint" (each > 0 then: every rank stops, or saves, after the same step), and the
        per-source token counts (summed).

        Returns:
            ``(totals, (stop, save) flags, summed source counts or None)``, on the device.
        """
        names = list(totals)
        flags = torch.tensor([float(self._stop_signal is not None), float(self._time_to_save())],
                             dtype=torch.float64, device=self.device)
        parts = [torch.stack([totals[n].reshape(()) for n in names]).double(), flags]
        if sources is not None:
            parts.append(sources.to(self.device, torch.float64))
        summed = self.parallel.all_reduce(torch.cat(parts))
        mean = (summed[:len(names)] / self.parallel.world_size).to(totals[names[0]].dtype)
        n = len(names)
        return dict(zip(names, mean)), summed[n:n + 2], summed[n + 2:] if sources is not None else None

    def _time_to_save(self) -> bool:
        """``checkpoint.every_minutes`` passed since the last save, by rank 0's clock (the one that
        counts: the ranks agree through :meth:`_global_totals`)."""
        minutes = self.config.checkpoint.every_minutes
        return (minutes is not None and self.parallel.is_main
                and time.perf_counter() - self._last_save >= minutes * 60)

    def _global_router_stats(self, acc: dict[str, Any]) -> dict[str, Any]:
        """The step's router statistics (:func:`accumulate_router_stats`: sums) summed over the
        ranks in one all-reduce, so the logged entropy, drop and unrouted rates are the global batch's."""
        keys = [k for k in ("dropped", "router_entropy", "router_logit_norm", "unrouted", "tokens") if k in acc]
        if not keys:
            return acc
        parts = [acc[k].reshape(-1).to(self.device, torch.float64) for k in keys]
        summed = self.parallel.all_reduce(torch.cat(parts)).split([part.numel() for part in parts])
        # "batches" stays a host count (every rank ran as many micro-batches): no device read for it
        return {**acc, **{k: s.reshape(acc[k].shape).to(acc[k].dtype) for k, s in zip(keys, summed)},
                "batches": acc["batches"] * self.parallel.world_size}

    def evaluate(self) -> dict[str, Any]:
        """Validation loss/perplexity and routing diagnostics over the first ``eval_batches``
        batches of the val split (:func:`~Ava.evaluation.validation.validation_loss`, which
        ``ava eval`` runs too)."""
        cfg = self.config
        assert self.data is not None and self.data.val is not None
        # memory.context_items: validation rows attend to the memory's items as training rows do
        context = None if self.memory is None else functools.partial(self.memory.validation_context, model=self.model)
        return validation_loss(self.model, self.data.val, batch_size=cfg.training.batch_size,
                               max_batches=cfg.training.eval_batches, device=self.device,
                               autocast_dtype=self.precision.dtype, document_mask=cfg.data.document_mask,
                               extra_inputs=context)

    # ------------------------------------------------------------------------------------
    # state: checkpoints, resume, rollback
    # ------------------------------------------------------------------------------------

    def save_checkpoint(self, val_loss: float | None = None) -> Path:
        """Save the registry (:attr:`states`) to ``checkpoints/step_<step>``: the model's weights to
        ``model.safetensors``, every other part under its key to ``state.pt``."""
        self._count_wall_time()
        if self.parallel.sharded_checkpoints:  # every rank writes its shards (torch.distributed.checkpoint)
            sharded = self.parallel.sharded_state(self.engine, self.optimizer)
            path = self.checkpoints.save(self.step, sharded, self.config.to_yaml(),
                                         self.states.state_dict(exclude=(MODEL_KEY, "optimizer", "rng")),
                                         self.paths.tokenizer, val_loss, rank_state={"rng": self.states["rng"].state_dict()})
        else:
            weights = self.states[MODEL_KEY].state_dict()
            path = self.checkpoints.save(self.step, weights, self.config.to_yaml(),
                                         self.states.state_dict(exclude=(MODEL_KEY,)), self.paths.tokenizer, val_loss,
                                         extra_files=self._extra_files)
        self._last_good_checkpoint = path
        self._last_save = time.perf_counter()
        return path

    def _restore(self, checkpoint: Path) -> None:
        """Walk the registry: every registered part from ``checkpoint`` (one file or sharded, any world size)."""
        state = self._load_model_and_optimizer(checkpoint)
        self.states.load_state_dict(state, only=tuple(k for k in self.states.keys() if k not in (MODEL_KEY, "optimizer")),
                                    source=str(checkpoint))
        self._last_good_checkpoint = checkpoint

    def _load_model_and_optimizer(self, checkpoint: Path) -> dict[str, Any]:
        """Load the weights and the optimizer state of ``checkpoint``; returns its other state
        (with this rank's RNG state under ``rng`` for a sharded checkpoint)."""
        if is_sharded(checkpoint):  # DCP reshards: saved on any number of ranks, loaded on this many
            templates = self.parallel.sharded_state(self.engine, self.optimizer)
            load_sharded(checkpoint, templates)
            self.parallel.load_sharded_state(self.engine, self.optimizer, templates)
            state, rank_state = load_sharded_state(checkpoint, self.parallel.rank)
            return {**state, "rng": rank_state["rng"]}
        state = load_training_state(checkpoint)
        self.states[MODEL_KEY].load_state_dict(read_weights(checkpoint))
        restored = ("optimizer", "master_weights") if "master_weights" in self.states else ("optimizer",)
        self.states.load_state_dict(state, only=restored, source=str(checkpoint))
        return state

    def _count_wall_time(self) -> float:
        """The run's training wall time so far (earlier segments + this one), kept in ``progress``."""
        self.progress.wall_time_s = self._wall_before + (time.perf_counter() - self._segment_start)
        return self.progress.wall_time_s

    def _already_finished(self, checkpoint: Path) -> TrainingSummary:
        """``--resume`` of a run that reached its last step: change nothing, say how to continue."""
        cfg, paths = self.config, self.paths
        logger.warning(
            "%s already finished: step %d of %d, nothing to train; to train longer raise training.max_steps "
            "(now %s) or training.num_epochs (now %d) and resume again", paths.root, self.step, self.total_steps,
            cfg.training.max_steps, cfg.training.num_epochs)
        if paths.summary.is_file():
            return TrainingSummary(**json.loads(paths.summary.read_text(encoding="utf-8")))
        wall = self.progress.wall_time_s
        return TrainingSummary(
            run_dir=str(paths.root), checkpoint=str(checkpoint), steps=self.step, tokens=self.tokens,
            final_train_loss=float("nan"), final_val_loss=self.last_val, best_val_loss=self.best_val,
            wall_time_s=wall, tokens_per_second=self.tokens / wall if wall else 0.0, sample=None,
            skipped_steps=self.health.skipped, rollbacks=self.health.rollbacks, resumed_from=str(checkpoint),
        )

    def _rollback(self) -> None:
        """Restore model and optimizer from the last good checkpoint; keep the data moving on."""
        self.checkpoints.wait()
        if self._last_good_checkpoint is None:
            logger.error("%d bad steps in a row at step %d and no checkpoint to roll back to; "
                         "continuing (set training.save_every to enable rollback)",
                         self.config.gradient.health.rollback_after, self.step)
            return
        self._load_model_and_optimizer(self._last_good_checkpoint)
        logger.warning("rolled back model and optimizer to %s after %d bad steps; continuing at step %d "
                       "with the next data", self._last_good_checkpoint,
                       self.config.gradient.health.rollback_after, self.step)

    # ------------------------------------------------------------------------------------
    # signals
    # ------------------------------------------------------------------------------------

    def _stop_on_signals(self, steps: Iterator[list[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
        """Iterate ``steps`` with SIGINT/SIGTERM turned into "stop after this step".

        The first signal lets the step in flight finish, so the checkpoint written on the way out
        is exact; a second SIGINT stops at once. ``ava`` then exits 130 after SIGINT and 143 after
        SIGTERM (see :meth:`_stop_after_signal`). Signal handlers exist only in the main thread;
        elsewhere the default behaviour stays.
        """
        if threading.current_thread() is not threading.main_thread():
            yield from steps
            return
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_signal = signal.Signals(signum).name
            hint = " (press Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
            logger.warning("%s: finishing step %d, then saving a checkpoint and stopping%s",
                           self._stop_signal, self.step + 1, hint)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield from steps
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_after_signal(self, bar: tqdm) -> None:
        """Save the completed step and leave as an interrupted run (``--resume auto`` continues it).

        Raises ``KeyboardInterrupt`` carrying the signal's name, so the CLI exits 128 + its number.
        """
        bar.close()
        path = self.save_checkpoint(val_loss=None)
        self.checkpoints.wait()
        logger.warning("stopped by %s at step %d; checkpoint %s; continue with --resume auto",
                       self._stop_signal, self.step, path)
        raise KeyboardInterrupt(self._stop_signal)

    def _guarded_step(self, micro_batches: list[torch.Tensor], timer: StepTimer) -> dict[str, Any]:
        try:
            return self.train_step(micro_batches, timer)
        except torch.OutOfMemoryError as err:
            raise AvaError(f"out of memory at step {self.step + 1}: {oom_hint(self.config, self.device)}") from err

    # ------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------

    def _fit_vocab(self, data: PreparedData, resumed_config: Path | None) -> None:
        """A derived ``model.vocab_size`` becomes the tokenizer's real size rounded up to 64 (a resumed
        run's saved size); the model :meth:`from_config` built for the config-time estimate is rebuilt.
        A model passed in keeps its size (:meth:`_check_vocab` checks that it holds the tokenizer)."""
        if not self._owns_model:
            return
        built = self.config.model.vocab_size
        note = adopt_tokenizer_vocab(self.config, data.tokenizer.vocab_size, resumed_config)
        if note is None:
            return
        logger.info(note)
        if self.config.model.vocab_size != built:
            self.engine = self.parallel.build_model(self.config)
            self.model = self.parallel.unwrap(self.engine)
            self.states[MODEL_KEY].model = self.model
            self.states["coef_schedules"].model = self.model

    def _check_vocab(self, data: PreparedData) -> None:
        raise_on_errors(tokenizer_vocab_issues(self.model.config.vocab_size, data.tokenizer.vocab_size), "config")

    def _progress_bar(self, total_steps: int) -> tqdm:
        interactive = sys.stderr.isatty()
        return tqdm(total=total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not self.config.logging.progress_bar or not self.parallel.is_main,
                    mininterval=0.5 if interactive else 15.0)

    def _log_plan(self, total_steps: int) -> None:
        cfg = self.config
        model = self.model
        backend = cfg.model.moe.backend
        if backend == "auto":
            dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else next(model.parameters()).dtype
            backend = f"auto ({describe_auto(self.device.type, dtype, cfg.model.num_experts)})"
        logger.info(
            "model: %s parameters (%s active per token), %d layer%s, %d expert%s top-%d, backend %s",
            f"{model.num_parameters():,}", f"{model.num_parameters(active_only=True):,}",
            cfg.model.num_layers, "" if cfg.model.num_layers == 1 else "s",
            cfg.model.num_experts, "" if cfg.model.num_experts == 1 else "s", cfg.model.moe.top_k, backend,
        )
        if cfg.finetune is not None:
            logger.info(finetune_summary(cfg, model))
        batch = self.progressive.batch
        budget = cfg.data.max_tokens_per_batch
        per_step = (f"up to {budget * batch.grad_accum * batch.ranks:,} padded" if budget is not None
                    else f"{batch.size * cfg.data.seq_len:,}" if cfg.data.packing
                    else f"up to {batch.size * cfg.data.seq_len:,} padded")
        logger.info(
            "training: steps %d→%d × %s tokens on %s (%s, %d threads), lr %.2e %s",
            self.step, total_steps, per_step, self.device, cfg.precision.dtype, torch.get_num_threads(),
            cfg.training.learning_rate, cfg.scheduler.name,
        )
        every_steps, every_minutes = cfg.training.save_every, cfg.checkpoint.every_minutes
        bounds = [*([plural(every_steps, "step")] if every_steps else []),
                  *([f"{every_minutes:g} minute{'' if every_minutes == 1 else 's'}"] if every_minutes else [])]
        if bounds:
            logger.info("checkpoints: every %s (and at the end): a crash loses at most that much training",
                        " or ".join(bounds))
        else:
            logger.warning("checkpoints: only at the end (training.save_every and checkpoint.every_minutes are off): "
                           "a crash loses the whole run")
        if self.parallel.world_size > 1:
            logger.info("distributed: %s; global batch %d sequences = %d per rank × %d ranks × %d accumulation steps",
                        self.parallel.describe(), batch.size, batch.per_rank, batch.ranks, batch.grad_accum)

    def _sample(self) -> str | None:
        ev = self.config.evaluation
        if ev.sample_max_new_tokens == 0:
            return None
        from ..generation import TextGenerator

        generator = TextGenerator(self.model, self.data.tokenizer, device=self.device)
        text = generator.generate(
            ev.sample_prompt, max_new_tokens=ev.sample_max_new_tokens,
            temperature=ev.sample_temperature, top_k=ev.sample_top_k, seed=self.config.run.seed,
        )
        logger.info("sample:\n%s", text)
        return text


def _read_to_host(scalars: list[torch.Tensor | None], vectors: list[torch.Tensor]
                  ) -> tuple[list[float], list[torch.Tensor]]:
    """0-d tensors (None reads 0.0) and vectors in one device-to-host copy (one synchronisation).

    Returns:
        The scalars as floats and the vectors as fp64 CPU tensors.
    """
    device = next(t for t in scalars if t is not None).device
    parts = [t.reshape(1) if t is not None else torch.zeros(1, device=device) for t in scalars]
    host = torch.cat([t.to(device, torch.float64) for t in parts + [v.reshape(-1) for v in vectors]]).cpu()
    rest = list(host[len(scalars):].split([v.numel() for v in vectors])) if vectors else []
    return host[:len(scalars)].tolist(), rest


def _memory_bytes(device: torch.device) -> float:
    """This rank's memory in use: CUDA's allocated bytes, else the process's resident set."""
    if device.type == "cuda":
        return float(torch.cuda.memory_allocated(device))
    return rss_mb() * 2**20


class _NoMetrics:
    """The metrics writer of ranks other than rank 0 (rank 0 writes the run's global values)."""

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:  # noqa: D102
        pass

    def close(self) -> None:  # noqa: D102
        pass


def _to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
