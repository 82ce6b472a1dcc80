"""Resuming a finished run changes nothing; a resumed run's summary adds up every segment."""

import json

import pytest

from Ava.training import EnhancedModularTrainer
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config

QUIET = ["training.eval_every=2", "evaluation.sample_max_new_tokens=0"]


def _files(run_dir):
    """Every file of the run but its logs and its lock (which records who holds the run now)."""
    return {p.relative_to(run_dir): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in run_dir.rglob("*") if p.is_file() and p.parent.name != "logs" and p.name != ".lock"}


def test_resuming_a_finished_run_changes_nothing_and_says_how_to_continue(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, "training.max_steps=3", *QUIET)
    first = EnhancedModularTrainer.from_config(config).train()
    run_dir = tmp_path / first.run_dir.split("/")[-1]
    before, summary_text = _files(run_dir), (run_dir / "summary.json").read_text()
    again = EnhancedModularTrainer.from_config(config).train(resume="auto")
    assert _files(run_dir) == before and (run_dir / "summary.json").read_text() == summary_text
    assert again.to_dict() == json.loads(summary_text)
    log = (run_dir / "logs" / "train.log").read_text()
    assert "already finished: step 3 of 3" in log and "raise training.max_steps" in log


def test_a_resumed_run_reports_the_whole_run(tmp_path, corpus_cache):
    first = EnhancedModularTrainer.from_config(tiny_config(tmp_path, corpus_cache, "training.max_steps=3", *QUIET))
    part = first.train()
    longer = tiny_config(tmp_path, corpus_cache, "training.max_steps=5", *QUIET)
    whole = EnhancedModularTrainer.from_config(longer).train(resume="auto")
    assert whole.steps == 5 and whole.tokens == part.tokens * 5 // 3
    assert whole.wall_time_s > part.wall_time_s
    assert whole.tokens_per_second == pytest.approx(whole.tokens / whole.wall_time_s)
    saved = load_training_state(whole.checkpoint)["progress"]
    assert part.wall_time_s <= saved["wall_time_s"] <= whole.wall_time_s
    assert json.loads((tmp_path / whole.run_dir.split("/")[-1] / "summary.json").read_text())["steps"] == 5
