"""``ava generate --memory-context``: the run's replay memory reaches the model at every decoding
step; a run without a memory or without cross-attention is a one-line error."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from Ava.cli.main import main
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def context_run(tmp_path_factory, corpus_cache) -> Path:
    """configs/tiny.yaml with the memory as a 2-item cross-attention context (3 steps)."""
    config = tiny_config(tmp_path_factory.mktemp("runs"), corpus_cache, "training.max_steps=3",
                         "training.eval_every=100", "evaluation.sample_max_new_tokens=0", "memory.enabled=true",
                         "memory.capacity=12", "memory.context_items=2", "model.cross_attention.every=1")
    seed_everything(config.run.seed)
    return Path(EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train().run_dir)


def _one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ")
    return lines[0]


def _contexts(monkeypatch) -> list:
    """The ``context`` of every forward of every EnhancedMoEModel from now on."""
    seen: list = []
    forward = EnhancedMoEModel.forward

    def recording(self, *args, **kwargs):
        seen.append(kwargs.get("context"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(EnhancedMoEModel, "forward", recording)
    return seen


GREEDY = ["--temperature", "0", "--max-new-tokens", "4", "--ignore-eos"]


def test_memory_context_reaches_every_decoding_step(context_run, monkeypatch, capsys, tmp_path):
    seen = _contexts(monkeypatch)
    assert main(["generate", str(context_run), "--prompt", "The king", *GREEDY, "--memory-context"]) == 0
    assert len(seen) == 4 and all(c is not None and c.shape == (1, 2, 64) for c in seen)
    assert "memory context: the 2 nearest items of 12 stored, per prompt" in capsys.readouterr().err
    seen.clear()
    assert main(["generate", str(context_run), "--prompt", "The king", *GREEDY, "--memory-context", "5"]) == 0
    assert all(c.shape == (1, 5, 64) for c in seen)
    seen.clear()
    assert main(["generate", str(context_run), "--prompt", "The king", *GREEDY]) == 0
    assert seen and all(c is None for c in seen)  # without the flag: no context
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The king\nA\nROMEO:\n")
    out = tmp_path / "out.jsonl"
    seen.clear()
    assert main(["generate", str(context_run), "--file", str(prompts), "--out", str(out), "--batch-size", "2",
                 *GREEDY, "--memory-context"]) == 0
    assert [c.shape[0] for c in seen if c is not None] == [2] * 4 + [1] * 4  # one context row per prompt
    assert len([json.loads(line) for line in out.read_text().splitlines()]) == 3


def test_a_run_without_cross_attention_or_memory_is_a_one_line_error(context_run, trained_run, capsys, tmp_path):
    _, summary = trained_run  # configs/tiny.yaml: no cross-attention block, no memory
    assert main(["generate", str(summary.run_dir), "--prompt", "A", "--memory-context"]) == 2
    assert "has no cross-attention block (model.cross_attention.every: 0)" in _one_error_line(capsys)
    bare = tmp_path / "bare"
    shutil.copytree(context_run / "checkpoints" / "step_3", bare)
    state = torch.load(bare / "state.pt", weights_only=True)
    del state["memory"]
    torch.save(state, bare / "state.pt")
    assert main(["generate", str(bare), "--prompt", "A", "--memory-context"]) == 2
    assert "holds no replay memory (trained with memory.enabled: false)" in _one_error_line(capsys)
    assert main(["generate", str(context_run), "--prompt", "A", "--memory-context", "--num-beams", "2"]) == 2
    assert "drop --num-beams or --memory-context" in _one_error_line(capsys)
