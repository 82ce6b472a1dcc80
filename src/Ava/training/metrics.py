"""Training metrics: one writer for ``metrics.jsonl`` and TensorBoard, step timing, MFU, and the
MoE collapse alarm.

Every record is a flat dict of numbers tagged with the step and a ``split`` (``train`` / ``val``),
so ``metrics.jsonl`` can be read with one ``json.loads`` per line and plotted directly. The MoE
routing metrics (MaxVio, load entropy, dead experts, drop rate, router statistics) are computed by
:mod:`Ava.models.routing_metrics`, which ``ava eval`` shares; they are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from ..models.routing_metrics import (
    accumulate_router_stats,
    add_loads,
    dead_experts,
    expert_load_shares,
    load_entropy,
    max_vio,
    moe_diagnostics,
    moe_layer_ids,
    token_drop_rate,
)

__all__ = [
    "MetricsWriter", "MoECollapseAlarm", "StepTimer", "accumulate_router_stats", "add_loads", "dead_experts",
    "expert_load_shares", "load_entropy", "max_vio", "measure_matmul_peak", "moe_diagnostics", "moe_layer_ids",
    "start_wandb", "token_drop_rate", "truncate_metrics",
]

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Append metric records to ``metrics.jsonl`` and, optionally, TensorBoard and W&B.

    Args:
        jsonl_path: the metrics file (appended to, flushed after every record).
        tensorboard_dir: folder for TensorBoard events; None disables TensorBoard.
        resume_step: when continuing a run, records after this step (written by the interrupted
            run after its last checkpoint) are dropped from the file and from TensorBoard, so
            the curves show each step once.
        wandb_run: an initialised ``wandb`` run, or None.
    """

    def __init__(self, jsonl_path: Path, tensorboard_dir: Path | None = None,
                 resume_step: int | None = None, wandb_run: Any = None) -> None:
        if resume_step is not None:
            truncate_metrics(jsonl_path, resume_step)
        self._file = open(jsonl_path, "a", encoding="utf-8")
        self._tb = None
        self._wandb = wandb_run
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=purge)

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        """Record ``values`` (numbers; nested lists allowed in the JSON only) at ``step``."""
        record = {"step": step, "split": split, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        scalars = {f"{split}/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def truncate_metrics(path: Path, last_step: int) -> int:
    """Drop records with ``step > last_step`` from a metrics.jsonl (atomically); returns how many."""
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line).get("step", 0) <= last_step:
                kept.append(line)
        except ValueError:
            continue  # a line cut short by the crash
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines) - len(kept)


def start_wandb(config: Any, run_dir: Path, resume: bool) -> Any:
    """Initialise a W&B run from ``logging.wandb`` (None when disabled).

    That ``wandb`` is installed when enabled is a rule of
    :func:`~Ava.config.check_compatibility` (environment checks), reported with the config's
    other problems before the run starts.

    Args:
        config: the resolved config.
        run_dir: the run folder (W&B writes beside it; the run's id is its name).
        resume: continue the W&B run of that id.

    Returns:
        The ``wandb`` run, or None.
    """
    section = config.logging.wandb
    if not section.enabled:
        return None
    import wandb

    return wandb.init(project=section.project, entity=section.entity, mode=section.mode,
                      dir=str(run_dir), name=run_dir.name, id=run_dir.name, config=config.to_dict(),
                      resume="allow" if resume else None)


class StepTimer:
    """Wall time per phase of the steps since the last read.

    Phases: ``data`` (waiting for the next batch), ``forward``, ``backward``, ``optimizer`` and
    ``other`` (the trainer's bookkeeping between steps: metrics, progress, evaluation, checkpoints).

    With ``sync=True`` on CUDA, each phase ends with ``torch.cuda.synchronize`` so the split is
    true (costs some overlap); otherwise times are what the host saw.
    """

    PHASES = ("data", "forward", "backward", "optimizer", "other")

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.enabled = enabled
        self.sync = enabled and device.type == "cuda"
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        self._last = time.perf_counter()

    def mark(self, phase: str) -> None:
        """End ``phase`` now (the time since the previous mark is charged to it)."""
        if not self.enabled:
            return
        if self.sync:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.totals[phase] += now - self._last
        self._last = now

    def read(self) -> dict[str, float]:
        """Seconds per phase since the last read, as ``time_<phase>`` keys; resets."""
        if not self.enabled:
            return {}
        out = {f"time_{k}": v for k, v in self.totals.items()}
        self.totals = dict.fromkeys(self.PHASES, 0.0)
        return out


