"""End-to-end training on the fake corpus: the model learns, the run folder is complete."""

import json
import math
import types
from pathlib import Path

import pytest
import torch
import yaml

from Ava.errors import AvaDataError
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.utils.checkpoint import load_training_state
from tests.conftest import tiny_config


def test_val_loss_drops_well_below_uniform(trained_run):
    trainer, summary = trained_run
    uniform = math.log(trainer.data.tokenizer.vocab_size)
    assert summary.steps == 60
    assert summary.tokens == 60 * 8 * 64
    assert summary.final_val_loss < 0.6 * uniform, (summary.final_val_loss, uniform)
    records = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in records if r["split"] == "val"]
    assert len(val) == 3 and val[-1] < val[0]


def test_run_folder_has_everything(trained_run):
    _, summary = trained_run
    root = Path(summary.run_dir)
    assert root.name.startswith("tiny_")
    config = yaml.safe_load((root / "config.yaml").read_text())
    assert config["model"]["vocab_size"] == 512 and config["run"]["seed"] == 0
    meta = json.loads((root / "metadata.json").read_text())
    assert meta["seed"] == 0 and meta["versions"]["torch"] == torch.__version__
    assert {"cpu_count", "torch_threads", "cuda"} <= set(meta["hardware"])
    assert "git" in meta
    log = (root / "logs" / "train.log").read_text()
    assert "val loss" in log and "sample:" in log
    records = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert {"loss", "lm_loss", "load_balance", "z_loss", "lr", "grad_norm", "tokens_per_s", "max_vio"} <= set(train[0])
    assert list((root / "tensorboard").glob("events.out.tfevents.*"))
    assert (root / "tokenizer.json").is_file()
    assert json.loads((root / "summary.json").read_text())["steps"] == 60


def test_final_checkpoint_is_complete_and_loads_safely(trained_run):
    trainer, summary = trained_run
    ckpt = Path(summary.checkpoint)
    assert ckpt.name == "step_60"
    assert (ckpt.parent / "latest").resolve() == ckpt.resolve()
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")], "temporary files left behind"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert {"model.safetensors", "state.pt", "config.yaml", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["step"] == 60 and manifest["val_loss"] == pytest.approx(summary.final_val_loss)
    state = load_training_state(ckpt)  # weights_only=True
    assert state["step"] == 60 and state["progress"]["tokens"] == summary.tokens
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 60


def test_checkpoint_reload_gives_identical_logits(trained_run):
    trainer, summary = trained_run
    reloaded = EnhancedMoEModel.from_pretrained(summary.run_dir)
    ids = torch.randint(0, trainer.model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    trainer.model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(ids).logits, reloaded(ids).logits)


def test_lr_follows_warmup_then_cosine(trained_run):
    _, summary = trained_run
    records = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if r["split"] == "train"}
    # lr logged at step s is the one used for step s (index s-1): warmup 10 steps to 3e-3
    assert lrs[10] == pytest.approx(3e-3)
    assert lrs[20] < lrs[10] and lrs[60] == pytest.approx(3e-4, rel=0.02)


class _GradRecorder:
    """Stands in for the optimizer: records the gradients it is asked to apply."""

    def __init__(self, model):
        self.model, self.param_groups, self.grads = model, [{"lr": 0.0}], None

    def step(self):
        self.grads = torch.cat([p.grad.flatten() for p in self.model.parameters()])

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_grad_accumulation_matches_a_larger_batch(tmp_path, corpus_cache):
    """Two micro-batches of 4 give the gradient of one batch of 8 (aux loss off: it is per batch)."""
    config = tiny_config(tmp_path / "runs", corpus_cache, "model.moe.aux_loss_coef=0", "training.grad_clip=null")
    torch.manual_seed(0)
    model = EnhancedMoEModel(config.model)
    trainer = EnhancedModularTrainer(model, config)
    trainer.optimizer = recorder = _GradRecorder(model)
    trainer.scheduler = types.SimpleNamespace(step=lambda: None)
    batch = torch.randint(0, config.model.vocab_size, (8, 64), generator=torch.Generator().manual_seed(1))
    trainer.train_step([batch])
    whole = recorder.grads
    trainer.train_step([batch[:4], batch[4:]])
    assert torch.allclose(whole, recorder.grads, atol=1e-6, rtol=1e-4)
    assert trainer.step == 2 and trainer.tokens == 2 * batch.numel()


def test_too_little_data_is_a_clear_error(tmp_path, corpus_cache):
    config = tiny_config(tmp_path / "runs", corpus_cache, "training.batch_size=100000")
    with pytest.raises(AvaDataError, match="lower training.batch_size"):
        EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()


def test_bf16_autocast_trains_on_cpu(tmp_path, corpus_cache):
    config = tiny_config(tmp_path / "runs", corpus_cache, "precision.dtype=bf16", "training.max_steps=3",
                         "evaluation.sample_max_new_tokens=0")
    summary = EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
    assert math.isfinite(summary.final_train_loss) and summary.sample is None
