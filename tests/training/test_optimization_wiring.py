"""The optional optimisation features run end to end in the trainer and land in the checkpoint."""

import math

import pytest
import torch

from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config

SHORT = ["training.max_steps=8", "training.eval_every=2", "evaluation.sample_max_new_tokens=0"]


def _train(tmp_path, corpus_cache, *overrides):
    config = tiny_config(tmp_path, corpus_cache, *SHORT, *overrides)
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    summary = trainer.train()
    return trainer, summary, load_training_state(summary.checkpoint)


def test_sophia_refreshes_its_hessian_in_the_trainer(tmp_path, corpus_cache):
    trainer, summary, state = _train(tmp_path, corpus_cache, "optimizer.name=sophia",
                                     "optimizer.sophia_hessian_every=4", "training.learning_rate=3e-4")
    assert math.isfinite(summary.final_val_loss)
    hessians = [s["hessian"] for s in state["optimizer"]["state"].values()]
    assert hessians and all(h.abs().sum() > 0 for h in hessians[:3])


def test_muon_wsd_and_plateau_are_checkpointed(tmp_path, corpus_cache):
    trainer, summary, state = _train(
        tmp_path, corpus_cache, "optimizer.name=muon", "scheduler.name=wsd", "scheduler.warmup_steps=2",
        "scheduler.plateau.enabled=true", "scheduler.plateau.patience=0", "scheduler.plateau.threshold=0.5",
        "scheduler.plateau.cooldown=0")
    assert math.isfinite(summary.final_val_loss)
    # threshold 0.5: no evaluation counts as progress after the first, so the LR is halved each time
    assert state["plateau"]["reductions"] == 3 and state["plateau"]["scale"] == pytest.approx(0.125)
    assert state["scheduler"]["base_lrs"][0] == pytest.approx(3e-3 * 0.125)
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())


@pytest.mark.parametrize("method", ["pcgrad"])
def test_gradient_surgery_trains(tmp_path, corpus_cache, method):
    trainer, summary, state = _train(tmp_path, corpus_cache, f"gradient.surgery.method={method}")
    assert math.isfinite(summary.final_val_loss)
    assert state["surgery"] is not None and isinstance(state["surgery"]["generator"], torch.Tensor)
