"""The stateful registry: every part with training state is registered once and survives a
checkpoint round trip; saving and restoring walk the same registry."""

import copy

import pytest
import torch

from Ava.errors import AvaCheckpointError
from Ava.training import EnhancedModularTrainer
from Ava.training.state import StateRegistry, TrainProgress
from tests.conftest import tiny_config

# Every optional part switched on: plateau LR, gradient surgery, a progressive batch ramp,
# coefficient schedules, the MoE alarm, early stopping.
EVERYTHING = [
    "training.max_steps=6", "training.eval_every=2", "training.save_every=3", "evaluation.sample_max_new_tokens=0",
    "scheduler.plateau.enabled=true", "gradient.surgery.method=pcgrad",
    "progressive.batch_size_ramp.start=4", "progressive.batch_size_ramp.steps=2",
    "model.moe.aux_free_bias=true", "evaluation.early_stopping.patience=5",
]
PARTS = {"model", "progress", "rng", "data_cursor", "health", "early_stopping", "moe_alarm", "progressive",
         "coef_schedules", "surgery", "optimizer", "scheduler", "plateau"}


class _Capturing(EnhancedModularTrainer):
    """Keeps a deep copy of the whole registry at every save."""

    def save_checkpoint(self, val_loss=None):
        path = super().save_checkpoint(val_loss)
        self.captured = getattr(self, "captured", {})
        self.captured[path] = copy.deepcopy(self.states.state_dict())
        return path


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_every_stateful_part_survives_a_save_restore_round_trip(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, *EVERYTHING)
    trainer = _Capturing.from_config(config)
    summary = trainer.train()
    assert set(trainer.states.keys()) == PARTS
    saved = trainer.captured[trainer.checkpoints.last_path]

    fresh = EnhancedModularTrainer.from_config(config)
    fresh.prepare(trainer.data)
    before = copy.deepcopy(fresh.states.state_dict())
    assert str(trainer.checkpoints.last_path) == summary.checkpoint
    fresh._restore(trainer.checkpoints.last_path)
    after = fresh.states.state_dict()
    for key in PARTS:
        assert _equal(after[key], saved[key]), f"{key} did not survive the round trip"
    # and the round trip did something: these parts differ between a fresh trainer and a trained one
    for key in ("model", "progress", "rng", "data_cursor", "health", "optimizer", "scheduler", "plateau",
                "surgery", "coef_schedules", "progressive"):
        assert not _equal(before[key], saved[key]), f"{key}: a fresh trainer already had the trained state"


def test_the_registry_refuses_duplicates_and_names_missing_parts():
    registry = StateRegistry()
    registry.register("progress", TrainProgress(step=3))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("progress", TrainProgress())
    with pytest.raises(TypeError, match="state_dict"):
        registry.register("thing", object())
    registry.register("extra", TrainProgress(), optional=True)
    with pytest.raises(AvaCheckpointError, match="no state for progress"):
        registry.load_state_dict({"extra": TrainProgress(tokens=5).state_dict()})
    registry.load_state_dict({"progress": TrainProgress(step=7).state_dict()})  # optional part missing: fine
    assert registry["progress"].step == 7 and registry["extra"].tokens == 0
