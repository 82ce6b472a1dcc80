"""Metrics, memory, early stopping, W&B, OOM hints and `ava report`."""

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from Ava.config import EnhancedTrainingConfig
from Ava.errors import AvaConfigError, AvaError
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.early_stopping import EarlyStopping
from Ava.training.memory_monitor import memory_snapshot, oom_hint
from Ava.training.metrics import StepTimer, measure_matmul_peak, truncate_metrics
from tests.conftest import tiny_config


def test_train_records_have_mfu_time_breakdown_and_memory(trained_run):
    _, summary = trained_run
    records = [json.loads(line) for line in Path(summary.run_dir, "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    first = train[0]
    assert 0 < first["mfu"] < 1
    assert {"time_data", "time_forward", "time_backward", "time_optimizer"} <= set(first)
    assert first["time_forward"] > 0 and first["time_backward"] > 0
    assert first["rss_mb"] > 10 and first["peak_rss_mb"] >= first["rss_mb"] * 0.5
    assert first["skipped"] == 0.0


def test_matmul_peak_and_timer():
    peak = measure_matmul_peak(torch.device("cpu"), size=256, seconds=0.05)
    assert 1e8 < peak < 1e14
    timer = StepTimer(torch.device("cpu"))
    timer.mark("data")
    sum(range(10000))
    timer.mark("forward")
    times = timer.read()
    assert set(times) == {"time_data", "time_forward", "time_backward", "time_optimizer", "time_other"}
    assert times["time_forward"] > 0 and timer.read()["time_forward"] == 0.0
    assert StepTimer(torch.device("cpu"), enabled=False).read() == {}


def test_memory_snapshot_and_oom_hint():
    snap = memory_snapshot(torch.device("cpu"))
    assert snap["rss_mb"] > 0 and "cuda_allocated_mb" not in snap
    hint = oom_hint(EnhancedTrainingConfig(), torch.device("cpu"))
    assert "training.batch_size (now 8)" in hint and "data.seq_len" in hint and "bf16" in hint


def test_out_of_memory_becomes_a_clear_error(tmp_path, corpus_cache, monkeypatch):
    config = tiny_config(tmp_path / "runs", corpus_cache)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(trainer, "train_step", oom)
    with pytest.raises(AvaError, match="out of memory at step 1: lower training.batch_size"):
        trainer.train()


def test_early_stopping_logic():
    from Ava.config import EarlyStoppingConfig

    stop = EarlyStopping(EarlyStoppingConfig(patience=2, min_delta=0.1))
    assert [stop.update(v) for v in (3.0, 2.5, 2.45, 2.44)] == [False, False, False, True]
    assert EarlyStopping(EarlyStoppingConfig()).update(1.0) is False


def test_early_stopping_stops_the_run(tmp_path, corpus_cache, monkeypatch):
    config = tiny_config(tmp_path / "runs", corpus_cache, "evaluation.early_stopping.patience=2",
                         "training.eval_every=5", "evaluation.sample_max_new_tokens=0")
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(trainer, "evaluate", lambda: {"loss": next(losses), "ppl": 1.0})
    summary = trainer.train()
    assert summary.stopped_early and summary.steps == 20 and summary.best_val_loss == 2.0
    assert Path(summary.checkpoint).name == "step_20"


def test_wandb_offline_logging_with_a_stand_in_module(tmp_path, corpus_cache, monkeypatch):
    calls = {"log": [], "init": None, "finish": 0}

    class Run:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"] += 1

    def init(**kwargs):
        calls["init"] = kwargs
        return Run()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    config = tiny_config(tmp_path / "runs", corpus_cache, "logging.wandb.enabled=true", "training.max_steps=10",
                         "evaluation.sample_max_new_tokens=0")
    EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
    assert calls["init"]["mode"] == "offline" and calls["init"]["project"] == "ava"
    steps = [step for step, data in calls["log"] if "train/loss" in data]
    assert steps == [10] and calls["finish"] == 1


def test_wandb_enabled_but_missing_is_a_config_error(tmp_path, corpus_cache, monkeypatch):
    """A compatibility rule: reported when the config is loaded, and again when training starts."""
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(AvaConfigError, match="logging.wandb.enabled: true but the wandb package is not installed; "
                                             "`pip install wandb`"):
        tiny_config(tmp_path / "runs", corpus_cache, "logging.wandb.enabled=true")
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace())  # installed while loading
    config = tiny_config(tmp_path / "runs", corpus_cache, "logging.wandb.enabled=true")
    monkeypatch.setitem(sys.modules, "wandb", None)  # gone when the run starts
    with pytest.raises(AvaConfigError, match="pip install wandb"):
        EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()


def test_truncate_metrics_drops_later_steps_and_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train"}\n{"step": 2, "split": "train"}\n{"step": 3, "spl')
    assert truncate_metrics(path, 1) == 2
    assert path.read_text() == '{"step": 1, "split": "train"}\n'


def test_performance_modes_set_unset_keys_only():
    fast = EnhancedTrainingConfig.model_validate({"performance": {"mode": "fast"}})
    assert fast.training.log_every == 50 and fast.logging.time_breakdown is False
    mine = EnhancedTrainingConfig.model_validate({"performance": {"mode": "fast"}, "training": {"log_every": 3}})
    assert mine.training.log_every == 3
    thorough = EnhancedTrainingConfig.model_validate({"performance": {"mode": "thorough"}})
    assert thorough.training.log_every == 1 and thorough.gradient.health.layer_grad_norms_every == 10
    assert EnhancedTrainingConfig.model_validate({"performance": {"mode": "balanced"}}) == EnhancedTrainingConfig()


def test_report_writes_plots_and_summary(trained_run):
    import matplotlib.image as mpimg

    from Ava.cli.main import main

    _, summary = trained_run
    assert main(["report", summary.run_dir]) == 0
    out = Path(summary.run_dir) / "report"
    for name in ("loss.png", "lr.png", "grad_norm.png", "throughput.png", "expert_load.png"):
        image = mpimg.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100, name
        assert np.std(image[..., :3]) > 0.01, f"{name} is blank"
    text = (out / "report.md").read_text()
    assert "| steps | 60 |" in text and "![Expert load over training](expert_load.png)" in text


def test_report_on_a_non_run_is_exit_2(tmp_path):
    from Ava.cli.main import main

    assert main(["report", str(tmp_path)]) == 2


def test_throughput_leaves_out_evaluation_and_checkpoint_time(tmp_path, corpus_cache, monkeypatch):
    """Every evaluation and checkpoint 'takes' 1000 s on a shifted clock; tokens/s stays flat."""
    import time as time_module

    real_clock, shift = time_module.perf_counter, [0.0]
    monkeypatch.setattr(time_module, "perf_counter", lambda: real_clock() + shift[0])

    def slow(method):
        def wrapped(self, *args, **kwargs):
            shift[0] += 1000.0
            return method(self, *args, **kwargs)
        return wrapped

    monkeypatch.setattr(EnhancedModularTrainer, "evaluate", slow(EnhancedModularTrainer.evaluate))
    monkeypatch.setattr(EnhancedModularTrainer, "save_checkpoint", slow(EnhancedModularTrainer.save_checkpoint))
    config = tiny_config(tmp_path, corpus_cache, "training.max_steps=40", "training.save_every=10")
    summary = EnhancedModularTrainer.from_config(config).train()
    records = [json.loads(line) for line in Path(summary.run_dir, "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["split"] == "train"]
    assert len(rates) == 4  # windows 1-10 .. 31-40; the later ones follow an evaluation or a checkpoint
    assert min(rates) > 0.1 * max(rates), rates
    excluded = [r["excluded_time_s"] for r in records if r["split"] == "train"]
    assert excluded[0] < 1.0 and all(e >= 1000.0 for e in excluded[1:])  # each window after a save or eval


def test_matmul_peak_is_one_call_when_a_call_is_already_slow():
    from torch.overrides import TorchFunctionMode

    class CountMatmuls(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") in ("__matmul__", "matmul"):
                CountMatmuls.calls += 1
            return func(*args, **(kwargs or {}))

    with CountMatmuls():  # seconds=0: the first call already took that long (an emulated dtype)
        peak = measure_matmul_peak(torch.device("cpu"), size=64, seconds=0.0)
    assert CountMatmuls.calls == 1 and peak > 0
    CountMatmuls.calls = 0
    with CountMatmuls():  # a fast call: warm-up, then timed calls until `seconds` have passed
        measure_matmul_peak(torch.device("cpu"), size=64, seconds=0.01)
    assert CountMatmuls.calls >= 4
