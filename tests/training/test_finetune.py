"""LoRA / QLoRA fine-tuning from YAML: the base stays bit-identical, the loss falls on the new
text, checkpoints hold only the adapters, resume is exact, and generate/eval/export/merge-lora
load base + adapters."""

import json
import random
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file

from Ava.cli.main import main
from Ava.config import check_compatibility, validate_config
from Ava.errors import AvaCheckpointError, AvaConfigError
from Ava.layers.lora import LORA_FILE
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer

from ..conftest import REPO, tiny_config


@pytest.fixture(scope="module")
def new_text(tmp_path_factory):
    """A text unlike the base's Shakespeare: a few words in fixed patterns (easy to learn)."""
    rng = random.Random(0)
    phrases = ["alpha beta gamma delta", "omega sigma theta kappa", "the stars fear the night"]
    docs = ["\n".join(rng.choice(phrases) for _ in range(40)) for _ in range(30)]
    path = tmp_path_factory.mktemp("new") / "new.txt"
    path.write_text("\n\n".join(docs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base_run(trained_run):
    from pathlib import Path

    return Path(trained_run[1].run_dir)


def _finetune_config(tmp_path, corpus_cache, base, text, *overrides):
    return tiny_config(tmp_path / "runs", corpus_cache, f"finetune.base={base}", f"data.sources.0.path={text}",
                       "training.max_steps=12", "training.learning_rate=0.01",
                       "training.eval_every=6", "training.batch_size=4", "evaluation.sample_max_new_tokens=0",
                       *overrides)


def _train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r.get("split") == "train"]


def test_qlora_lowers_the_loss_keeps_the_base_and_checkpoints_only_adapters(tmp_path, corpus_cache, base_run,
                                                                            new_text):
    config = _finetune_config(tmp_path, corpus_cache, base_run, new_text, "finetune.base_quant=int4",
                              "finetune.lora.targets=[attention,experts,router]", "training.log_every=1")
    trainer = EnhancedModularTrainer.from_config(config)
    base_before = {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    base_file = (base_run / "checkpoints" / "latest" / "model.safetensors").read_bytes()
    trainer.train()
    run = trainer.paths.root

    losses = _train_losses(run)
    assert losses[-1] < losses[0] - 0.3, losses
    base_after = {k: v for k, v in trainer.model.state_dict().items() if "lora_" not in k}
    assert base_before.keys() == base_after.keys()
    assert all(torch.equal(base_before[k], base_after[k]) for k in base_before)  # frozen, bit-identical
    assert (base_run / "checkpoints" / "latest" / "model.safetensors").read_bytes() == base_file

    checkpoint = run / "checkpoints" / "latest"
    saved = load_file(str(checkpoint / "model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    assert (checkpoint / "model.safetensors").stat().st_size < len(base_file) / 4
    spec = json.loads((checkpoint / LORA_FILE).read_text())
    assert spec["base_quant"] == "int4" and spec["targets"] == ["attention", "experts", "router"]

    # from_pretrained: base (quantized as trained) + adapters, merged: the trained model's logits
    ids = torch.randint(0, 512, (6, 32), generator=torch.Generator().manual_seed(0))  # above the packed kernels' rows
    trainer.model.eval()
    expected = trainer.model(ids).logits
    merged = EnhancedMoEModel.from_pretrained(run)
    torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=1e-4)


def test_finetune_resumes_bit_exactly(tmp_path, corpus_cache, base_run, new_text):
    steps = "training.max_steps=8"
    whole = EnhancedModularTrainer.from_config(_finetune_config(tmp_path / "a", corpus_cache, base_run, new_text, steps))
    whole.train()
    first = EnhancedModularTrainer.from_config(_finetune_config(tmp_path / "b", corpus_cache, base_run, new_text, steps))

    def stop_after_4(step):  # as SIGINT does: finish the step, save, stop
        if step == 4:
            first._stop_signal = "SIGINT"

    with pytest.raises(KeyboardInterrupt):
        first.train(on_step=stop_after_4)
    resumed = EnhancedModularTrainer.from_config(_finetune_config(tmp_path / "b", corpus_cache, base_run, new_text, steps))
    resumed.train(resume=first.paths.root)
    a = load_file(str(whole.paths.root / "checkpoints" / "latest" / "model.safetensors"))
    b = load_file(str(first.paths.root / "checkpoints" / "latest" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _train_losses(whole.paths.root)[-1] == _train_losses(first.paths.root)[-1]


def test_merge_lora_writes_a_full_model_that_generate_reads(tmp_path, corpus_cache, base_run, new_text, capsys):
    trainer = EnhancedModularTrainer.from_config(
        _finetune_config(tmp_path, corpus_cache, base_run, new_text, "training.max_steps=4"))
    trainer.train()
    out = tmp_path / "merged"
    assert main(["merge-lora", str(trainer.paths.root), "--out", str(out)]) == 0
    assert "merged" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json"}
    ids = torch.randint(0, 512, (1, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(EnhancedMoEModel.from_pretrained(out)(ids).logits,
                               EnhancedMoEModel.from_pretrained(trainer.paths.root)(ids).logits)
    assert main(["generate", str(out), "--prompt", "alpha", "--max-new-tokens", "4"]) == 0
    # ava quantize of a fine-tune compares with the merged model's size, not the adapters' file
    assert main(["quantize", str(trainer.paths.root), "--int8", "--no-eval", "--out", str(tmp_path / "q")]) == 0
    ratio = float(re.search(r"size: .* \(([\d.]+)x\)", capsys.readouterr().out).group(1))
    assert 0.2 < ratio < 0.5
    # a plain run has nothing to merge
    assert main(["merge-lora", str(base_run), "--out", str(tmp_path / "x")]) == 2
    assert "not a LoRA fine-tune" in capsys.readouterr().err


def test_a_changed_or_missing_base_is_named(tmp_path, corpus_cache, base_run, new_text):
    base = tmp_path / "base"
    shutil.copytree(base_run / "checkpoints" / "latest", base)
    trainer = EnhancedModularTrainer.from_config(
        _finetune_config(tmp_path, corpus_cache, base, new_text, "training.max_steps=2"))
    trainer.train()
    weights = load_file(str(base / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v + 1 for k, v in weights.items()}, str(base / "model.safetensors"))
    with pytest.raises(AvaCheckpointError, match="changed since these adapters were trained"):
        EnhancedMoEModel.from_pretrained(trainer.paths.root)
    shutil.rmtree(base)
    with pytest.raises(AvaCheckpointError, match="restore the base there"):
        EnhancedMoEModel.from_pretrained(trainer.paths.root)


def test_config_check_reads_the_base(tmp_path, base_run, capsys):
    assert main(["config", "check", str(REPO / "configs" / "finetune.yaml"), f"run.output_dir={tmp_path}",
                 f"finetune.base={tmp_path / 'missing'}"]) == 2
    assert "error: finetune.base: no checkpoint at" in capsys.readouterr().err
    assert main(["config", "check", str(REPO / "configs" / "finetune.yaml"), f"run.output_dir={tmp_path}",
                 f"finetune.base={base_run}", "finetune.base_quant=int8"]) == 0
    report = capsys.readouterr().out
    gradients = re.search(r"gradients\s+([\d.]+) KiB", report)  # the adapters' only (the base's are ~740 KiB)
    assert gradients and float(gradients.group(1)) < 400, report


def test_config_errors_name_the_key(tmp_path, corpus_cache, base_run, new_text):
    with pytest.raises(AvaConfigError, match=r"model.hidden_size: 32, but the fine-tune's architecture is the base's"):
        EnhancedModularTrainer.from_config(
            _finetune_config(tmp_path, corpus_cache, base_run, new_text, "model.hidden_size=32"))
    with pytest.raises(AvaCheckpointError, match="finetune.base: no checkpoint at"):
        EnhancedModularTrainer.from_config(
            _finetune_config(tmp_path, corpus_cache, tmp_path / "nope", new_text))
    issues = check_compatibility(validate_config({"finetune": {"base": "x"}, "distributed": {"strategy": "fsdp2"},
                                                  "optimizer": {"name": "muon"}}))
    assert [i.key for i in issues if i.severity == "error"] == ["distributed.strategy", "optimizer.name"]
    assert "fsdp2 does not shard LoRA adapters" in str(issues[0])
    with pytest.raises(AvaConfigError, match="dropout applies to the attention and mlp adapters only"):
        validate_config({"finetune": {"base": "x", "lora": {"dropout": 0.1, "targets": ["experts"]}}})
    with pytest.raises(AvaConfigError, match="has a finetune section but the model has no LoRA adapters"):
        cfg = validate_config({"finetune": {"base": "x"}})
        EnhancedModularTrainer(EnhancedMoEModel(cfg.model), cfg)
