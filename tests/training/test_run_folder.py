"""Run folders: one training at a time (an advisory lock), and no junk folder from a failed start."""

import os
import subprocess
import sys
import textwrap

import pytest

from Ava.errors import AvaCheckpointError, AvaDataError, AvaOutputError
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import RunLock
from tests.conftest import tiny_config


def test_a_held_lock_refuses_a_second_holder_naming_its_pid(tmp_path):
    first = RunLock.acquire(tmp_path)
    with pytest.raises(AvaCheckpointError, match=rf"in use by another training \(pid {os.getpid()} on "):
        RunLock.acquire(tmp_path)
    first.release()
    RunLock.acquire(tmp_path).release()  # free again once released


def test_a_crashed_holder_leaves_no_stale_lock(tmp_path):
    """The OS drops the lock of a killed process: the next training takes it."""
    script = textwrap.dedent(f"""
        import os, pathlib, sys
        from Ava.training.run_manager import RunLock
        RunLock.acquire(pathlib.Path({str(tmp_path)!r}))
        print("locked", flush=True)
        sys.stdin.readline()
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(AvaCheckpointError, match=rf"pid {holder.pid} "):
            RunLock.acquire(tmp_path)
    finally:
        holder.kill()
        holder.wait()
    RunLock.acquire(tmp_path).release()


def test_resume_into_a_run_that_is_training_is_refused(tmp_path, corpus_cache):
    config = tiny_config(tmp_path / "runs", corpus_cache, "training.max_steps=4", "evaluation.sample_max_new_tokens=0")
    summary = EnhancedModularTrainer.from_config(config).train()
    run = summary.run_dir
    before = open(f"{run}/metrics.jsonl").read()
    more = tiny_config(tmp_path / "runs", corpus_cache, "training.max_steps=8", "evaluation.sample_max_new_tokens=0")
    holder = RunLock.acquire(__import__("pathlib").Path(run))  # "another training" holds the run
    try:
        with pytest.raises(AvaCheckpointError, match=r"run folder .* is in use by another training"):
            EnhancedModularTrainer.from_config(more).train(resume="auto")
    finally:
        holder.release()
    assert open(f"{run}/metrics.jsonl").read() == before  # nothing written by the refused run
    assert EnhancedModularTrainer.from_config(more).train(resume="auto").steps == 8  # the lock was released


def test_a_failed_start_leaves_no_run_folder(tmp_path, corpus_cache):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{not json\n')  # found while reading the data, after the checks up front
    config = tiny_config(tmp_path / "runs", corpus_cache, f"data.sources.0.path={bad}")
    with pytest.raises(AvaDataError, match="bad.jsonl"):
        EnhancedModularTrainer.from_config(config).train()
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_failure_in_the_first_step_leaves_no_run_folder_but_a_later_one_keeps_it(tmp_path, corpus_cache, monkeypatch):
    original = EnhancedModularTrainer.train_step

    def fail_at(step):
        def train_step(self, *args, **kwargs):
            if self.step == step:
                raise RuntimeError("boom")
            return original(self, *args, **kwargs)
        return train_step

    monkeypatch.setattr(EnhancedModularTrainer, "train_step", fail_at(0))
    config = tiny_config(tmp_path / "first", corpus_cache)
    with pytest.raises(RuntimeError, match="boom"):
        EnhancedModularTrainer.from_config(config).train()
    assert list((tmp_path / "first").iterdir()) == []

    monkeypatch.setattr(EnhancedModularTrainer, "train_step", fail_at(3))
    config = tiny_config(tmp_path / "later", corpus_cache)
    with pytest.raises(RuntimeError, match="boom"):
        EnhancedModularTrainer.from_config(config).train()
    (run,) = (tmp_path / "later").iterdir()  # three steps were trained: their logs and metrics stay
    assert (run / "logs" / "train.log").is_file()


def test_an_unwritable_output_dir_fails_before_anything_is_done(unwritable_dir, corpus_cache):
    config = tiny_config(unwritable_dir / "runs", corpus_cache)
    with pytest.raises(AvaOutputError, match=rf"run.output_dir {unwritable_dir}/runs: cannot write"):
        EnhancedModularTrainer.from_config(config).train()


def test_a_model_too_big_for_memory_is_refused_before_it_is_built(tmp_path, corpus_cache):
    from Ava.errors import AvaConfigError

    config = tiny_config(tmp_path / "runs", corpus_cache, "model.hidden_size=200000")
    with pytest.raises(AvaConfigError, match=r"this run needs about .* \(biggest term: .*\) but the machine has"):
        EnhancedModularTrainer.from_config(config)
    assert not (tmp_path / "runs").exists()
