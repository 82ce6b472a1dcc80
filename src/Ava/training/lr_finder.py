"""LR range test (Smith 2017, "Cyclical Learning Rates"): sweep the LR, watch the loss.

The LR grows exponentially from ``min_lr`` to ``max_lr`` over ``num_steps`` optimizer steps, one
batch each. The sweep stops once a bias-corrected exponential moving average of the loss exceeds
``divergence`` × the best seen. Each step is the trainer's own
:meth:`~Ava.training.enhanced_trainer.EnhancedModularTrainer.train_step`; the trainer's stateful
registry is restored afterwards, so the test leaves no trace.

The curve the suggestions read (and the plot shows as "smoothed") is a *centred* moving average of
the raw losses over :func:`smoothing_window` steps, a window that scales with the sweep's length:
unlike the EMA it does not lag, so its minimum is where the raw curve's visible minimum is, also
for sweeps of 20–30 steps. Three suggestions, none beyond that minimum:

- ``valley``: the longest decreasing run of the loss up to its minimum; the point half-way through
  its middle third (fastai's "valley": well inside the descent, clear of both the plateau and the
  blow-up).
- ``steepest``: where the smoothed loss falls fastest against log(LR), before its minimum.
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
from typing import TYPE_CHECKING

import torch

from ..config import EnhancedTrainingConfig
from ..data.records import plural
from ..utils.progress import progress_bar
from .state import Stateful

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


@dataclass
class LRFinderResult:
    """What the sweep saw.

    Attributes:
        lrs: LR of each completed step.
        losses: smoothed loss of each step (centred moving average, :func:`smooth`).
        raw_losses: unsmoothed loss of each step.
        suggestions: ``valley``, ``steepest`` and ``min_loss_div10`` LRs.
        diverged: the sweep stopped early on divergence.
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    suggestions: dict[str, float] = field(default_factory=dict)
    diverged: bool = False


