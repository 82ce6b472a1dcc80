"""Damaged checkpoints are detected and skipped; resume refuses incompatible config changes."""

from pathlib import Path

import pytest
import torch

from Ava.errors import AvaConfigError
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import resolve_resume
from Ava.utils.checkpoint import find_good_checkpoint, verify_checkpoint
from tests.conftest import tiny_config

SHORT = ("training.max_steps=20", "training.save_every=10", "evaluation.sample_max_new_tokens=0",
         "checkpoint.keep_last=null")


def _run(tmp_path, cache, *overrides, resume=None):
    config = tiny_config(tmp_path / "runs", cache, *SHORT, *overrides)
    torch.manual_seed(0)
    return EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train(resume=resume), config


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_latest_falls_back_to_previous(tmp_path, corpus_cache, damage):
    summary, config = _run(tmp_path, corpus_cache)
    ckpts = tmp_path / "runs" / summary.run_dir.rsplit("/", 1)[-1] / "checkpoints"
    weights = ckpts / "step_20" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    else:
        data[-10] ^= 0xFF
        weights.write_bytes(data)
    assert verify_checkpoint(ckpts / "step_20")
    assert find_good_checkpoint(ckpts) == ckpts / "step_10"
    run_dir, checkpoint = resolve_resume(config, "auto")
    assert checkpoint == ckpts / "step_10"
    resumed, _ = _run(tmp_path, corpus_cache, resume="auto")
    assert resumed.resumed_from.endswith("step_10") and resumed.steps == 20


def test_resume_allows_run_length_changes_and_refuses_model_changes(tmp_path, corpus_cache):
    summary, _ = _run(tmp_path, corpus_cache)
    longer, _ = _run(tmp_path, corpus_cache, "training.max_steps=30", resume=summary.run_dir)
    assert longer.steps == 30 and longer.run_dir == summary.run_dir
    with pytest.raises(AvaConfigError, match=r"training.learning_rate.*model.moe.top_k|model.moe.top_k.*training.learning_rate"):
        _run(tmp_path, corpus_cache, "training.max_steps=30", "training.learning_rate=0.01",
             "model.moe.top_k=1", resume=summary.run_dir)


def test_resume_a_run_whose_saved_config_predates_new_keys(tmp_path, corpus_cache):
    """Keys added to the schema after a run was written (here model.head_dim, qk_norm_scope,
    loss.fused_head) take their defaults; they are not reported as changes."""
    import yaml

    from Ava.training.run_manager import check_resume_config

    summary, config = _run(tmp_path, corpus_cache)
    run_dir = tmp_path / "runs" / summary.run_dir.rsplit("/", 1)[-1]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    for key in ("head_dim", "qk_norm_scope"):
        del saved["model"][key]
    del saved["model"]["loss"]["fused_head"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_resume_config(run_dir, config) == []
    changed = config.model_copy(update={"model": config.model.model_copy(update={"head_dim": 32})})
    with pytest.raises(AvaConfigError, match="model.head_dim"):
        check_resume_config(run_dir, changed)


def test_resume_auto_without_runs_starts_fresh(tmp_path, corpus_cache):
    summary, _ = _run(tmp_path, corpus_cache, resume="auto")
    assert summary.resumed_from is None and summary.steps == 20


def test_keep_last_and_best(tmp_path, corpus_cache):
    summary, _ = _run(tmp_path, corpus_cache, "training.max_steps=40", "checkpoint.keep_last=1",
                      "checkpoint.keep_best=1", "training.eval_every=10")
    ckpts = tmp_path / "runs" / summary.run_dir.rsplit("/", 1)[-1] / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    best = (ckpts / "best").resolve().name
    assert "step_40" in names and best in names and "latest" in names and "best" in names
    assert len([n for n in names if n.startswith("step_")]) == len({"step_40", best})


def test_checkpoint_every_minutes_saves_by_training_time(tmp_path, corpus_cache, monkeypatch):
    """Each step 'takes' 31 s on a shifted clock: with every_minutes=1 a checkpoint follows every
    second step, with no training.save_every; the start-up log says how much a crash can lose."""
    import time as time_module

    real_clock, shift = time_module.perf_counter, [0.0]
    monkeypatch.setattr(time_module, "perf_counter", lambda: real_clock() + shift[0])
    original = EnhancedModularTrainer.train_step

    def slow_step(self, *args, **kwargs):
        shift[0] += 31.0
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EnhancedModularTrainer, "train_step", slow_step)
    config = tiny_config(tmp_path / "runs", corpus_cache, "training.max_steps=7", "checkpoint.every_minutes=1",
                         "checkpoint.keep_last=null", "evaluation.sample_max_new_tokens=0")
    summary = EnhancedModularTrainer.from_config(config).train()
    checkpoints = sorted(p.name for p in (tmp_path / "runs").glob("*/checkpoints/step_*"))
    assert checkpoints == ["step_2", "step_4", "step_6", "step_7"]
    assert summary.steps == 7
    log = (Path(summary.run_dir) / "logs" / "train.log").read_text()
    assert "checkpoints: every 1 minute (and at the end): a crash loses at most that much training" in log


def test_without_periodic_checkpoints_the_log_warns_that_a_crash_loses_the_run(tmp_path, corpus_cache):
    config = tiny_config(tmp_path / "runs", corpus_cache, "training.max_steps=2", "checkpoint.every_minutes=null",
                         "evaluation.sample_max_new_tokens=0")
    summary = EnhancedModularTrainer.from_config(config).train()
    assert "a crash loses the whole run" in (Path(summary.run_dir) / "logs" / "train.log").read_text()
