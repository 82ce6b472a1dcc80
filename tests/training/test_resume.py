"""Kill a training process anywhere, resume with --resume auto, get the same weights bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]

# Overrides shared by every run: 40 steps, a checkpoint every 10, dataloader workers, no sample.
COMMON = [
    "training.max_steps=40", "training.save_every=10", "training.eval_every=10", "data.num_workers=2",
    "evaluation.sample_max_new_tokens=0", "checkpoint.keep_last=null",
]

# Runs the CLI in-process after installing a hook that SIGKILLs the process at a chosen point.
KILLER = r"""
import os, signal, sys
import Ava.utils.checkpoint as ckpt
from Ava.training.enhanced_trainer import EnhancedModularTrainer
from Ava.cli.main import main

point, step = sys.argv[1], int(sys.argv[2])

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point == "mid-write":          # weights on disk, state file not yet: a half-written checkpoint
    real_save = ckpt.torch.save
    def save(obj, path, *a, **k):
        if obj.get("step") == step:
            die()
        return real_save(obj, path, *a, **k)
    ckpt.torch.save = save
elif point == "after-write":      # the checkpoint is complete, nothing after it ran
    real_write = ckpt.write_checkpoint
    def write(directory, snap):
        out = real_write(directory, snap)
        if snap.step == step:
            die()
        return out
    ckpt.write_checkpoint = write
elif point in ("SIGINT", "SIGTERM"):  # a polite stop: the run saves the finished step and exits
    real_step = EnhancedModularTrainer.train_step
    def train_step(self, *a, **k):
        if self.step + 1 == step:  # the signal arrives in the middle of this step
            os.kill(os.getpid(), getattr(signal, point))
        return real_step(self, *a, **k)
    EnhancedModularTrainer.train_step = train_step
elif point == "mid-step":         # between checkpoints, after an optimizer step
    real_step = EnhancedModularTrainer.train_step
    def train_step(self, *a, **k):
        out = real_step(self, *a, **k)
        if self.step == step:
            die()
        return out
    EnhancedModularTrainer.train_step = train_step
sys.exit(main(sys.argv[3:]))
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(REPO / "src")}


def _train(out: Path, cache: Path, *extra: str) -> subprocess.CompletedProcess:
    args = ["train", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={out}", f"data.cache_dir={cache}",
            *COMMON, *extra]
    return subprocess.run([sys.executable, "-m", "Ava", *args], env=_env(), capture_output=True, text=True,
                          timeout=300)


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    (run,) = list(out.iterdir())
    return load_file(str(run / "checkpoints" / "step_40" / "model.safetensors"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus_cache):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _train(out, corpus_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    return _final_weights(out)


@pytest.mark.slow
@pytest.mark.parametrize("point, step", [("mid-write", 20), ("after-write", 30), ("mid-step", 25)])
def test_sigkill_then_resume_is_bit_exact(tmp_path, corpus_cache, reference, point, step):
    args = ["train", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path}",
            f"data.cache_dir={corpus_cache}", *COMMON]
    killed = subprocess.run([sys.executable, "-c", KILLER, point, str(step), *args], env=_env(),
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-3000:]
    (run,) = list(tmp_path.iterdir())
    assert not (run / "checkpoints" / "step_40").exists()
    if point == "mid-write":
        assert not (run / "checkpoints" / f"step_{step}").exists()  # never a half-written one
        assert list((run / "checkpoints").glob(".tmp-*")), "the kill should have left a temp folder"

    resumed = _train(tmp_path, corpus_cache, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in (run / "logs" / "train.log").read_text()
    assert not list((run / "checkpoints").glob(".tmp-*"))
    final = _final_weights(tmp_path)
    assert final.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(final[name], tensor), f"{name} differs after resuming from a kill at {point}"
    # each step is recorded once in metrics.jsonl even though some were run twice
    import json
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["split"] == "train"]
    assert steps == sorted(set(steps))


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_saves_the_finished_step_and_resume_is_exact(tmp_path, corpus_cache, reference, sig):
    args = ["train", str(REPO / "configs" / "tiny.yaml"), f"run.output_dir={tmp_path}",
            f"data.cache_dir={corpus_cache}", *COMMON]
    stopped = subprocess.run([sys.executable, "-c", KILLER, sig, "15", *args], env=_env(),
                             capture_output=True, text=True, timeout=300)
    assert stopped.returncode == {"SIGINT": 130, "SIGTERM": 143}[sig], stopped.stderr[-3000:]
    assert stopped.stderr.strip().endswith({"SIGINT": "interrupted", "SIGTERM": "terminated (SIGTERM)"}[sig])
    (run,) = list(tmp_path.iterdir())
    assert (run / "checkpoints" / "step_15" / "model.safetensors").is_file()
    log = (run / "logs" / "train.log").read_text()
    assert "continue with --resume auto" in log
    assert f"{sig}: finishing step 15, then saving a checkpoint and stopping" in log
    assert ("press Ctrl-C again" in log) is (sig == "SIGINT")  # SIGTERM has its own wording
    resumed = _train(tmp_path, corpus_cache, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = _final_weights(tmp_path)
    assert all(torch.equal(final[name], tensor) for name, tensor in reference.items())
