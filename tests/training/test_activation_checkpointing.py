"""performance.activation_checkpointing in the trainer: the same run, step for step."""

import json
from pathlib import Path

import pytest

from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from tests.conftest import tiny_config


def _train(tmp_path: Path, corpus_cache: Path, name: str, *extra: str):
    config = tiny_config(tmp_path / name, corpus_cache, "training.max_steps=3", "training.eval_every=3",
                         "training.eval_batches=1", "training.log_every=1", "evaluation.sample_max_new_tokens=4",
                         "model.dropout=0.1", *extra)
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    return trainer, trainer.train()


def _train_records(summary) -> list[dict]:
    lines = (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


@pytest.mark.slow
def test_activation_checkpointing_trains_the_same_run(tmp_path, corpus_cache):
    _, plain = _train(tmp_path, corpus_cache, "plain")
    trainer, ckpt = _train(tmp_path, corpus_cache, "ckpt", "performance.activation_checkpointing=true")
    assert all(layer.activation_checkpointing for layer in trainer.model.layers)
    for a, b in zip(_train_records(ckpt), _train_records(plain), strict=True):
        for key in ("loss", "lm_loss", "load_balance", "z_loss", "grad_norm", "max_vio"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bit-exact on CPU
    assert ckpt.final_val_loss == plain.final_val_loss
    assert ckpt.sample == plain.sample
