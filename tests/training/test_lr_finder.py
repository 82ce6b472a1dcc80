"""LR range test: sweep, divergence stop, suggestions, state restored, YAML write, CLI."""

import math

import pytest
import torch
import yaml

from Ava.cli.main import main
from Ava.training.lr_finder import lr_range_test, suggest, write_learning_rate
from tests.conftest import REPO


class _Quadratic(torch.nn.Module):
    """loss = ‖w − 1‖², ignoring the batch: diverges for SGD once lr > 1."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(4))

    def forward(self, input_ids, labels=None):
        return type("Out", (), {"loss": (self.w - 1).square().sum()})()


def _batches():
    while True:
        yield torch.zeros(1, 2, dtype=torch.long)


def test_sweep_is_exponential_restores_state_and_stops_on_divergence():
    model = _Quadratic()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.w.grad = torch.ones(4)
    opt.step()  # give the optimizer some state to restore
    w_before, buf_before = model.w.detach().clone(), opt.state[model.w]["momentum_buffer"].clone()
    batches = _batches()

    def step():
        loss = model(next(batches)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    result = lr_range_test(step, opt, [model, opt], min_lr=1e-4, max_lr=100.0, num_steps=61, smoothing=0.5)
    assert result.lrs[:3] == pytest.approx([1e-4, 1e-4 * 10 ** 0.1, 1e-4 * 10 ** 0.2])
    assert result.diverged and len(result.lrs) < 61
    ema, avg = [], 0.0  # the stopping rule: the bias-corrected EMA (β = smoothing) passed 4× its best
    for i, value in enumerate(result.raw_losses):
        avg = 0.5 * avg + 0.5 * value
        ema.append(avg / (1 - 0.5 ** (i + 1)))
    assert ema[-1] > 4 * min(ema) and all(e <= 4 * min(ema[:i + 1]) for i, e in enumerate(ema[:-1]))
    assert torch.equal(model.w.detach(), w_before)
    assert torch.equal(opt.state[model.w]["momentum_buffer"], buf_before)
    assert opt.param_groups[0]["lr"] == 0.1
    assert set(result.suggestions) == {"valley", "steepest", "min_loss_div10"}


def test_suggestions_on_a_known_curve():
    lrs = [10 ** (-6 + 6 * i / 99) for i in range(100)]
    # flat, then a tanh descent centred at lr = 1e-3, then a blow-up after 1e-1
    losses = [5 - 2 * math.tanh(2 * (math.log10(lr) + 3)) + (50 * (math.log10(lr) + 1) ** 2 if lr > 0.1 else 0)
              for lr in lrs]
    s = suggest(lrs, losses)
    assert 3e-4 < s["steepest"] < 3e-3
    i_min = min(range(100), key=losses.__getitem__)
    assert s["min_loss_div10"] == pytest.approx(lrs[i_min] / 10)
    assert 1e-5 < s["valley"] < 1e-1


def test_write_learning_rate_keeps_comments(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# top\nmodel:\n  hidden_size: 64\ntraining:\n  batch_size: 8\n"
                    "  learning_rate: 0.003   # peak\nrun: {name: x}\n")
    write_learning_rate(path, 0.0012345)
    text = path.read_text()
    assert "# top" in text and "0.00123   # peak" in text and "run: {name: x}" in text
    path.write_text("training:\n    batch_size: 8\n")
    write_learning_rate(path, 0.01)
    assert yaml.safe_load(path.read_text())["training"] == {"learning_rate": 0.01, "batch_size": 8}
    path.write_text("model: {hidden_size: 64}\n")
    write_learning_rate(path, 0.02)
    assert yaml.safe_load(path.read_text()) == {"model": {"hidden_size": 64}, "training": {"learning_rate": 0.02}}
    path.write_text("training: {batch_size: 8}\n")
    write_learning_rate(path, 0.03)
    assert yaml.safe_load(path.read_text())["training"] == {"batch_size": 8, "learning_rate": 0.03}
    path.write_text("# keep me\ntraining:\n  learning_rate: 0.003\n")
    write_learning_rate(path, 1.2e-5)  # written as 1.2e-05, which YAML 1.1 would read as text
    assert path.read_text() == "# keep me\ntraining:\n  learning_rate: 1.2e-05\n"


def test_cli_lr_find_writes_plot_and_config(tmp_path, corpus_cache, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text((REPO / "configs" / "tiny.yaml").read_text())
    plot = tmp_path / "lr.png"
    code = main(["lr-find", str(config), f"data.cache_dir={corpus_cache}", "--steps", "12",
                 "--min-lr", "1e-4", "--max-lr", "0.1", "--plot", str(plot), "--write", "--pick", "steepest"])
    out = capsys.readouterr().out
    assert code == 0 and "steepest" in out and "valley" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lr = yaml.safe_load(config.read_text())["training"]["learning_rate"]
    assert 1e-4 <= lr <= 0.1 and lr != 0.003
    assert "# A tiny MoE" in config.read_text()  # comments kept


def test_lr_finder_runs_the_configured_activation_checkpointing(tmp_path, corpus_cache, monkeypatch):
    """performance.activation_checkpointing applies to the sweep's steps (they fit in memory like
    training's), and leaves the sweep unchanged."""
    import Ava.models.decoder_layer as decoder_layer
    from Ava.training.lr_finder import run_lr_finder
    from tests.conftest import tiny_config

    calls = []
    real_checkpoint = decoder_layer.checkpoint
    monkeypatch.setattr(decoder_layer, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    sweeps = {}
    for flag in ("false", "true"):
        config = tiny_config(tmp_path / flag, corpus_cache, f"performance.activation_checkpointing={flag}")
        sweeps[flag] = run_lr_finder(config, num_steps=4, work_dir=tmp_path / flag).raw_losses
        assert bool(calls) == (flag == "true")
    assert sweeps["true"] == pytest.approx(sweeps["false"], rel=1e-6)


def _descent_then_blow_up(x: float) -> float:
    """A short sweep's typical loss against x = log10(LR): flat, a descent steepest at 1e-2, the
    minimum near 5e-2, then a blow-up."""
    return 6 - 2 * math.tanh(3 * (x + 2)) + (20 * (x + 1.3) ** 2 if x > -1.3 else 0)


def _broad_valley(x: float) -> float:
    """A loss with a broad minimum at LR 10^-2.5, rising as slowly as it fell."""
    return 4 + 0.5 * (x + 2.5) ** 2


def _sweep(curve, num_steps: int, noise: float):
    """``lr_range_test`` over ``curve(log10 lr)`` plus seeded Gaussian noise, 1e-5 to 1."""
    import random

    rng = random.Random(0)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=0.1)
    return lr_range_test(lambda: curve(math.log10(opt.param_groups[0]["lr"])) + rng.gauss(0, noise), opt,
                         min_lr=1e-5, max_lr=1.0, num_steps=num_steps)


