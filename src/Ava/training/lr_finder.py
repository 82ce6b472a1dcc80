"""LR range test (Smith 2017, "Cyclical Learning Rates"): sweep the LR, watch the loss.

The LR grows exponentially from ``min_lr`` to ``max_lr`` over ``num_steps`` optimizer steps, one
batch each; the loss is smoothed with a bias-corrected exponential moving average, and the sweep
stops once the smoothed loss exceeds ``divergence`` × the best seen. Model weights and optimizer
state are restored afterwards, so the test leaves no trace. Three suggestions:

- ``valley``: the longest decreasing run of the loss; the point half-way through its middle third
  (fastai's "valley": well inside the descent, clear of both the plateau and the blow-up).
- ``steepest``: where the smoothed loss falls fastest against log(LR).
- ``min_loss_div10``: the LR at the minimum smoothed loss, divided by 10.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

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
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[torch.Tensor],
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float = 0.98,
    divergence: float = 4.0,
    grad_clip: float | None = 1.0,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> LRFinderResult:
    """Run the sweep and restore ``model`` and ``optimizer`` to their state before it.

    Args:
        model: a model whose forward takes ``(input_ids, labels=...)`` and returns ``.loss``.
        optimizer: its optimizer; a group's ``lr_mult`` (if any) scales that group's LR.
        batches: ``(B, T)`` token-id batches (at least ``num_steps``).
        min_lr: first LR.
        max_lr: last LR.
        num_steps: sweep length.
        smoothing: EMA factor β of the loss.
        divergence: stop when the smoothed loss exceeds this × the best smoothed loss.
        grad_clip: global gradient-norm clip (None = off), as in training.
        device: where the batches go.
        autocast: optional factory of the autocast context.

    Returns:
        The :class:`LRFinderResult` with suggestions.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got {min_lr}, {max_lr}")
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    was_training = model.training
    lrs: list[float] = []
    smoothed: list[float] = []
    raw: list[float] = []
    avg, best, diverged = 0.0, math.inf, False
    model.train()
    try:
        for i in range(num_steps):
            lr = min_lr * (max_lr / min_lr) ** (i / max(1, num_steps - 1))
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_mult", 1.0)
            input_ids = next(batches).to(device)
            with autocast() if autocast else contextlib.nullcontext():
                loss = model(input_ids, labels=input_ids).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            value = loss.item()
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
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        optimizer.zero_grad(set_to_none=True)
        model.train(was_training)
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


def run_lr_finder(config, *, min_lr: float = 1e-6, max_lr: float = 1.0, num_steps: int = 100,
                  work_dir: str | Path) -> LRFinderResult:
    """The LR range test of a whole config: its data, a freshly initialised model, its optimizer.

    Args:
        config: a resolved :class:`~Ava.config.EnhancedTrainingConfig`.
        min_lr: first LR of the sweep.
        max_lr: last LR of the sweep.
        num_steps: sweep length (batches cycle through the training split if it is shorter).
        work_dir: where the (trained or copied) tokenizer is written.

    Returns:
        The sweep's :class:`LRFinderResult`.
    """
    from torch.utils.data import DataLoader, RandomSampler

    from ..data import prepare_data
    from ..models import EnhancedMoEModel
    from ..optimization import build_optimizer
    from .run_manager import resolve_device, seed_everything

    seed_everything(config.run.seed)
    device = resolve_device(config.run.device)
    data = prepare_data(config.data, config.run.seed, Path(work_dir) / "tokenizer.json")
    model = EnhancedMoEModel(config.model).to(device)
    # The sweep's steps run like the training's (memory and numerics): checkpointing and compile.
    model.set_activation_checkpointing(config.performance.activation_checkpointing)
    model.compile_layers(config.performance.compile)
    optimizer = build_optimizer(model, config.optimizer, min_lr, device)
    generator = torch.Generator().manual_seed(config.run.seed)

    def forever() -> Iterator[torch.Tensor]:
        while True:
            for batch in DataLoader(data.train, batch_size=config.training.batch_size, drop_last=True,
                                    sampler=RandomSampler(data.train, generator=generator)):
                yield batch["input_ids"]

    def autocast() -> contextlib.AbstractContextManager:
        if config.precision.dtype == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    return lr_range_test(model, optimizer, forever(), min_lr=min_lr, max_lr=max_lr, num_steps=num_steps,
                         grad_clip=config.training.grad_clip, device=device, autocast=autocast)
