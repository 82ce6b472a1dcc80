"""precision.param_dtype bf16: bf16 weights, fp32 master copies in the optimizer, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from Ava.config import check_compatibility, validate_config
from Ava.errors import AvaConfigError
from Ava.training import EnhancedModularTrainer

from ..conftest import tiny_config

BF16 = ("precision.dtype=bf16", "training.max_steps=8", "evaluation.sample_max_new_tokens=0", "training.eval_every=4")


def _losses(run) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


def test_bf16_weights_train_with_fp32_masters_like_fp32_weights(tmp_path, corpus_cache):
    reference = EnhancedModularTrainer.from_config(tiny_config(tmp_path / "a", corpus_cache, *BF16, "training.log_every=1"))
    reference.train()
    trainer = EnhancedModularTrainer.from_config(
        tiny_config(tmp_path / "b", corpus_cache, *BF16, "training.log_every=1", "precision.param_dtype=bf16"))
    trainer.train()
    assert all(p.dtype == torch.bfloat16 for p in trainer.model.parameters())
    masters = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    assert masters and all(p.dtype == torch.float32 for p in masters)
    pairs = trainer.precision.master.pairs
    assert all(torch.equal(param, master.to(torch.bfloat16)) for param, master in pairs)  # the model = rounded masters
    assert any(not torch.equal(master, master.to(torch.bfloat16).float()) for _, master in pairs)  # fp32 precision kept
    ref, got = _losses(reference.paths.root), _losses(trainer.paths.root)
    assert len(ref) == len(got) == 8
    assert max(abs(a - b) / a for a, b in zip(ref, got)) < 0.01
    saved = load_file(str(trainer.paths.root / "checkpoints" / "latest" / "model.safetensors"))
    assert all(t.dtype == torch.bfloat16 for k, t in saved.items() if "weight" in k)


def test_bf16_weights_resume_bit_exactly(tmp_path, corpus_cache):
    overrides = (*BF16, "precision.param_dtype=bf16")
    whole = EnhancedModularTrainer.from_config(tiny_config(tmp_path / "a", corpus_cache, *overrides))
    whole.train()
    first = EnhancedModularTrainer.from_config(tiny_config(tmp_path / "b", corpus_cache, *overrides))

    def stop_after_4(step):  # as SIGINT does: finish the step, save, stop
        if step == 4:
            first._stop_signal = "SIGINT"

    with pytest.raises(KeyboardInterrupt):
        first.train(on_step=stop_after_4)
    resumed = EnhancedModularTrainer.from_config(tiny_config(tmp_path / "b", corpus_cache, *overrides))
    resumed.train(resume=first.paths.root)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(whole.precision.master.pairs, resumed.precision.master.pairs))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(whole.precision.master.pairs, resumed.precision.master.pairs))
    assert _losses(whole.paths.root)[-1] == _losses(first.paths.root)[-1]


def test_param_dtype_rules_name_the_key():
    with pytest.raises(AvaConfigError, match="param_dtype bf16 computes in bf16: set dtype: bf16"):
        validate_config({"precision": {"param_dtype": "bf16"}})
    config = validate_config({"precision": {"dtype": "bf16", "param_dtype": "bf16"}, "optimizer": {"name": "sophia"},
                              "distributed": {"strategy": "fsdp2"}})
    messages = [str(i) for i in check_compatibility(config) if i.key == "precision.param_dtype"]
    assert len(messages) == 2 and "sophia" in messages[0] and "fsdp2" in messages[1]
