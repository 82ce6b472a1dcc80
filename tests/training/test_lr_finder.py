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
    assert result.losses[-1] > 4 * min(result.losses)
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
