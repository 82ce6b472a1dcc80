"""LR range test (Smith 2017, "Cyclical Learning Rates"): sweep the LR, watch the loss.

The LR grows exponentially from ``min_lr`` to ``max_lr`` over ``num_steps`` optimizer steps, one
batch each; the loss is smoothed with a bias-corrected exponential moving average, and the sweep
stops once the smoothed loss exceeds ``divergence`` × the best seen. Each step is the trainer's
own :meth:`~Ava.training.enhanced_trainer.EnhancedModularTrainer.train_step`; the trainer's
stateful registry is restored afterwards, so the test leaves no trace. Three suggestions:

- ``valley``: the longest decreasing run of the loss; the point half-way through its middle third
  (fastai's "valley": well inside the descent, clear of both the plateau and the blow-up).
- ``steepest``: where the smoothed loss falls fastest against log(LR).
- ``min_loss_div10``: the LR at the minimum smoothed loss, divided by 10.
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import EnhancedTrainingConfig
from .state import Stateful

logger = logging.getLogger(__name__)


@dataclass
class LRFinderResult:
    """What the sweep saw.

    Attributes:
        lrs: LR of each completed step.
        losses: smoothed loss of each step.
        raw_losses: unsmoothed loss of each step.
        suggestions: ``valley``, ``steepest`` and ``min_loss_div10`` LRs.
        diverged: the sweep stopped early on divergence.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestions: dict[str, float] = field(default_factory=dict)
    diverged: bool = False


