"""The trainer: orchestrates run folder, data, optimisation loop, evaluation and checkpoints.

``train()`` reads like the pipeline in DESIGN.md; ``train_step()`` holds forward, backward, clip
and optimizer step; every concern it touches (schedules, metrics, checkpoints, run folders, data)
lives in its own module.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler
from tqdm import tqdm

from ..config import EnhancedTrainingConfig, check_compatibility
from ..config.feature_compatibility import raise_on_errors
from ..data import PreparedData, prepare_data
from ..errors import AvaConfigError, AvaDataError
from ..optimization import build_optimizer
from ..utils.checkpoint import rng_state, save_checkpoint
from ..utils.logging import setup_logging
from .lr_manager import build_scheduler
from .metrics import MetricsWriter, expert_load_summary
from .run_manager import RunPaths, create_run_folder, resolve_device, seed_everything, write_summary

logger = logging.getLogger(__name__)


@dataclass
class TrainingSummary:
    """What ``train()`` returns (also written to ``summary.json`` in the run folder)."""

    run_dir: str
    checkpoint: str
    steps: int
    tokens: int
    final_train_loss: float
    final_val_loss: float | None
    best_val_loss: float | None
    wall_time_s: float
    tokens_per_second: float
    sample: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EnhancedModularTrainer:
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
        self.paths: RunPaths | None = None
        self.data: PreparedData | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # ------------------------------------------------------------------------------------
    # the loop
    # ------------------------------------------------------------------------------------

    def train(self) -> TrainingSummary:
        """Run training to the end and return its summary.

        Raises:
            AvaConfigError / AvaDataError: a config or data problem, before any training step.
        """
        cfg = self.config
        start = time.perf_counter()
        raise_on_errors(check_compatibility(cfg, environment=True), "config")
        self.paths = paths = create_run_folder(cfg)
        setup_logging(cfg.logging.level, paths.log_file)
        logger.info("run folder: %s", paths.root)
        seed_everything(cfg.run.seed)
        if cfg.run.num_threads is not None:
            torch.set_num_threads(cfg.run.num_threads)

        self.data = data = prepare_data(cfg.data, cfg.run.seed, paths.tokenizer)
        self._check_vocab(data)
        self.model.to(self.device)
        total_steps = self._total_steps(len(data.train))
        self.optimizer = build_optimizer(self.model, cfg.optimizer, cfg.training.learning_rate, self.device)
        self.scheduler = build_scheduler(self.optimizer, cfg.scheduler, cfg.training.learning_rate, total_steps)
        self._log_plan(total_steps)

        writer = MetricsWriter(paths.metrics, paths.tensorboard if cfg.logging.tensorboard else None)
        val_loss = best_val = None
        train_loss = float("nan")
        try:
            bar = self._progress_bar(total_steps)
            window_tokens, window_start = 0, time.perf_counter()
            for micro_batches in self._optimizer_steps(total_steps):
                metrics = self.train_step(micro_batches)
                window_tokens += metrics.pop("tokens")
                bar.update(1)
                if self.step % cfg.training.log_every == 0 or self.step == total_steps:
                    elapsed = max(time.perf_counter() - window_start, 1e-9)
                    values = _to_floats(metrics)
                    values["tokens_per_s"] = window_tokens / elapsed
                    values["tokens"] = self.tokens
                    train_loss = values["loss"]
                    writer.write(self.step, "train", values)
                    bar.set_postfix(loss=f"{values['lm_loss']:.3f}", lr=f"{values['lr']:.2e}",
                                    tok_s=f"{values['tokens_per_s']:,.0f}")
                    window_tokens, window_start = 0, time.perf_counter()
                if data.val is not None and (self.step % cfg.training.eval_every == 0 or self.step == total_steps):
                    val = self.evaluate()
                    val_loss = val["loss"]
                    best_val = val_loss if best_val is None else min(best_val, val_loss)
                    writer.write(self.step, "val", val)
                    logger.info("step %d/%d  val loss %.4f  ppl %.1f", self.step, total_steps, val_loss, val["ppl"])
                if cfg.training.save_every and self.step % cfg.training.save_every == 0 and self.step < total_steps:
                    self.save_checkpoint()
            bar.close()
            checkpoint = self.save_checkpoint()
        finally:
            writer.close()

        sample = self._sample()
        wall = time.perf_counter() - start
        summary = TrainingSummary(
            run_dir=str(paths.root),
            checkpoint=str(checkpoint),
            steps=self.step,
            tokens=self.tokens,
            final_train_loss=train_loss,
            final_val_loss=val_loss,
            best_val_loss=best_val,
            wall_time_s=wall,
            tokens_per_second=self.tokens / wall,
            sample=sample,
        )
        write_summary(paths, summary.to_dict())
        val_text = "n/a" if val_loss is None else f"{val_loss:.4f}"
        logger.info("done: %d steps, %s tokens in %.0f s; final val loss %s; run folder %s",
                    self.step, f"{self.tokens:,}", wall, val_text, paths.root)
        return summary

    def train_step(self, micro_batches: list[torch.Tensor]) -> dict[str, Any]:
        """One optimizer step over ``micro_batches`` (gradient accumulation).

        Args:
            micro_batches: ``grad_accum_steps`` tensors of token ids, each ``(B, T)``.

        Returns:
            Step metrics as tensors/floats (``loss``, ``lm_loss``, each aux term, ``grad_norm``,
            ``lr``, ``max_vio``) and ``tokens`` (an int). Tensors stay on the device so that no
            host sync happens unless the caller reads them.
        """
        self.model.train()
        accum = len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        loads: list[torch.Tensor] = []
        tokens = 0
        for input_ids in micro_batches:
            input_ids = input_ids.to(self.device, non_blocking=True)  # (B, T)
            with self._autocast():
                out = self.model(input_ids, labels=input_ids)
            (out.loss / accum).backward()
            terms = {"loss": out.loss, "lm_loss": out.lm_loss, **out.aux_losses}
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.detach().float() / accum
            loads = _add_loads(loads, [stats.tokens_per_expert for stats in out.router_stats])
            tokens += input_ids.numel()

        grad_clip = self.config.training.grad_clip
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else float("inf"))
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += tokens
        metrics: dict[str, Any] = {**totals, "grad_norm": grad_norm, "lr": lr, "tokens": tokens}
        if loads:
            metrics["max_vio"] = expert_load_summary(loads)["max_vio"]
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
        for i, input_ids in enumerate(loader):
            if i >= self.config.training.eval_batches:
                break
            input_ids = input_ids.to(self.device)
            with self._autocast():
                out = self.model(input_ids, labels=input_ids)
            n = input_ids[:, 1:].numel()  # predicted positions
            loss_sum += out.lm_loss.item() * n
            count += n
            loads = _add_loads(loads, [stats.tokens_per_expert for stats in out.router_stats])
        loss = loss_sum / count
        result = {"loss": loss, "ppl": math.exp(min(loss, 50.0))}
        if loads:
            result.update(expert_load_summary(loads))
        return result

    def save_checkpoint(self):
        """Save the model and the whole training state to ``checkpoints/step_<step>``."""
        state = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
            "tokens": self.tokens,
        }
        return save_checkpoint(self.paths.checkpoints, self.step, self.model, self.config.to_yaml(),
                               state, self.paths.tokenizer)

    # ------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------

    def _optimizer_steps(self, total_steps: int) -> Iterator[list[torch.Tensor]]:
        """Yield ``grad_accum_steps`` micro-batches per optimizer step, epoch after epoch.

        Each epoch shuffles the windows with a generator seeded by (seed, epoch), so the order
        depends on nothing but the config.
        """
        cfg = self.config.training
        epoch = 0
        while True:
            generator = torch.Generator().manual_seed(self.config.run.seed + epoch)
            loader = DataLoader(self.data.train, batch_size=cfg.batch_size, drop_last=True,
                                sampler=RandomSampler(self.data.train, generator=generator),
                                pin_memory=self.device.type == "cuda")
            pending: list[torch.Tensor] = []
            for batch in loader:
                pending.append(batch)
                if len(pending) == cfg.grad_accum_steps:
                    yield pending
                    pending = []
                    if self.step >= total_steps:
                        return
            epoch += 1

    def _total_steps(self, num_windows: int) -> int:
        cfg = self.config.training
        per_step = cfg.batch_size * cfg.grad_accum_steps
        steps_per_epoch = num_windows // per_step
        if steps_per_epoch == 0:
            raise AvaDataError(
                f"the training split has {num_windows} sequences of data.seq_len={self.config.data.seq_len} "
                f"tokens, fewer than one step needs (batch_size × grad_accum_steps = {per_step}); "
                "lower training.batch_size or data.seq_len, or add data"
            )
        total = steps_per_epoch * cfg.num_epochs
        return min(total, cfg.max_steps) if cfg.max_steps else total

    def _check_vocab(self, data: PreparedData) -> None:
        model_vocab = self.model.config.vocab_size
        if data.tokenizer.vocab_size > model_vocab:
            raise AvaConfigError(
                f"model.vocab_size={model_vocab} is smaller than the tokenizer's {data.tokenizer.vocab_size} "
                "tokens; set model.vocab_size to null (derive it) or to at least the tokenizer's size"
            )

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision.dtype == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _progress_bar(self, total_steps: int) -> tqdm:
        interactive = sys.stderr.isatty()
        return tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True,
                    disable=not self.config.logging.progress_bar,
                    mininterval=0.5 if interactive else 15.0)

    def _log_plan(self, total_steps: int) -> None:
        cfg = self.config
        model = self.model
        logger.info(
            "model: %s parameters (%s active per token), %d layers, %d experts top-%d, backend %s",
            f"{model.num_parameters():,}", f"{model.num_parameters(active_only=True):,}",
            cfg.model.num_layers, cfg.model.num_experts, cfg.model.moe.top_k, cfg.model.moe.backend,
        )
        per_step = cfg.training.batch_size * cfg.training.grad_accum_steps * cfg.data.seq_len
        logger.info(
            "training: %d steps × %s tokens on %s (%s, %d threads), lr %.2e %s",
            total_steps, f"{per_step:,}", self.device, cfg.precision.dtype, torch.get_num_threads(),
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