@pytest.mark.parametrize("num_steps", [20, 24, 30])
def test_short_sweep_suggestions_agree_with_the_visible_minimum(num_steps):
    """A 20–30-step sweep: the smoothed curve's minimum is the loss's (no EMA lag, which put it
    3–6 steps late), no suggestion lies beyond it, and ``steepest`` is inside the descent (not at
    its end, where a lagging average still falls fastest)."""
    result = _sweep(_broad_valley, num_steps, noise=0.1)
    true_min = min(range(len(result.lrs)), key=lambda i: _broad_valley(math.log10(result.lrs[i])))
    smooth_min = min(range(len(result.losses)), key=result.losses.__getitem__)
    assert abs(smooth_min - true_min) <= 1

    result = _sweep(_descent_then_blow_up, num_steps, noise=0.3)
    smooth_min = min(range(len(result.losses)), key=result.losses.__getitem__)
    assert set(result.suggestions) == {"valley", "steepest", "min_loss_div10"}
    for name, lr in result.suggestions.items():
        assert lr <= result.lrs[smooth_min], name
    assert 5e-3 < result.suggestions["steepest"] < 1.5e-2  # the descent is steepest at 1e-2


def test_smoothing_window_scales_with_the_sweep():
    from Ava.training.lr_finder import smooth, smoothing_window

    assert [smoothing_window(n) for n in (5, 20, 30, 100, 1000)] == [1, 3, 5, 11, 21]
    assert smooth([1.0, 5.0, 3.0, 7.0], 3) == [1.0, 3.0, 5.0, 7.0]  # centred; the ends unaveraged
    assert smooth([4.0, 2.0], 1) == [4.0, 2.0]


def test_suggestions_never_pass_the_minimum():
    lrs = [10 ** (-5 + i / 4) for i in range(21)]
    # descends, bottoms out at index 10, rises; the rise is longer than the descent
    losses = [5 - 0.3 * i for i in range(11)] + [2 + 0.01 * i for i in range(1, 11)]
    s = suggest(lrs, losses)
    assert all(lr <= lrs[10] for lr in s.values()), s
    assert suggest(lrs[:5], [1.0, 2.0, 3.0, 4.0, 5.0])["steepest"] == lrs[0]  # only rising: the first LR


def test_lr_plot_keeps_the_raw_curve_in_view():
    """Every raw (and smoothed) loss lies inside the plot's y-limits, the smoothed curve is drawn
    too, and the suggestions are marked."""
    from Ava.training.lr_finder import plot_figure

    result = _sweep(_descent_then_blow_up, 24, noise=0.3)
    fig = plot_figure(result)
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    assert all(low <= y <= high for y in result.raw_losses + result.losses)
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels[:2] == ["loss", "smoothed"] and sum(label.startswith("valley") for label in labels) == 1
    raw_line = ax.get_lines()[0]
    assert list(raw_line.get_ydata()) == result.raw_losses


def test_cli_lr_find_checks_the_plot_path_before_the_sweep(tmp_path, unwritable_dir, monkeypatch, capsys):
    import Ava.training.lr_finder as lr_finder

    monkeypatch.setattr(lr_finder, "run_lr_finder", lambda *a, **k: pytest.fail("the sweep ran"))
    config = tmp_path / "tiny.yaml"
    config.write_text((REPO / "configs" / "tiny.yaml").read_text())
    assert main(["lr-find", str(config), "--plot", str(unwritable_dir / "lr.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --plot") and len(err.strip().splitlines()) == 1
    assert main(["lr-find", str(config), "--plot", str(tmp_path)]) == 2  # a folder, not a file
    assert "is a folder" in capsys.readouterr().err


def test_run_lr_finder_shows_a_progress_bar(tmp_path, corpus_cache, capsys):
    from Ava.training.lr_finder import run_lr_finder
    from tests.conftest import tiny_config

    config = tiny_config(tmp_path, corpus_cache)
    run_lr_finder(config, num_steps=3, work_dir=tmp_path, show_progress=True)
    err = capsys.readouterr().err
    assert "lr-find" in err and "3/3" in err
