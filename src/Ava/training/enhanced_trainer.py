"""The trainer: orchestrates run folder, data, optimisation loop, evaluation and checkpoints.

``train()`` reads like the pipeline in DESIGN.md; ``train_step()`` holds forward, backward,
health check, clip and optimizer step; every concern it touches (schedules, gradient health,
metrics, checkpoints, run folders, data order) lives in its own module. Everything that changes
during training is gathered by :meth:`EnhancedModularTrainer.training_state` and restored by
:meth:`_restore`, which is what makes ``--resume`` bit-exact on CPU.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, SequentialSampler
from tqdm import tqdm

from ..config import EnhancedTrainingConfig, TokenizerConfig, check_compatibility
from ..config.feature_compatibility import raise_on_errors
from ..data import PreparedData, prepare_data
from ..errors import AvaConfigError, AvaError, AvaTrainingError
from ..layers.experts import describe_auto
from ..optimization import build_optimizer
from ..utils.allocator import tune_cpu_allocator
from ..utils.async_logging import AsyncSink
from ..utils.checkpoint import (
    CheckpointWriter,
    load_training_state,
    load_weights,
    rng_state,
    set_rng_state,
)
from ..utils.logging import setup_logging
from .adaptive_lr import PlateauLR, build_plateau
from .batch import as_batch, model_inputs, predicted_tokens, to_device
from .data_feed import DataFeed
from .early_stopping import EarlyStopping
from .gradient_health import GradientHealthMonitor, layer_grad_norms
from .gradient_surgery import build_surgery
from .lr_manager import build_scheduler
from .memory_monitor import memory_snapshot, oom_hint
from .metrics import (
    MetricsWriter,
    MoECollapseAlarm,
    StepTimer,
    accumulate_router_stats,
    expert_load_shares,
    measure_matmul_peak,
    moe_diagnostics,
    start_wandb,
)
from .progressive_training import ProgressiveSchedule
from .run_manager import (
    RunPaths,
    TrainingSummary,
    check_resume_config,
    create_run_folder,
    resolve_device,
    resolve_resume,
    seed_everything,
    write_summary,
)

logger = logging.getLogger(__name__)


class EnhancedModularTrainer(DataFeed):
    """Trains an :class:`~Ava.models.EnhancedMoEModel` as described by a config.

    Args:
        model: the model, built from ``config.model``.
        config: the resolved training config.

    Example::

        config = EnhancedTrainingConfig.from_yaml("config.yaml")
        model = EnhancedMoEModel(config.model)
        summary = EnhancedModularTrainer(model, config).train()
    """

    def __init__(self, model: torch.nn.Module, config: EnhancedTrainingConfig) -> None:
        self.model = model
        self.config = config
        self.device = resolve_device(config.run.device)
        self.step = 0
        self.tokens = 0
        self._init_data_feed()
        self._stop_signal: str | None = None  # set by SIGINT/SIGTERM: stop after this step
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.paths: RunPaths | None = None
        self.data: PreparedData | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        self.health = GradientHealthMonitor(config.gradient.health)
        self.moe_alarm = MoECollapseAlarm(config.training.moe_alarm)
        self.early_stopping = EarlyStopping(config.evaluation.early_stopping)
        self.plateau: PlateauLR | None = None
        self.surgery = build_surgery(config.gradient.surgery, config.run.seed)
        self.progressive = ProgressiveSchedule(config)  # batch size, row length, epoch order per step
        self.checkpoints: CheckpointWriter | None = None
        self._last_good_checkpoint: Path | None = None

    # ------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------

    def train(self, resume: str | Path | None = None) -> TrainingSummary:
        """Run training to the end and return its summary.

        Args:
            resume: ``"auto"`` (the newest run of this config's name with a good checkpoint;
                a fresh run when there is none), a run folder or a checkpoint folder. The run
                continues in the same run folder, bit-exactly on CPU.

        Raises:
            AvaConfigError / AvaDataError / AvaCheckpointError: a problem found before the first
                step, named with its key, file or checkpoint.
            AvaTrainingError: the MoE collapse alarm stopped the run (``training.moe_alarm.action:
                stop``), after the step that fired it was logged and checkpointed and
                ``summary.json`` written (its ``stopped_by_alarm`` holds the message).
        """
        cfg = self.config
        start = time.perf_counter()
        raise_on_errors(check_compatibility(cfg, environment=True), "config")
        run_dir, checkpoint = resolve_resume(cfg, resume) if resume is not None else (None, None)
        if run_dir is not None:
            changes = check_resume_config(run_dir, cfg)
            self.paths = paths = RunPaths(run_dir)
            cfg.to_yaml(paths.config)
        else:
            self.paths = paths = create_run_folder(cfg)
            changes = []
        setup_logging(cfg.logging.level, paths.log_file)
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

        data_cfg = cfg.data
        if checkpoint is not None:  # the run's own tokenizer, never a retrained one
            data_cfg = cfg.data.model_copy(update={"tokenizer": TokenizerConfig(path=str(paths.tokenizer))})
        self.data = data = prepare_data(data_cfg, cfg.run.seed, None if checkpoint else paths.tokenizer,
                                        eval_windows=cfg.training.eval_batches * cfg.training.batch_size)
        self._check_vocab(data)
        self.model.to(self.device)
        self._set_layer_execution()
        total_steps = self._total_steps(data.train)
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.training.learning_rate, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.training.learning_rate, total_steps)
        self.plateau = build_plateau(self.scheduler, cfg.scheduler.plateau, cfg.training.learning_rate)
        self.checkpoints = CheckpointWriter(paths.checkpoints, cfg.checkpoint.keep_last,
                                            cfg.checkpoint.keep_best, cfg.checkpoint.async_save)
        if checkpoint is not None:
            self._restore(checkpoint)
        self._log_plan(total_steps)

        peak = measure_matmul_peak(self.device, torch.bfloat16 if cfg.precision.dtype == "bf16" else torch.float32)
        flops_per_token = self.model.flops_per_token(cfg.data.seq_len)
        sink = MetricsWriter(paths.metrics, paths.tensorboard if cfg.logging.tensorboard else None,
                             resume_step=self.step if checkpoint is not None else None,
                             wandb_run=start_wandb(cfg, paths.root, resume=checkpoint is not None))
        writer = AsyncSink(sink) if cfg.logging.async_metrics else sink
        timer = StepTimer(self.device, cfg.logging.time_breakdown)
        train_loss = float("nan")
        stopped_early = False
        try:
            bar = self._progress_bar(total_steps)
            window_tokens, window_start = 0, time.perf_counter()
            for micro_batches in self._stop_on_signals(self._optimizer_steps(total_steps)):
                timer.mark("data")
                metrics = self._guarded_step(micro_batches, timer)
                self._cursor = (self.epoch, self.batches_in_epoch)
                self._cursor_source_tokens = dict(self.source_tokens)
                window_tokens += metrics.pop("tokens")
                bar.update(1)
                alarm_stop = self.moe_alarm.stop_reason
                if self.step % cfg.training.log_every == 0 or self.step == total_steps or alarm_stop:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    values = _to_floats(metrics)
                    values["tokens_per_s"] = window_tokens / elapsed
                    values["mfu"] = values["tokens_per_s"] * flops_per_token / peak
                    values["tokens"] = self.tokens
                    if len(data.source_names) > 1:
                        values.update({f"tokens/{name}": float(n) for name, n in self.source_tokens.items()})
                    values.update(self.progressive.metrics())
                    values.update(timer.read())
                    if cfg.logging.memory_every == 0:
                        values.update(memory_snapshot(self.device))
                    train_loss = values["loss"]
                    writer.write(self.step, "train", values)
                    bar.set_postfix(loss=f"{values['lm_loss']:.3f}", lr=f"{values['lr']:.2e}",
                                    tok_s=f"{values['tokens_per_s']:,.0f}")
                    window_tokens, window_start = 0, time.perf_counter()
                if cfg.logging.memory_every and self.step % cfg.logging.memory_every == 0:
                    writer.write(self.step, "memory", memory_snapshot(self.device))
                evaluated = False
                if data.val is not None and (self.step % cfg.training.eval_every == 0 or self.step == total_steps
                                             or alarm_stop):
                    val = self.evaluate()
                    evaluated = True
                    self.last_val = val["loss"]
                    self.best_val = val["loss"] if self.best_val is None else min(self.best_val, val["loss"])
                    writer.write(self.step, "val", val)
                    logger.info("step %d/%d  val loss %.4f  ppl %.1f", self.step, total_steps, val["loss"], val["ppl"])
                    stopped_early = self.early_stopping.update(val["loss"])
                    self._adapt_lr(val["loss"])
                save_every = cfg.training.save_every
                if stopped_early or (save_every and self.step % save_every == 0 and self.step < total_steps
                                     and not alarm_stop):  # an alarm stop saves once, below
                    self.save_checkpoint(val_loss=self.last_val if evaluated else None)
                if stopped_early:
                    logger.info("early stopping at step %d: no val-loss improvement in %d evaluations",
                                self.step, self.early_stopping.bad_evals)
                    break
                if alarm_stop:  # the step is logged and evaluated; the final checkpoint and summary follow
                    break
                if self._stop_signal is not None:
                    self._stop_after_signal(bar)
                timer.mark("other")  # bookkeeping above: not charged to the data wait
            bar.close()
            checkpoint_dir = self.save_checkpoint(val_loss=self.last_val) if not stopped_early else self.checkpoints.last_path
            self.checkpoints.wait()
        finally:
            writer.close()

        sample = self._sample()
        wall = time.perf_counter() - start
        summary = TrainingSummary(
            run_dir=str(paths.root), checkpoint=str(checkpoint_dir), steps=self.step, tokens=self.tokens,
            final_train_loss=train_loss, final_val_loss=self.last_val, best_val_loss=self.best_val,
            wall_time_s=wall, tokens_per_second=self.tokens / wall, sample=sample,
            skipped_steps=self.health.skipped, rollbacks=self.health.rollbacks,
            stopped_early=stopped_early, resumed_from=str(checkpoint) if checkpoint else None,
            stopped_by_alarm=self.moe_alarm.stop_reason,
        )
        write_summary(paths, summary.to_dict())
        data.report.log()  # rows skipped / characters replaced under the sources' policies, again at the end
        if self.health.skipped:
            logger.warning("%d step(s) skipped by the gradient health check: %s", len(self.health.skipped),
                           ", ".join(f"{s} ({r})" for s, r in self.health.skipped[:10]))
        if self.health.rollbacks:
            logger.warning("rolled back to the last good checkpoint at step(s) %s", self.health.rollbacks)
        val_text = "n/a" if self.last_val is None else f"{self.last_val:.4f}"
        logger.info("done: %d steps, %s tokens in %.0f s; final val loss %s; run folder %s",
                    self.step, f"{self.tokens:,}", wall, val_text, paths.root)
        if self.moe_alarm.stop_reason:
            raise AvaTrainingError(f"{self.moe_alarm.stop_reason} (checkpoint {checkpoint_dir})")
        return summary

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
        coefs = {f"coef/{name}": value
                 for name, value in self.model.balancing_coefficients(scheduled_only=True).items()}
        accum = len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        loads: list[torch.Tensor] = []
        router_acc: dict[str, torch.Tensor] = {}
        tokens = 0
        document_mask = self.config.data.document_mask
        for batch in micro_batches:
            batch = to_device(as_batch(batch), self.device)
            input_ids = batch["input_ids"]  # (B, T)
            with self._autocast():
                out = self.model(input_ids, **model_inputs(batch, document_mask), moe_load_prefix=loads or None)
            timer.mark("forward")
            if self.surgery is None:
                (out.loss / accum).backward()
            else:
                self._surgery_backward(out, accum)
            timer.mark("backward")
            terms = {"loss": out.loss, "lm_loss": out.lm_loss, **out.aux_losses}
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / accum
            loads = _add_loads(loads, [stats.tokens_per_expert for stats in out.router_stats])
            router_acc = accumulate_router_stats(router_acc, out.router_stats)
            tokens += input_ids.numel()
            self._count_source_tokens(batch)

        grad_clip = self.config.training.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        verdict = self.health.check(self.step + 1, float(totals["loss"]), float(grad_norm))
        extra: dict[str, Any] = {}
        every = self.config.gradient.health.layer_grad_norms_every
        if every and (self.step + 1) % every == 0:
            extra = layer_grad_norms(self.model)
        if verdict.ok:
            self.optimizer.step()
            if loads:  # aux-loss-free balancing: bias update from this step's load (no-op if off)
                self.model.update_expert_bias(loads)
        else:
            logger.warning("step %d skipped: %s", self.step + 1, verdict.reason)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if verdict.ok and hasattr(self.optimizer, "update_hessian"):
            self._update_hessian(micro_batches[-1])
        timer.mark("optimizer")
        self.step += 1
        self.tokens += tokens
        if verdict.rollback:
            self._rollback()
        metrics: dict[str, Any] = {**totals, "grad_norm": grad_norm, "lr": lr, "tokens": tokens,
                                   "skipped": 0.0 if verdict.ok else 1.0, **coefs, **extra}
        if loads:
            metrics.update(moe_diagnostics(loads, router_acc))
            self.moe_alarm.on_step(self.step, loads, router_acc.get("layers"))
        return metrics

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Validation loss/perplexity over the first ``eval_batches`` batches of the val split."""
        assert self.data is not None and self.data.val is not None
        self.model.eval()
        loader = DataLoader(self.data.val, batch_size=self.config.training.batch_size,
                            sampler=SequentialSampler(self.data.val))
        loss_sum, count = 0.0, 0
        loads: list[torch.Tensor] = []
        router_acc: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(loader):
            if i >= self.config.training.eval_batches:
                break
            batch = to_device(as_batch(batch), self.device)
            with self._autocast():
                out = self.model(batch["input_ids"], **model_inputs(batch, self.config.data.document_mask))
            n = predicted_tokens(batch)
            loss_sum += out.lm_loss.item() * n
            count += n
            loads = _add_loads(loads, [stats.tokens_per_expert for stats in out.router_stats])
            router_acc = accumulate_router_stats(router_acc, out.router_stats)
        loss = loss_sum / count
        result = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if loads:
            result.update(expert_load_shares(loads, router_acc.get("layers")))
            result.update({k: float(v) for k, v in moe_diagnostics(loads, router_acc).items()})
        return result

    # ------------------------------------------------------------------------------------
    # state: checkpoints, resume, rollback
    # ------------------------------------------------------------------------------------

    def training_state(self) -> dict[str, Any]:
        """Everything besides the weights that a bit-exact resume needs (weights_only-safe)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "tokens": self.tokens,
            "data_cursor": self._data_cursor(),
            "health": self.health.state_dict(),
            "early_stopping": self.early_stopping.state_dict(),
            "best_val": self.best_val,
            "last_val": self.last_val,
            "plateau": self.plateau.state_dict() if self.plateau is not None else None,
            "surgery": self.surgery.state_dict() if self.surgery is not None else None,
            "moe_alarm": self.moe_alarm.state_dict(),
            "progressive": self.progressive.state_dict(),
        }

    def save_checkpoint(self, val_loss: float | None = None) -> Path:
        """Save the model and the whole training state to ``checkpoints/step_<step>``."""
        path = self.checkpoints.save(self.step, self.model, self.config.to_yaml(), self.training_state(),
                                     self.paths.tokenizer, val_loss)
        self._last_good_checkpoint = path
        return path

    def _restore(self, checkpoint: Path) -> None:
        """Load weights and training state of ``checkpoint`` into this trainer."""
        state = load_training_state(checkpoint)
        load_weights(self.model, checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.tokens = state["step"], state["tokens"]
        self._restore_data_cursor(state["data_cursor"])
        self.health.load_state_dict(state["health"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        self.moe_alarm.load_state_dict(state["moe_alarm"])
        self.best_val, self.last_val = state["best_val"], state["last_val"]
        if self.plateau is not None and state.get("plateau"):
            self.plateau.load_state_dict(state["plateau"])
        if self.surgery is not None and state.get("surgery"):
            self.surgery.load_state_dict(state["surgery"])
        if state.get("progressive") is not None:
            self.progressive.load_state_dict(state["progressive"])
        self._last_good_checkpoint = checkpoint

    def _rollback(self) -> None:
        """Restore model and optimizer from the last good checkpoint; keep the data moving on."""
        self.checkpoints.wait()
        if self._last_good_checkpoint is None:
            logger.error("%d bad steps in a row at step %d and no checkpoint to roll back to; "
                         "continuing (set training.save_every to enable rollback)",
                         self.config.gradient.health.rollback_after, self.step)
            return
        state = load_training_state(self._last_good_checkpoint)
        load_weights(self.model, self._last_good_checkpoint)
        self.optimizer.load_state_dict(state["optimizer"])
        logger.warning("rolled back model and optimizer to %s after %d bad steps; continuing at step %d "
                       "with the next data", self._last_good_checkpoint,
                       self.config.gradient.health.rollback_after, self.step)

    # ------------------------------------------------------------------------------------
    # optional optimisation features (off by default; each one small call from the loop/step)
    # ------------------------------------------------------------------------------------

    def _adapt_lr(self, val_loss: float) -> None:
        """Plateau-adaptive LR: lower the schedule's peak when the val loss stalls (if enabled)."""
        if self.plateau is not None:
            self.plateau.step(val_loss)

    def _update_hessian(self, batch: dict[str, torch.Tensor] | torch.Tensor) -> None:
        """Sophia-G: refresh the Hessian estimate every ``optimizer.sophia_hessian_every`` steps.

        Labels are sampled from the model's own predictions; the gradient of the loss on them
        gives ĥ = B·ĝ⊙ĝ (Gauss–Newton–Bartlett), B = the number of predicted tokens.

        Args:
            batch: this step's last micro-batch.
        """
        if (self.step + 1) % self.config.optimizer.sophia_hessian_every:
            return
        input_ids = as_batch(batch)["input_ids"].to(self.device, non_blocking=True)  # (B, T)
        with self._autocast():
            logits_BTV = self.model(input_ids).logits[:, :-1].float()
        with torch.no_grad():
            sampled_BT = torch.distributions.Categorical(logits=logits_BTV).sample()
        loss = torch.nn.functional.cross_entropy(logits_BTV.flatten(0, 1), sampled_BT.flatten())
        loss.backward()
        self.optimizer.update_hessian(scale=float(sampled_BT.numel()))
        self.optimizer.zero_grad(set_to_none=True)

    def _surgery_backward(self, out: Any, accum: int) -> None:
        """Per-term backward on the shared parameters, combined by ``gradient.surgery``.

        Terms listed in ``gradient.surgery.terms`` get their own gradient; the combined
        direction (plus the plain gradient of any unlisted term) is added to ``p.grad``.

        Args:
            out: the model output (``lm_loss``, ``aux_losses``, ``loss``).
            accum: micro-batches per optimizer step (the gradient is divided by it).
        """
        named = {"lm_loss": out.lm_loss, **out.aux_losses}
        terms = [named[name] for name in self.surgery.terms]
        params = [p for p in self.model.parameters() if p.requires_grad]
        flat = []
        for term in terms:
            grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
            flat.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                   for p, g in zip(params, grads)]))
        combined_P = self.surgery.combine(torch.stack(flat), torch.stack([t.detach() for t in terms]))
        rest = [value for name, value in named.items() if name not in self.surgery.terms]
        if rest:  # unlisted terms keep their plain gradient
            (sum(rest) / accum).backward(retain_graph=True)
        offset = 0
        for p in params:
            g = combined_P[offset:offset + p.numel()].view_as(p) / accum
            p.grad = g.clone() if p.grad is None else p.grad.add_(g)
            offset += p.numel()

    def _stop_on_signals(self, steps: Iterator[list[torch.Tensor]]) -> Iterator[list[torch.Tensor]]:
        """Iterate ``steps`` with SIGINT/SIGTERM turned into "stop after this step".

        The first signal lets the step in flight finish, so the checkpoint written on the way out
        is exact; a second SIGINT stops at once. Signal handlers exist only in the main thread;
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
            logger.warning("%s: finishing step %d, then saving a checkpoint and stopping "
                           "(press Ctrl-C again to stop at once)", self._stop_signal, self.step + 1)

        for sig in previous:
            signal.signal(sig, handler)
        try:
            yield from steps
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def _stop_after_signal(self, bar: tqdm) -> None:
        """Save the completed step and leave as an interrupted run (``--resume auto`` continues it)."""
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

    def _check_vocab(self, data: PreparedData) -> None:
        model_vocab = self.model.config.vocab_size
        if data.tokenizer.vocab_size > model_vocab:
            raise AvaConfigError(
                f"model.vocab_size={model_vocab} is smaller than the tokenizer's {data.tokenizer.vocab_size} "
                "tokens; set model.vocab_size to null (derive it) or to at least the tokenizer's size"
            )

    def _set_layer_execution(self) -> None:
        """``performance.activation_checkpointing`` and ``performance.compile`` onto the model."""
        perf = self.config.performance
        self.model.set_activation_checkpointing(perf.activation_checkpointing)
        self.model.compile_layers(perf.compile)
        if perf.compile:
            logger.info("performance.compile: torch.compile of the decoder layers (routed experts stay eager); "
                        "the first training step is slow while it compiles")

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _progress_bar(self, total_steps: int) -> tqdm:
        interactive = sys.stderr.isatty()
        return tqdm(total=total_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not self.config.logging.progress_bar,
                    mininterval=0.5 if interactive else 15.0)

    def _log_plan(self, total_steps: int) -> None:
        cfg = self.config
        model = self.model
        backend = cfg.model.moe.backend
        if backend == "auto":
            dtype = torch.bfloat16 if cfg.precision.dtype == "bf16" else next(model.parameters()).dtype
            backend = f"auto ({describe_auto(self.device.type, dtype, cfg.model.num_experts)})"
        logger.info(
            "model: %s parameters (%s active per token), %d layers, %d experts top-%d, backend %s",
            f"{model.num_parameters():,}", f"{model.num_parameters(active_only=True):,}",
            cfg.model.num_layers, cfg.model.num_experts, cfg.model.moe.top_k, backend,
        )
        per_step = cfg.training.batch_size * cfg.training.grad_accum_steps * cfg.data.seq_len
        logger.info(
            "training: steps %d→%d × %s tokens on %s (%s, %d threads), lr %.2e %s",
            self.step, total_steps, f"{per_step:,}", self.device, cfg.precision.dtype, torch.get_num_threads(),
            cfg.training.learning_rate, cfg.scheduler.name,
        )

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


def _add_loads(acc: list[torch.Tensor], new: list[torch.Tensor]) -> list[torch.Tensor]:
    """Element-wise sum of two per-layer lists of token counts."""
    if not acc:
        return list(new)
    return [a + b for a, b in zip(acc, new)]


def _to_floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v.item() if isinstance(v, torch.Tensor) else v) for k, v in metrics.items()}