def lr_range_test(
    step: Callable[[], float],
    optimizer: torch.optim.Optimizer,
    restore: Sequence[Stateful] = (),
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    divergence: float = 4.0,
) -> LRFinderResult:
    """Run the sweep, then put every part in ``restore`` back as it was before it.

    Args:
        step: one optimizer step at the LR now in ``optimizer``'s groups; returns its loss (the
            trainer's :meth:`~Ava.training.enhanced_trainer.EnhancedModularTrainer.train_step`
            in ``ava lr-find``).
        optimizer: the optimizer ``step`` updates with; a group's ``lr_mult`` (if any) scales
            that group's LR.
        restore: stateful parts (model, optimizer, the trainer's whole registry) whose state is
            copied before the sweep and loaded back after it.
        min_lr: first LR.
        max_lr: last LR.
        num_steps: sweep length.
        smoothing: EMA factor β of the loss.
        divergence: stop when the smoothed loss exceeds this × the best smoothed loss.

    Returns:
        The :class:`LRFinderResult` with suggestions.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got {min_lr}, {max_lr}")
    saved = [copy.deepcopy(part.state_dict()) for part in restore]
    lrs: list[float] = []
    smoothed: list[float] = []
    raw: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    try:
        for i in range(num_steps):
            lr = min_lr * (max_lr / min_lr) ** (i / max(1, num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            value = step()
            if not math.isfinite(value):
                diverged = True
                break
            avg = smoothing * avg + (1 - smoothing) * value
            current = avg / (1 - smoothing ** (i + 1))
            lrs.append(lr)
            raw.append(value)
            smoothed.append(current)
            best = min(best, current)
            if current > divergence * best:
                diverged = True
                break
    finally:
        for part, state in zip(restore, saved):
            part.load_state_dict(state)
        optimizer.zero_grad(set_to_none=True)
    result = LRFinderResult(lrs, smoothed, raw, diverged=diverged)
    result.suggestions = suggest(lrs, smoothed)
    return result


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """The three suggested LRs of a sweep.

    Args:
        lrs: swept LRs (increasing).
        losses: smoothed losses.

    Returns:
        ``{"valley", "steepest", "min_loss_div10"}`` → LR (empty when fewer than 3 points).
    """
    n = len(losses)
    if n < 3:
        return {}
    # steepest: most negative d loss / d log lr (central differences), ignoring the ends
    log_lrs = [math.log(lr) for lr in lrs]
    slopes = [(losses[i + 1] - losses[i - 1]) / (log_lrs[i + 1] - log_lrs[i - 1]) for i in range(1, n - 1)]
    steepest = lrs[1 + min(range(len(slopes)), key=slopes.__getitem__)]
    min_idx = min(range(n), key=losses.__getitem__)
    # valley (fastai): longest decreasing subsequence, then the middle of its middle third
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    valley = lrs[min(n - 1, max_start + int(sections) + int(sections / 2))]
    return {"valley": valley, "steepest": steepest, "min_loss_div10": lrs[min_idx] / 10}


def save_plot(result: LRFinderResult, path: str | Path) -> Path:
    """Loss vs LR (log scale) with the suggestions marked, as a PNG (Agg canvas, no display).

    Args:
        result: the sweep.
        path: PNG file to write.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(result.lrs, result.raw_losses, color="0.75", linewidth=0.8, label="loss")
    ax.plot(result.lrs, result.losses, color="C0", label="smoothed")
    for (name, lr), color in zip(result.suggestions.items(), ["C1", "C2", "C3"]):
        ax.axvline(lr, color=color, linestyle="--", label=f"{name} {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("LR range test")
    if result.losses:
        low = min(result.losses)
        ax.set_ylim(low - 0.1 * abs(low), max(result.losses[0], low) * 1.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path


_TOP_KEY = re.compile(r"^(\S[^:#]*):")


def write_learning_rate(path: str | Path, lr: float) -> None:
    """Set ``training.learning_rate`` in a YAML file, keeping its comments and layout.

    A block-style ``training:`` section gets its ``learning_rate:`` line edited (or one inserted);
    a missing section is appended. Anything else (flow style) is rewritten with ``yaml.safe_dump``.

    Args:
        path: the config file.
        lr: the new learning rate.
    """
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    value = f"{lr:.3g}"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^training:\s*(#.*)?$", line)), None)
    if start is None and not any(_TOP_KEY.match(line) and line.startswith("training") for line in lines):
        new_text = text + ("" if text.endswith("\n") or not text else "\n") + f"training:\n  learning_rate: {value}\n"
    elif start is not None:
        end = next((i for i in range(start + 1, len(lines)) if _TOP_KEY.match(lines[i])), len(lines))
        found = False
        for i in range(start + 1, end):
            m = re.match(r"^(\s+learning_rate:\s*)([^\s#]+)(.*)$", lines[i].rstrip("\n"))
            if m:
                lines[i] = f"{m.group(1)}{value}{m.group(3)}\n"
                found = True
                break
        if not found:
            body = [line for line in lines[start + 1:end] if line.strip() and not line.lstrip().startswith("#")]
            indent = re.match(r"^(\s*)", body[0]).group(1) if body else "  "
            lines.insert(start + 1, f"{indent}learning_rate: {value}\n")
        new_text = "".join(lines)
    else:
        new_text = None
    if new_text is not None:
        data = yaml.safe_load(new_text) or {}
        if (data.get("training") or {}).get("learning_rate") == float(value):
            path.write_text(new_text, encoding="utf-8")
            return
    data = yaml.safe_load(text) or {}
    data.setdefault("training", {})["learning_rate"] = float(value)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def run_lr_finder(config: EnhancedTrainingConfig, *, min_lr: float = 1e-6, max_lr: float = 1.0,
                  num_steps: int = 100, work_dir: str | Path) -> LRFinderResult:
    """The LR range test of a whole config, run by the trainer's own step.

    A trainer is built as ``ava train`` builds it (a new model initialised from ``run.seed``,
    the config's optimizer, precision, activation checkpointing and compile, gradient
    accumulation and clipping); each sweep step is its :meth:`train_step` over the training's own
    batches. The gradient health check is off during the sweep: its late steps are meant to
    blow up, and skipping them would hide that.

    Args:
        config: a resolved :class:`~Ava.config.EnhancedTrainingConfig`.
        min_lr: first LR of the sweep.
        max_lr: last LR of the sweep.
        num_steps: sweep length (batches continue into the next epoch if it is shorter).
        work_dir: where the (trained or copied) tokenizer is written.

    Returns:
        The sweep's :class:`LRFinderResult`.
    """
    from ..data import prepare_data
    from .enhanced_trainer import EnhancedModularTrainer
    from .run_manager import seed_everything

    config = config.model_copy(deep=True)
    config.gradient.health.enabled = False
    seed_everything(config.run.seed)
    data = prepare_data(config.data, config.run.seed, Path(work_dir) / "tokenizer.json")
    trainer = EnhancedModularTrainer.from_config(config)
    trainer.prepare(data)
    batches = trainer.feed.optimizer_steps(trainer.step + num_steps)

    def step() -> float:
        return float(trainer.train_step(next(batches))["loss"])

    return lr_range_test(step, trainer.optimizer, [trainer.states], min_lr=min_lr, max_lr=max_lr,
                         num_steps=num_steps)
