"""``ava export --format peft``: a LoRA fine-tune's adapters load in PEFT over the HF export of its
base and give Ava's logits (attention, dense MLP, routed experts and router adapters)."""

import json

import pytest
import torch

from Ava.cli.main import main
from Ava.config import ModelConfig, validate_config
from Ava.data import AvaTokenizer
from Ava.interop import export_hf
from Ava.interop.peft_export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TEXTS = ["the king loves the stars and the queen fears the night"] * 20 + ["alpha beta gamma delta omega"] * 20


@pytest.fixture(scope="module")
def finetune(tmp_path_factory):
    """A Qwen3-MoE-shaped base (one dense layer, QK-norm) and a LoRA fine-tune of it on every target."""
    tmp = tmp_path_factory.mktemp("peft")
    tokenizer = AvaTokenizer.train(TEXTS, vocab_size=300, min_frequency=1)
    cfg = ModelConfig(vocab_size=320, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                      max_seq_len=32, intermediate_size=48, qk_norm=True,
                      moe={"top_k": 2, "moe_intermediate_size": 24, "first_dense_layers": 1})
    torch.manual_seed(0)
    base = EnhancedMoEModel(cfg)
    base.init_weights(0)
    folder = base.save_pretrained(tmp / "base")
    tokenizer.save(folder / "tokenizer.json")
    text = tmp / "new.txt"
    text.write_text("\n\n".join(TEXTS), encoding="utf-8")
    config = validate_config({
        "finetune": {"base": str(folder), "lora": {"rank": 4, "alpha": 8, "targets": ["attention", "experts", "router"]}},
        "data": {"sources": [{"path": str(text)}], "val_fraction": 0.0},
        "training": {"max_steps": 6, "batch_size": 4, "learning_rate": 0.02},
        "evaluation": {"sample_max_new_tokens": 0}, "logging": {"progress_bar": False},
        "run": {"output_dir": str(tmp / "runs"), "name": "ft"},
    })
    trainer = EnhancedModularTrainer.from_config(config)
    trainer.train()
    return folder, trainer.paths.root, tmp


def test_peft_export_gives_avas_logits(finetune):
    base, run, tmp = finetune
    hf_dir = export_hf(base, tmp / "hf")
    adapter_dir = export_peft(run, tmp / "adapter")
    assert {p.name for p in adapter_dir.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert config["target_parameters"] == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight"]

    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(2, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base_logits = hf(ids).logits
        adapted = peft.PeftModel.from_pretrained(hf, adapter_dir).eval()
        peft_logits = adapted(ids).logits
        ava_logits = EnhancedMoEModel.from_pretrained(run)(ids).logits
    assert (ava_logits - base_logits).abs().max() > 1e-3  # the adapters change the model
    torch.testing.assert_close(peft_logits, ava_logits, atol=1e-4, rtol=1e-4)


def test_peft_export_of_a_plain_run_is_refused(finetune, capsys):
    base, _, tmp = finetune
    assert main(["export", str(base), "--format", "peft", "--out", str(tmp / "nope")]) == 2
    assert "has no lora.json: --format peft writes the adapters of a LoRA fine-tune" in capsys.readouterr().err


def test_dense_mlp_adapters_are_refused_naming_the_way_out(finetune):
    """PEFT (with transformers 5) would move gate_proj/up_proj/down_proj adapters onto the fused experts."""
    import shutil

    from safetensors.torch import load_file, save_file

    from Ava.errors import AvaConfigError

    _, run, tmp = finetune
    checkpoint = tmp / "with_mlp"
    shutil.copytree(run / "checkpoints" / "latest", checkpoint)
    adapters = load_file(str(checkpoint / "model.safetensors"))
    adapters["layers.0.mlp.gate_proj.lora_A"] = torch.zeros(4, 32)
    save_file(adapters, str(checkpoint / "model.safetensors"))
    with pytest.raises(AvaConfigError, match="layers.0.mlp.gate_proj: PEFT cannot load adapters on a MoE model's "
                                             "dense MLP layers"):
        export_peft(checkpoint, tmp / "out_mlp", verify=False)
