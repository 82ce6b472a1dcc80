"""``ava report RUN_DIR``: plots and a markdown summary of a run, from its ``metrics.jsonl``.

Writes ``RUN_DIR/report/``: ``loss.png`` (train and validation loss), ``lr.png``,
``grad_norm.png``, ``throughput.png`` (tokens/s and MFU), ``expert_load.png`` (share of routed
tokens per layer × expert over the evaluations, when the model has experts) and ``report.md``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..errors import AvaCheckpointError

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


def write_report(run_dir: str | Path) -> Path:
    """Render the plots and ``report.md`` into ``run_dir/report/``; returns that folder."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    if not train:
        raise AvaCheckpointError(f"{run_dir / 'metrics.jsonl'} has no training records yet; train first")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    images = []

    def series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
        pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def line_plot(name: str, title: str, curves: list[tuple[str, list[dict], str]], ylabel: str,
                  log_y: bool = False) -> None:
        fig, ax = plt.subplots(figsize=(7, 4))
        for label, rows, key in curves:
            xs, ys = series(rows, key)
            if xs:
                ax.plot(xs, ys, label=label, marker="o" if len(xs) < 30 else None)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if log_y:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / name, dpi=100)
        plt.close(fig)
        images.append((title, name))

    line_plot("loss.png", "Loss", [("train lm loss", train, "lm_loss"), ("val loss", val, "loss")], "loss")
    line_plot("lr.png", "Learning rate", [("lr", train, "lr")], "learning rate")
    line_plot("grad_norm.png", "Gradient norm (before clipping)", [("grad norm", train, "grad_norm")],
              "L2 norm", log_y=True)
    line_plot("throughput.png", "Throughput", [("tokens/s", train, "tokens_per_s")], "tokens / s")

    loads = [(r["step"], r["expert_load"]) for r in val if r.get("expert_load")]
    if loads:
        import numpy as np

        steps = [s for s, _ in loads]
        grid = np.array([[share for layer in load for share in layer] for _, load in loads]).T  # (L·E, evals)
        num_layers, num_experts = len(loads[0][1]), len(loads[0][1][0])
        fig, ax = plt.subplots(figsize=(7, max(3, 0.25 * grid.shape[0])))
        image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_xticks(range(len(steps)), [str(s) for s in steps], rotation=45)
        ax.set_yticks(range(0, grid.shape[0], num_experts),
                      layer_labels(val[-1].get("expert_load_layers") or list(range(num_layers)),
                                   _num_decoder_layers(run_dir)))
        ax.set_xlabel("step (evaluation)")
        ax.set_title(f"Share of routed tokens per expert ({num_experts} experts per layer; uniform = {1 / num_experts:.3f})")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        fig.savefig(out / "expert_load.png", dpi=100)
        plt.close(fig)
        images.append(("Expert load over training", "expert_load.png"))

    (out / "report.md").write_text(_markdown(run_dir, train, val, images), encoding="utf-8")
    logger.info("report written to %s", out)
    return out


def _markdown(run_dir: Path, train: list[dict], val: list[dict], images: list[tuple[str, str]]) -> str:
    summary: dict[str, Any] = {}
    if (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    last = train[-1]
    best_val = min((r["loss"] for r in val), default=None)
    throughput = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
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