def measure_matmul_peak(device: torch.device, dtype: torch.dtype = torch.float32,
                        size: int = 1024, seconds: float = 0.3) -> float:
    """Achieved FLOP/s of a square matmul on ``device`` (the MFU denominator; REFERENCES.md).

    Measured in the same process as the run it normalises, so machine speed and thread count
    cancel out of MFU. The first call is timed too: when it alone takes ``seconds`` or more (a
    dtype the CPU only emulates, such as bf16 without AVX512-BF16, where one call takes seconds)
    it is the measurement, so the start of a run is not held up by it.
    """
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def timed(calls: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    first = timed(1)
    if first >= seconds:
        return 2.0 * size**3 / first
    timed(2)  # warm-up
    n, elapsed = 0, 0.0
    while elapsed < seconds:
        elapsed += timed(1)
        n += 1
    return 2.0 * size**3 * n / elapsed


# --------------------------------------------------------------------------------------------
# the MoE collapse alarm (the routing metrics themselves: models/routing_metrics.py)
# --------------------------------------------------------------------------------------------


class MoECollapseAlarm:
    """Warns, or stops the run, when routing collapses (``training.moe_alarm``).

    Two checks, each off when its threshold is null: a layer's MaxVio above ``max_vio`` for
    ``patience`` consecutive steps, and at least ``dead_experts`` experts (over all layers) that
    received no token in the last ``window`` steps (checked once the window is full). Steps
    before ``start_step`` are ignored. ``action: stop`` sets :attr:`stop_reason`; the trainer then
    logs and evaluates the step, saves a checkpoint and the run summary, and ends the run with an
    :class:`~Ava.errors.AvaTrainingError` carrying it. ``action: warn`` logs at most one warning
    every ``window`` steps, saying how many firings it left out since the last one.

    Args:
        cfg: a :class:`~Ava.config.MoEAlarmConfig`.
    """

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self._window: list[torch.Tensor] = []  # (Q, E) counts of the last `window` steps
        self._violations = 0
        self._last_logged: int | None = None  # step of the last warning
        self._unlogged = 0  # firings since then that were not logged
        self.stop_reason: str | None = None

    @property
    def active(self) -> bool:
        return bool(self.cfg.enabled and (self.cfg.max_vio is not None or self.cfg.dead_experts is not None))

    def on_step(self, step: int, tokens_per_expert: list[torch.Tensor], layers: list[int] | None = None) -> str | None:
        """Check one optimizer step.

        Args:
            step: the optimizer step just taken (1-based).
            tokens_per_expert: one (E,) routed count per MoE layer over that step.
            layers: their decoder layer indices (the message names the layer by it); None = 0..L−1.

        Returns:
            The alarm message when it fired, else None. With ``action: stop`` it is also kept
            in :attr:`stop_reason`, with the fix appended.
        """
        if not self.active or not tokens_per_expert or step < self.cfg.start_step:
            return None
        counts_QE = torch.stack([t.detach().float() for t in tokens_per_expert]).cpu()  # (Q, E)
        problems = []
        if self.cfg.max_vio is not None:
            vio_Q = max_vio(counts_QE)
            worst = int(vio_Q.argmax())
            if vio_Q[worst] > self.cfg.max_vio:
                self._violations += 1
                if self._violations >= self.cfg.patience:
                    layer = moe_layer_ids(layers, len(vio_Q))[worst]
                    problems.append(f"MaxVio {vio_Q[worst]:.2f} > {self.cfg.max_vio} in layer {layer} "
                                    f"for {self._violations} step(s)")
            else:
                self._violations = 0
        if self.cfg.dead_experts is not None:
            self._window = (self._window + [counts_QE])[-self.cfg.window:]
            if len(self._window) == self.cfg.window:
                dead = int(dead_experts(torch.stack(self._window).sum(dim=0)).sum())
                if dead >= self.cfg.dead_experts:
                    noun = "expert" if dead == 1 else "experts"
                    problems.append(f"{dead} {noun} got no token in the last {self.cfg.window} steps "
                                    f"(threshold {self.cfg.dead_experts})")
        if not problems:
            return None
        message = f"MoE collapse alarm at step {step}: " + "; ".join(problems)
        if self.cfg.action == "stop":
            self.stop_reason = (message + " — stopping (training.moe_alarm.action: stop); raise the thresholds, "
                                "enable balancing (model.moe.aux_loss_coef / aux_free_bias) or set action: warn")
            logger.warning("%s", message)
        elif self._last_logged is None or step - self._last_logged >= self.cfg.window:
            left_out = (f" (and {self._unlogged} more firing(s) since step {self._last_logged}; at most one "
                        f"warning per {self.cfg.window} steps)" if self._unlogged else "")
            logger.warning("%s%s", message, left_out)
            self._last_logged, self._unlogged = step, 0
        else:
            self._unlogged += 1
        return message

    def state_dict(self) -> dict[str, Any]:
        return {"window": [t.clone() for t in self._window], "violations": self._violations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._window = list(state["window"])
        self._violations = int(state["violations"])
