"""memory.context_items in the trainer: the cross-attention gate learns only with the memory as
context, and a resumed run with the context is bit-exact."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config
from tests.helpers import rewound_copy

CONTEXT = ["evaluation.sample_max_new_tokens=0", "training.log_every=1", "memory.enabled=true",
           "memory.capacity=12", "memory.replay_ratio=0.25", "model.cross_attention.every=1"]


def _trainer(out: Path, cache: Path, *overrides: str) -> EnhancedModularTrainer:
    config = tiny_config(out, cache, *CONTEXT, *overrides)
    seed_everything(config.run.seed)
    return EnhancedModularTrainer(EnhancedMoEModel(config.model), config)


def _records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_the_gate_learns_only_with_the_memory_as_context(tmp_path, corpus_cache):
    gates = {}
    for k in (0, 2):
        trainer = _trainer(tmp_path / str(k), corpus_cache, f"memory.context_items={k}", "training.max_steps=3",
                           "training.eval_every=100")
        trainer.train()
        gates[k] = torch.stack([layer.cross_attn.gate.detach() for layer in trainer.model.layers])
        if k:
            stored = trainer.memory.store
            assert stored.keys_NE.shape == (12, 64) and torch.isfinite(stored.keys_NE).all()
    assert torch.equal(gates[0], torch.zeros(2))  # no context: the blocks never ran
    assert (gates[2].abs() > 0).all()  # the memory's items reached every block, whose gate got a gradient


def test_a_resumed_run_with_memory_context_is_bit_exact(tmp_path, corpus_cache):
    overrides = ["memory.context_items=3", "training.max_steps=6", "training.save_every=3", "training.eval_every=3",
                 "training.eval_batches=1", "checkpoint.keep_last=null"]
    run_a = Path(_trainer(tmp_path / "a", corpus_cache, *overrides).train().run_dir)
    run_b = rewound_copy(run_a, tmp_path / "b", ["step_6"], last_step=3)
    resumed = _trainer(tmp_path / "b", corpus_cache, *overrides).train(resume=run_b)
    assert resumed.resumed_from.endswith("step_3") and resumed.steps == 6
    for split, keys in (("train", ("loss", "grad_norm", "memory/size")), ("val", ("loss",))):
        want, got = _records(run_a, split), _records(run_b, split)
        assert len(want) == len(got) > 0
        for key in keys:
            assert [r[key] for r in got] == [r[key] for r in want], (split, key)
    a = load_file(str(run_a / "checkpoints" / "step_6" / "model.safetensors"))
    b = load_file(str(run_b / "checkpoints" / "step_6" / "model.safetensors"))
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert a["layers.0.cross_attn.gate"].item() != 0.0
    store_a = load_training_state(run_a / "checkpoints" / "step_6")["memory"]["store"]
    store_b = load_training_state(run_b / "checkpoints" / "step_6")["memory"]["store"]
    assert store_a["keys"].shape == (12, 64) and torch.equal(store_a["keys"], store_b["keys"])