def smoothing_window(num_steps: int) -> int:
    """Steps averaged by :func:`smooth` in a sweep of ``num_steps``: about a tenth of the sweep,
    odd, from 1 (no smoothing, under 10 steps) to 21: 3 for 10–29 steps, 5 for 30–49, 11 for the
    default 100."""
    half = min(10, int(num_steps / 20 + 0.5))
    return 2 * half + 1


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred moving average of ``values`` over ``window`` (odd) points, narrowed at the ends so
    that every point is averaged symmetrically: no lag, so a minimum stays where it is."""
    half, n = window // 2, len(values)
    out = []
    for i in range(n):
        h = min(half, i, n - 1 - i)
        out.append(sum(values[i - h:i + h + 1]) / (2 * h + 1))
    return out


def lr_range_test(
    step: Callable[[], float],
    optimizer: torch.optim.Optimizer,
    restore: Sequence[Stateful] = (),
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_steps: int = 100,
    smoothing: float | None = None,
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
        smoothing: EMA factor β of the divergence check; None: ``1 − 1/w`` with ``w`` a tenth of
            the sweep (between 1 and 50 steps), so a short sweep's average follows the loss.
        divergence: stop when the EMA of the loss exceeds this × its best.

    Returns:
        The :class:`LRFinderResult` with suggestions.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"need 0 < min_lr < max_lr, got {min_lr}, {max_lr}")
    beta = 1 - 1 / min(50.0, max(1.0, num_steps / 10)) if smoothing is None else smoothing
    saved = [copy.deepcopy(part.state_dict()) for part in restore]
    lrs: list[float] = []
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
            avg = beta * avg + (1 - beta) * value
            current = avg / (1 - beta ** (i + 1))
            lrs.append(lr)
            raw.append(value)
            best = min(best, current)
            if current > divergence * best:
                diverged = True
                break
    finally:
        for part, state in zip(restore, saved):
            part.load_state_dict(state)
        optimizer.zero_grad(set_to_none=True)
    smoothed = smooth(raw, smoothing_window(num_steps))
    result = LRFinderResult(lrs, smoothed, raw, diverged=diverged)
    result.suggestions = suggest(lrs, smoothed)
    return result


def suggest(lrs: list[float], losses: list[float]) -> dict[str, float]:
    """The three suggested LRs of a sweep, none beyond the LR of the minimum loss.

    Args:
        lrs: swept LRs (increasing).
        losses: smoothed losses.

    Returns:
        ``{"valley", "steepest", "min_loss_div10"}`` → LR (empty when fewer than 3 points).
    """
    n = len(losses)
    if n < 3:
        return {}
    min_idx = min(range(n), key=losses.__getitem__)
    # steepest: most negative d loss / d log lr (central differences) up to the minimum, ends ignored
    log_lrs = [math.log(lr) for lr in lrs]
    interior = range(1, min(min_idx, n - 2) + 1)
    if interior:
        steepest = lrs[min(interior, key=lambda i: (losses[i + 1] - losses[i - 1]) / (log_lrs[i + 1] - log_lrs[i - 1]))]
    else:  # the loss only rises: the first LR is the best seen
        steepest = lrs[0]
    # valley (fastai): longest decreasing subsequence up to the minimum, then the middle of its middle third
    lds = [1] * (min_idx + 1)
    max_start = max_end = 0
    for i in range(1, min_idx + 1):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
        if lds[max_end] < lds[i]:
            max_end, max_start = i, i - lds[i]
    sections = (max_end - max_start) / 3
    valley = lrs[min(min_idx, max_start + int(sections) + int(sections / 2))]
    return {"valley": valley, "steepest": steepest, "min_loss_div10": lrs[min_idx] / 10}


def plot_figure(result: LRFinderResult) -> Figure:
    """Loss vs LR (log scale): the raw losses, the smoothed curve and the suggestions marked.

    The y-limits hold every raw and smoothed point (a log y-axis when the loss spans more than a
    factor of 5, so a final blow-up does not flatten the rest). Drawn with matplotlib's object API
    on an Agg canvas: no display, no pyplot state.

    Args:
        result: the sweep.

    Returns:
        The figure.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    short = len(result.lrs) < 40
    ax.plot(result.lrs, result.raw_losses, color="0.6", linewidth=0.8, marker="." if short else None,
            label="loss")
    ax.plot(result.lrs, result.losses, color="C0", linewidth=1.6, label="smoothed")
    for (name, lr), color in zip(result.suggestions.items(), ["C1", "C2", "C3"]):
        ax.axvline(lr, color=color, linestyle="--", label=f"{name} {lr:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title(f"LR range test ({plural(len(result.lrs), 'step')}" + (", stopped: loss diverged)" if result.diverged else ")"))
    values = [v for v in (*result.raw_losses, *result.losses) if math.isfinite(v)]
    if values:
        low, high = min(values), max(values)
        if low > 0 and high / low > 5:
            from matplotlib.ticker import FuncFormatter

            ax.set_yscale("log")
            ax.set_ylim(low / 1.1, high * 1.1)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _pos: ""))
        else:
            pad = 0.05 * (high - low) or 0.05 * abs(high) or 0.05
            ax.set_ylim(low - pad, high + pad)
    ax.legend(fontsize=8)
    return fig


def save_plot(result: LRFinderResult, path: str | Path) -> Path:
    """Write :func:`plot_figure` as a PNG.

    Args:
        result: the sweep.
        path: PNG file to write.

    Returns:
        The path written.
    """
    path = Path(path)
    plot_figure(result).savefig(path, dpi=100)
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
    from ..config.loading import dump_yaml, load_yaml

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
        data = load_yaml(new_text) or {}
        if (data.get("training") or {}).get("learning_rate") == float(value):
            path.write_text(new_text, encoding="utf-8")
            return
    data = load_yaml(text) or {}
    data.setdefault("training", {})["learning_rate"] = float(value)
    path.write_text(dump_yaml(data), encoding="utf-8")


def run_lr_finder(config: EnhancedTrainingConfig, *, min_lr: float = 1e-6, max_lr: float = 1.0,
                  num_steps: int = 100, work_dir: str | Path, show_progress: bool | None = None) -> LRFinderResult:
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
        show_progress: a progress bar with ETA over the sweep's steps on stderr (None: when
            stderr is a terminal; :func:`~Ava.utils.progress.progress_bar`).

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

    with progress_bar(num_steps, "lr-find", "step", show=show_progress) as bar:
        def step() -> float:
            loss = float(trainer.train_step(next(batches))["loss"])
            bar.update(1)
            bar.set_postfix(lr=f"{trainer.optimizer.param_groups[0]['lr']:.2e}", loss=f"{loss:.3f}", refresh=False)
            return loss

        return lr_range_test(step, trainer.optimizer, [trainer.states], min_lr=min_lr, max_lr=max_lr,
                             num_steps=num_steps)
