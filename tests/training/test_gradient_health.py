"""Gradient health: NaN and spike steps are skipped, repeated bad steps roll back, runs finish."""

import math

import pytest
import torch

from Ava.config import HealthConfig
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.gradient_health import GradientHealthMonitor, layer_grad_norms
from tests.conftest import tiny_config


def test_monitor_flags_nonfinite_and_spikes_after_warmup():
    monitor = GradientHealthMonitor(HealthConfig(spike_zscore=4.0, spike_warmup=10, spike_window=20,
                                                 rollback_after=None))
    for step in range(1, 31):
        assert monitor.check(step, 3.0 + 0.01 * (step % 3), 1.0).ok
    assert not monitor.check(31, float("nan"), 1.0).ok
    assert not monitor.check(32, 3.0, float("inf")).ok
    spike = monitor.check(33, 5.0, 1.0)
    assert not spike.ok and "spike" in spike.reason
    assert monitor.check(34, 3.01, 1.0).ok  # normal again; bad steps did not move the statistics
    assert [s for s, _ in monitor.skipped] == [31, 32, 33]


def test_monitor_never_flags_spikes_before_warmup():
    monitor = GradientHealthMonitor(HealthConfig(spike_warmup=50))
    assert all(monitor.check(i, 10.0 / i, 1.0).ok for i in range(1, 40))


def test_monitor_state_round_trip():
    a = GradientHealthMonitor(HealthConfig())
    for step in range(1, 25):
        a.check(step, 2.0 + step * 0.01, 1.0)
    b = GradientHealthMonitor(HealthConfig())
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert a.check(25, 9.0, 1.0) == b.check(25, 9.0, 1.0)


def _trainer_with_injection(tmp_path, cache, bad_steps, kind, *overrides):
    config = tiny_config(tmp_path / "runs", cache, "evaluation.sample_max_new_tokens=0", *overrides)
    torch.manual_seed(0)
    model = EnhancedMoEModel(config.model)
    trainer = EnhancedModularTrainer(model, config)
    forward = model.forward

    def injected(*args, **kwargs):
        out = forward(*args, **kwargs)
        if model.training and trainer.step + 1 in bad_steps:
            out.loss = out.loss * (float("nan") if kind == "nan" else 50.0)
        return out

    model.forward = injected
    return trainer


def test_nan_steps_are_skipped_and_the_run_finishes(tmp_path, corpus_cache):
    trainer = _trainer_with_injection(tmp_path, corpus_cache, {5, 17}, "nan")
    summary = trainer.train()
    assert [s for s, _ in summary.skipped_steps] == [5, 17]
    assert all("non-finite" in reason for _, reason in summary.skipped_steps)
    assert summary.steps == 60 and math.isfinite(summary.final_val_loss)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_loss_spike_is_skipped(tmp_path, corpus_cache):
    trainer = _trainer_with_injection(tmp_path, corpus_cache, {40}, "spike")
    summary = trainer.train()
    assert [s for s, _ in summary.skipped_steps] == [40]
    assert "spike" in summary.skipped_steps[0][1]


def test_repeated_bad_steps_roll_back_to_last_checkpoint(tmp_path, corpus_cache):
    trainer = _trainer_with_injection(tmp_path, corpus_cache, {22, 23, 24}, "nan",
                                      "training.save_every=10", "gradient.health.rollback_after=3",
                                      "checkpoint.keep_last=null")
    restored = {}
    real_rollback = trainer._rollback

    def spy():
        real_rollback()
        restored.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

    trainer._rollback = spy
    summary = trainer.train()
    assert summary.rollbacks == [24] and summary.steps == 60
    from safetensors.torch import load_file

    saved = load_file(f"{summary.run_dir}/checkpoints/step_20/model.safetensors")
    assert all(torch.equal(restored[k], v) for k, v in saved.items())
    assert "rolled back" in (tmp_path / "runs").joinpath(summary.run_dir.rsplit("/", 1)[-1], "logs",
                                                         "train.log").read_text()


def test_layer_grad_norms_cover_every_block():
    from Ava.config import ModelConfig

    model = EnhancedMoEModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_experts=4))
    ids = torch.randint(0, 64, (2, 8))
    model(ids, labels=ids).loss.backward()
    norms = layer_grad_norms(model)
    assert {"grad_norm/layers.0", "grad_norm/layers.1", "grad_norm/embed_tokens", "grad_norm/lm_head"} <= set(norms)
    total = math.sqrt(sum(v * v for v in norms.values()))
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert total == pytest.approx(float(expected), rel=1e-5)
