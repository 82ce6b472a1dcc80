"""precision.dtype: fp16 autocast with dynamic loss scaling (GradScaler), on CPU."""

import types

import pytest
import torch

from Ava.models import EnhancedMoEModel
from Ava.optimization import build_optimizer
from Ava.training import EnhancedModularTrainer
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config


def _trainer(tmp_path, cache, *overrides):
    config = tiny_config(tmp_path / "runs", cache, "precision.dtype=fp16", *overrides)
    torch.manual_seed(0)
    model = EnhancedMoEModel(config.model)
    trainer = EnhancedModularTrainer(model, config)
    trainer.optimizer = build_optimizer(model, config.optimizer, config.training.learning_rate, trainer.device)
    trainer.scheduler = types.SimpleNamespace(step=lambda: None)
    batch = torch.randint(0, config.model.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    return trainer, model, batch


def test_an_overflow_skips_the_step_halves_the_scale_and_is_not_a_bad_step(tmp_path, corpus_cache):
    trainer, model, batch = _trainer(tmp_path, corpus_cache)
    first = trainer.train_step([batch])
    assert first["loss_scale"] == 2.0**16 and first["overflow"] == 0.0 and first["skipped"] == 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model.lm_head.weight.register_hook(lambda grad: grad * float("inf"))  # gradients overflow
    overflowed = trainer.train_step([batch])
    hook.remove()
    assert overflowed["overflow"] == 1.0 and overflowed["skipped"] == 1.0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update
    assert trainer.precision.loss_scale == 2.0**15  # halved for the next step
    assert trainer.health.skipped == []  # the scaler's business: not a NaN step, no rollback counted
    after = trainer.train_step([batch])
    assert after["overflow"] == 0.0 and after["skipped"] == 0.0


def test_gradients_are_unscaled_before_clipping_and_logging(tmp_path, corpus_cache):
    """The logged norm is the true gradient's (about the fp32 run's, not 65536 times it)."""
    fp16, _, batch = _trainer(tmp_path, corpus_cache, "training.grad_clip=null")
    config = tiny_config(tmp_path / "fp32", corpus_cache, "training.grad_clip=null")
    torch.manual_seed(0)
    model = EnhancedMoEModel(config.model)
    fp32 = EnhancedModularTrainer(model, config)
    fp32.optimizer = build_optimizer(model, config.optimizer, config.training.learning_rate, fp32.device)
    fp32.scheduler = types.SimpleNamespace(step=lambda: None)
    norm16 = float(fp16.train_step([batch])["grad_norm"])
    norm32 = float(fp32.train_step([batch])["grad_norm"])
    assert norm16 == pytest.approx(norm32, rel=0.05)


def test_the_scale_grows_after_clean_steps_and_accumulation_works(tmp_path, corpus_cache):
    trainer, _, batch = _trainer(tmp_path, corpus_cache, "precision.loss_scale_init=1024",
                                 "precision.loss_scale_growth_interval=2")
    scales = [trainer.train_step([batch[:4], batch[4:]])["loss_scale"] for _ in range(3)]
    assert scales == [1024.0, 1024.0, 2048.0]  # doubled after 2 clean steps (read after the third)
    assert trainer.precision.loss_scale == 2048.0


def test_the_loss_scale_is_checkpointed_and_resumed(tmp_path, corpus_cache):
    overrides = ("precision.dtype=fp16", "precision.loss_scale_growth_interval=2", "training.max_steps=6",
                 "training.save_every=3", "checkpoint.keep_last=null", "evaluation.sample_max_new_tokens=0")
    whole = EnhancedModularTrainer.from_config(tiny_config(tmp_path / "a", corpus_cache, *overrides)).train()
    saved = load_training_state(f"{whole.run_dir}/checkpoints/step_3")["loss_scaler"]
    assert saved["scale"] == 2.0**17  # 65536 doubled once after two clean steps (and once more by step 4)
    resumed = EnhancedModularTrainer.from_config(tiny_config(tmp_path / "a", corpus_cache, *overrides))
    resumed.train(resume=f"{whole.run_dir}/checkpoints/step_3")
    assert resumed.precision.loss_scale == load_training_state(f"{whole.run_dir}/checkpoints/step_6")["loss_scaler"]["scale"]


@pytest.mark.parametrize("override, key", [("optimizer.name=sophia", "optimizer.name"),
                                           ("gradient.surgery.method=pcgrad", "gradient.surgery.method")])
def test_fp16_with_an_extra_backward_is_refused_naming_the_key(override, key, tmp_path, corpus_cache):
    from Ava.errors import AvaConfigError

    extra = ("gradient.surgery.terms=[lm_loss,load_balance]",) if "surgery" in override else ()
    with pytest.raises(AvaConfigError, match=rf"{key}: .*fp16 loss scaling does not cover"):
        tiny_config(tmp_path, corpus_cache, "precision.dtype=fp16", override, *extra)

