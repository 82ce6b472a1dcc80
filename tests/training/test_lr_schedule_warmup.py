"""A warmup at least as long as the run is scaled to a share of it, said once in the log."""

import logging

import pytest
import torch

from Ava.config import SchedulerConfig, check_compatibility, load_config
from Ava.data import prepare_data
from Ava.training import EnhancedModularTrainer
from Ava.training.lr_manager import build_schedule, build_scheduler, effective_warmup
from tests.conftest import REPO, tiny_config

PEAK, END = 1e-3, 1e-4


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "polynomial", "inverse_sqrt"])
def test_a_30_step_run_with_50_warmup_steps_reaches_the_peak_and_decays_to_lr_end(name):
    cfg = SchedulerConfig(name=name, warmup_steps=50, lr_end=END)
    schedule = build_schedule(cfg, PEAK, 30)
    lrs = [schedule(step) for step in range(30)]
    assert schedule.warmup_steps == 3
    assert lrs[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert max(lrs) == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(END / PEAK)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


def test_the_scaled_warmup_is_stated_exactly():
    cfg = SchedulerConfig(warmup_steps=50)
    assert effective_warmup(cfg, 30) == (
        3, "scheduler.warmup_steps=50 ≥ 30 total optimizer steps: warmup scaled to 3 steps (10% of the run, at least 1)")
    assert effective_warmup(cfg, 30)[0] == build_schedule(cfg, PEAK, 30).warmup_steps
    assert effective_warmup(cfg, 5)[0] == 1  # at least one step
    assert "to 1 step (" in effective_warmup(cfg, 5)[1]
    assert effective_warmup(cfg, 50)[0] == 5  # as long as the run counts as too long
    assert effective_warmup(cfg, 51) == (50, None)  # shorter than the run: as configured
    assert effective_warmup(SchedulerConfig(warmup_steps=0), 10) == (0, None)


def test_build_scheduler_logs_the_scaling_once_at_info(caplog):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=PEAK)
    with caplog.at_level(logging.INFO, logger="Ava.training.lr_manager"):
        build_scheduler(optimizer, SchedulerConfig(warmup_steps=50), PEAK, 30)
        build_scheduler(optimizer, SchedulerConfig(warmup_steps=10), PEAK, 30)
    records = [r for r in caplog.records if "warmup" in r.getMessage()]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage().startswith("scheduler.warmup_steps=50 ≥ 30 total optimizer steps: warmup scaled to 3")


def test_the_quick_start_config_no_longer_warns_about_the_warmup():
    config = load_config(REPO / "config.yaml")  # what `ava config check config.yaml` loads and checks
    assert config.scheduler.warmup_steps >= config.training.max_steps  # the case this guards
    keys = [issue.key for issue in check_compatibility(config, environment=True)]
    assert "scheduler.warmup_steps" not in keys


def test_warmup_counts_optimizer_steps_under_grad_accumulation(tmp_path, corpus_cache, caplog):
    """max_steps=10 optimizer steps of 2 micro-batches each and warmup 50: the trainer's schedule
    warms up for 1 optimizer step, then decays to lr_end on the 10th, and says so once."""
    config = tiny_config(tmp_path, corpus_cache, "training.max_steps=10", "training.grad_accum_steps=2",
                         "scheduler.warmup_steps=50", "scheduler.name=linear", "scheduler.lr_end=0.0003")
    trainer = EnhancedModularTrainer.from_config(config)
    with caplog.at_level(logging.INFO, logger="Ava.training.lr_manager"):
        assert trainer.prepare(prepare_data(config.data, config.run.seed)) == 10
    schedule = trainer.scheduler.lr_lambdas[0]
    assert (schedule.warmup_steps, schedule.total_steps) == (1, 10)
    lrs = [config.training.learning_rate * schedule(step) for step in range(10)]
    assert lrs[0] == pytest.approx(config.training.learning_rate) and lrs[-1] == pytest.approx(3e-4)
    assert [r.getMessage() for r in caplog.records if "warmup" in r.getMessage()] == [
        "scheduler.warmup_steps=50 ≥ 10 total optimizer steps: warmup scaled to 1 step (10% of the run, at least 1)"]
