"""``ava report RUN_DIR``: plots and a markdown summary of a run, from its ``metrics.jsonl``.

Writes ``RUN_DIR/report/``: ``loss.png`` (train and validation loss), ``lr.png``,
``grad_norm.png``, ``throughput.png`` (tokens/s of training time, :func:`training_throughput`),
``expert_load.png`` (share of routed tokens per layer × expert over the evaluations, when the
model has experts; :func:`expert_load_figure`) and ``report.md``. The figures are drawn with
matplotlib's object API on Agg canvases: no display, no pyplot state.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..data.records import plural
from ..errors import AvaCheckpointError
from ..utils.output_paths import check_output_dir

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger(__name__)


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir/metrics.jsonl`` (lines that do not parse are skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise AvaCheckpointError(f"{path} not found; pass a run folder (runs/<name>_<time>)")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def layer_labels(layers: list[int], num_layers: int | None) -> list[str]:
    """Axis labels of MoE layers by decoder index: ``layer i``, or ``MTP j`` for the MTP block at
    index ``num_layers + j − 1`` (the numbering of ``moe/l{i}`` in metrics.jsonl and of ``ava eval``)."""
    return [f"MTP {i - num_layers + 1}" if num_layers is not None and i >= num_layers else f"layer {i}"
            for i in layers]


def _num_decoder_layers(run_dir: Path) -> int | None:
    """``model.num_layers`` from the run's config.yaml, or None when it cannot be read."""
    import yaml

    try:
        return int(yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))["model"]["num_layers"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        return None


def training_throughput(train: list[dict[str, Any]], val: list[dict[str, Any]]) -> tuple[list[int], list[float], list[int]]:
    """The throughput curve of ``throughput.png``: training time only.

    A train record's ``tokens_per_s`` is the tokens of its logging window (the steps since the
    previous train record) over that window's time. A record that carries ``excluded_time_s``
    (the seconds of evaluation and checkpoint saving in its window) has that time taken out
    already, and is plotted as it is. A record without it counts that time too: when an
    evaluation (a ``val`` record at step ``e``, run after step ``e``'s train record) fell in its
    window, its value would be a dip that is not a slowdown, so it is left out.

    Args:
        train: the ``split == "train"`` records, in order.
        val: the ``split == "val"`` records.

    Returns:
        ``(steps, tokens_per_s, left_out_steps)``.
    """
    eval_steps = sorted(r["step"] for r in val if isinstance(r.get("step"), int))
    steps: list[int] = []
    values: list[float] = []
    left_out: list[int] = []
    previous = 0
    for record in train:
        step, value = record.get("step"), record.get("tokens_per_s")
        if not isinstance(step, int) or not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        window_start, previous = previous, step
        if "excluded_time_s" not in record and any(window_start <= e < step for e in eval_steps):
            left_out.append(step)
            continue
        steps.append(step)
        values.append(float(value))
    return steps, values, left_out


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (no display, no pyplot state), laid out when drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def line_figure(title: str, curves: list[tuple[str, list[int], list[float]]], ylabel: str,
                log_y: bool = False) -> Figure:
    """One plot of ``(label, steps, values)`` curves against the step.

    Args:
        title: the plot's title.
        curves: the curves; empty ones are skipped.
        ylabel: the y-axis label.
        log_y: a log y-axis.

    Returns:
        The figure.
    """
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    for label, xs, ys in curves:
        if xs:
            ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if any(xs for _, xs, _ in curves):
        ax.legend()
    return fig


def expert_load_figure(steps: list[int], loads: list[list[list[float]]], layer_names: list[str]) -> Figure:
    """Heatmap of each MoE layer's expert shares over the evaluations.

    One row per (layer, expert), layer by layer: the rows are labelled with the expert index
    (every 2nd, 4th, ... when there are too many to read), each layer's block is named on the left
    and separated from the next by a white line.

    Args:
        steps: the evaluations' steps (columns).
        loads: per evaluation, per layer, the share of routed tokens of each expert.
        layer_names: one label per layer (:func:`layer_labels`).

    Returns:
        The figure.
    """
    import numpy as np

    num_layers, num_experts = len(loads[0]), len(loads[0][0])
    grid = np.array([[share for layer in load for share in layer] for load in loads]).T  # (L·E, evals)
    rows = grid.shape[0]
    height = min(12.0, max(3.5, 0.22 * rows + 1.5))
    fig = _figure(8, height)
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")

    row_points = 0.75 * height * 72 / rows  # height of one row, in points
    every = 1
    while every < num_experts and every * row_points < 9:  # a 7-point label needs ~9 points
        every *= 2
    experts = [e for e in range(num_experts) if e % every == 0]
    ax.set_yticks([layer * num_experts + e for layer in range(num_layers) for e in experts],
                  [str(e) for _ in range(num_layers) for e in experts], fontsize=7)
    layer_every = 1
    while layer_every < num_layers and layer_every * num_experts * row_points < 11:
        layer_every += 1
    ax.yaxis.remove_overlapping_locs = False  # a layer's centre may fall on an expert row
    shown_layers = range(0, num_layers, layer_every)
    ax.set_yticks([layer * num_experts + (num_experts - 1) / 2 for layer in shown_layers],
                  [layer_names[layer] for layer in shown_layers], minor=True, fontsize=9)
    ax.tick_params(axis="y", which="minor", length=0,
                   pad=12 + 0.65 * 7 * max(len(str(e)) for e in experts))  # left of the expert indices
    for layer in range(1, num_layers):
        ax.axhline(layer * num_experts - 0.5, color="white", linewidth=2)

    columns = len(steps)
    step_every = max(1, -(-columns // 12))
    ax.set_xticks(range(0, columns, step_every), [str(s) for s in steps[::step_every]], rotation=45, ha="right")
    ax.set_xlabel("step (evaluation)")
    ax.set_ylabel("layer, expert index")
    ax.set_title(f"Share of routed tokens per expert ({plural(num_experts, 'expert')} per layer; "
                 f"uniform = {1 / num_experts:.3f})", fontsize=10)
    fig.colorbar(image, ax=ax)
    return fig


def write_report(run_dir: str | Path) -> Path:
    """Render the plots and ``report.md`` into ``run_dir/report/``; returns that folder.

    The folder is checked for writing (:func:`~Ava.utils.output_paths.check_output_dir`) before
    anything is drawn.
    """
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train:
        raise AvaCheckpointError(f"{run_dir / 'metrics.jsonl'} has no training records yet; train first")
    out = check_output_dir(run_dir / "report", "report folder")
    out.mkdir(exist_ok=True)
    images: list[tuple[str, str]] = []

    def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def save(fig: Figure, name: str, title: str) -> None:
        fig.savefig(out / name, dpi=100)
        images.append((title, name))

    save(line_figure("Loss", [("train lm loss", *series(train, "lm_loss")), ("val loss", *series(val, "loss"))],
                     "loss"), "loss.png", "Loss")
    save(line_figure("Learning rate", [("lr", *series(train, "lr"))], "learning rate"), "lr.png", "Learning rate")
    save(line_figure("Gradient norm (before clipping)", [("grad norm", *series(train, "grad_norm"))], "L2 norm",
                     log_y=True), "grad_norm.png", "Gradient norm (before clipping)")
    steps, tokens_per_s, left_out = training_throughput(train, val)
    label = "tokens/s (training time)"
    if left_out:
        label += f"; {plural(len(left_out), 'window')} with an evaluation left out"
    save(line_figure("Throughput (training time)", [(label, steps, tokens_per_s)],
                     "tokens / s"), "throughput.png", "Throughput")

    loads = [(r["step"], r["expert_load"]) for r in val if r.get("expert_load")]
    if loads:
        num_layers = len(loads[0][1])
        names = layer_labels(val[-1].get("expert_load_layers") or list(range(num_layers)), _num_decoder_layers(run_dir))
        save(expert_load_figure([s for s, _ in loads], [load for _, load in loads], names),
             "expert_load.png", "Expert load over training")

    (out / "report.md").write_text(_markdown(run_dir, train, val, images), encoding="utf-8")
    logger.info("report written to %s", out)
    return out


def _markdown(run_dir: Path, train: list[dict], val: list[dict], images: list[tuple[str, str]]) -> str:
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    last = train[-1]
    best_val = min((r["loss"] for r in val), default=None)
    throughput = training_throughput(train, val)[1]
    rows = [
        ("steps", last["step"]),
        ("tokens", f"{last.get('tokens', 0):,.0f}"),
        ("final train lm loss", f"{last.get('lm_loss', float('nan')):.4f}"),
        ("final val loss", f"{val[-1]['loss']:.4f}" if val else "n/a"),
        ("best val loss", f"{best_val:.4f}" if best_val is not None else "n/a"),
        ("mean tokens/s", f"{sum(throughput) / len(throughput):,.0f}" if throughput else "n/a"),
        ("last MFU", f"{last['mfu']:.1%}" if "mfu" in last else "n/a"),
        ("peak RSS", f"{last['peak_rss_mb']:,.0f} MiB" if "peak_rss_mb" in last else "n/a"),
        ("last MaxVio", f"{last['max_vio']:.3f}" if "max_vio" in last else "n/a"),
        ("skipped steps", len(summary.get("skipped_steps", []))),
        ("rollbacks", len(summary.get("rollbacks", []))),
        ("wall time", f"{summary['wall_time_s']:.0f} s" if "wall_time_s" in summary else "n/a"),
    ]
    lines = [f"# Run report: {run_dir.name}", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    if summary.get("sample"):
        lines += ["", "## Sample", "", "```", summary["sample"], "```"]
    for title, name in images:
        lines += ["", f"## {title}", "", f"![{title}]({name})"]
    return "\n".join(lines) + "\n"
