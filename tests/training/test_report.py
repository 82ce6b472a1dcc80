"""`ava report`: training-only throughput, the expert-load heatmap's labels, the output check."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from Ava.cli.main import main
from Ava.training.report import expert_load_figure, layer_labels, training_throughput


def _overlapping_labels(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts (tick labels inside the limits, axis labels, titles) whose boxes overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for i, ax in enumerate(fig.axes):
        texts = [ax.xaxis.label, ax.yaxis.label, ax.title]
        for axis, (low, high) in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            for ticks in (axis.get_major_ticks(), axis.get_minor_ticks()):
                texts += [tick.label1 for tick in ticks if min(low, high) <= tick.get_loc() <= max(low, high)]
        boxes += [(f"axes {i}: {t.get_text()!r}", t.get_window_extent(renderer))
                  for t in texts if t.get_visible() and t.get_text()]
    return [(a, b) for (a, box_a), (b, box_b) in itertools.combinations(boxes, 2) if box_a.overlaps(box_b)]


def _train(step: int, tokens_per_s: float, **extra) -> dict:
    return {"step": step, "split": "train", "lm_loss": 5.0 - step / 100, "lr": 1e-3, "grad_norm": 1.0,
            "tokens_per_s": tokens_per_s, "tokens": step * 512, **extra}


def _val(step: int) -> dict:
    return {"step": step, "split": "val", "loss": 5.0 - step / 100, "ppl": 100.0,
            "expert_load": [[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]], "expert_load_layers": [0, 1]}


def _run(tmp_path: Path, records: list[dict]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "config.yaml").write_text("model:\n  num_layers: 2\n")
    return run


def test_throughput_leaves_out_windows_that_held_an_evaluation():
    """Metrics whose tokens/s counts evaluation time (no ``excluded_time_s``): the record after each
    evaluation is a dip, and is left out; every other record is kept as written."""
    train = [_train(s, 600.0 if s in (12, 22) else 1000.0) for s in range(2, 31, 2)]
    val = [_val(10), _val(20), _val(30)]
    steps, values, left_out = training_throughput(train, val)
    assert left_out == [12, 22]
    assert values == [1000.0] * len(steps) and 30 in steps and 10 in steps


def test_throughput_keeps_records_that_exclude_evaluation_time():
    """Records that carry ``excluded_time_s`` have the evaluation taken out already: all plotted."""
    train = [_train(s, 1000.0, excluded_time_s=0.5 if s == 12 else 0.0) for s in range(2, 21, 2)]
    steps, values, left_out = training_throughput(train, [_val(10), _val(20)])
    assert left_out == [] and steps == list(range(2, 21, 2)) and values == [1000.0] * 10


def test_report_throughput_and_mean_exclude_evaluation_dips(tmp_path):
    records = []
    for step in range(5, 61, 5):
        records.append(_train(step, 400.0 if step in (25, 45) else 1000.0))
        if step % 20 == 0:
            records.append(_val(step))
    run = _run(tmp_path, records)
    assert main(["report", str(run)]) == 0
    text = (run / "report" / "report.md").read_text()
    assert "| mean tokens/s | 1,000 |" in text
    assert (run / "report" / "throughput.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(("layers", "experts"), [(2, 4), (3, 7), (12, 64)])
def test_expert_load_heatmap_labels_experts_and_separates_layers(layers, experts):
    rng = np.random.default_rng(0)
    loads = [rng.dirichlet(np.ones(experts), size=layers).tolist() for _ in range(15)]
    names = layer_labels(list(range(layers)), layers - 1)  # the last one is an MTP block
    fig = expert_load_figure(list(range(100, 1501, 100)), loads, names)
    ax = fig.axes[0]
    rows = [int(t) for t in ax.get_yticks()]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    # every labelled row is named by its expert index within its layer, in each layer alike
    assert labels == [str(row % experts) for row in rows] and labels[0] == "0"
    assert labels.count("0") == layers and len(labels) % layers == 0
    if experts <= 8:
        assert labels[:experts] == [str(e) for e in range(experts)]
    assert [t.get_text() for t in ax.get_yticklabels(minor=True)] == names
    separators = sorted(line.get_ydata()[0] for line in ax.get_lines())
    assert separators == [layer * experts - 0.5 for layer in range(1, layers)]
    assert _overlapping_labels(fig) == []


def test_report_heatmap_of_a_run(tmp_path, monkeypatch):
    """The heatmap written by ``ava report`` is the labelled one (layer names from the run's config)."""
    from Ava.training import report

    figures = []
    real = report.expert_load_figure

    def spy(*args):
        figures.append(real(*args))
        return figures[-1]

    run = _run(tmp_path, [_train(10, 1000.0), _val(10), _train(20, 1000.0), _val(20)])
    monkeypatch.setattr(report, "expert_load_figure", spy)
    assert main(["report", str(run)]) == 0
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels(minor=True)] == ["layer 0", "layer 1"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1", "2", "3"] * 2


def test_report_checks_its_output_folder_first(tmp_path, capsys, monkeypatch):
    """A ``report`` path that cannot be a folder fails in one line, exit 2, before any plot."""
    from Ava.training import report

    run = _run(tmp_path, [_train(10, 1000.0), _val(10)])
    (run / "report").write_text("not a folder")
    monkeypatch.setattr(report, "line_figure", lambda *a, **k: pytest.fail("plotted before the check"))
    assert main(["report", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: report folder") and "is a file" in err and len(err.strip().splitlines()) == 1
