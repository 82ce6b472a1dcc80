"""model.attention (moh, moa) and model.cross_attention in the whole model: training, the
balancing term, evaluation, generation with a KV cache, checkpoints and the trainer."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from Ava.config import ModelConfig
from Ava.config.feature_compatibility import model_loss_terms
from Ava.generation import TextGenerator
from Ava.models import EnhancedMoEModel
from Ava.training import EnhancedModularTrainer
from Ava.training.run_manager import seed_everything
from tests.conftest import tiny_config

YAML = """
vocab_size: 61
hidden_size: 32
num_layers: 2
num_heads: 4
num_experts: 4
max_seq_len: 32
moe: {top_k: 2, moe_intermediate_size: 32}
"""

KINDS = {
    "standard": {},
    "moh": {"attention": "moh", "moh": {"shared_heads": 1, "top_k": 2}},
    "moa": {"attention": "moa", "moa": {"num_experts": 8, "top_k": 2}},
    "cross": {"cross_attention": {"every": 2}},
}


def _model(kind: str, seed: int = 0, **extra) -> EnhancedMoEModel:
    data = {**yaml.safe_load(YAML), **KINDS[kind], **extra}
    torch.manual_seed(seed)
    return EnhancedMoEModel(ModelConfig.model_validate(data))


def _ids(B: int = 4, T: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 61, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_trains_from_a_yaml_config(kind):
    model = _model(kind).train()
    ids = _ids()
    context = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(1)) if kind == "cross" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        out = model(ids, labels=ids, context=context)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(out.lm_loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.5, losses
    if kind == "cross":  # the gates opened: the context is used
        assert all(layer.cross_attn.gate.item() != 0 for layer in model.layers if layer.cross_attn is not None)


@pytest.mark.parametrize("kind, coef_key", [("moh", "moh"), ("moa", "moa")])
def test_routed_attention_reports_its_balancing_term(kind, coef_key):
    model = _model(kind, mtp={"num_heads": 1})
    out = model(_ids(), labels=_ids())
    per_layer = [layer.self_attn for layer in model.decoder_layers()]
    assert len(per_layer) == 3  # two layers and the MTP block, all routed
    term = out.aux_losses["attention_balance"]
    assert term.requires_grad and 0.01 * 0.9 < term.item() < 0.01 * 3
    assert "attention_balance" in model_loss_terms(model.config)
    total = out.lm_loss + sum(out.aux_losses.values())
    assert torch.allclose(out.loss, total)
    term.backward()
    assert model.layers[0].self_attn.router.weight.grad.abs().sum() > 0
    # a zero coefficient removes the term, and no layer keeps the graph of its latest value
    off = _model(kind, **{coef_key: {"aux_loss_coef": 0.0}})
    assert "attention_balance" not in off(_ids(), labels=_ids()).aux_losses
    assert "attention_balance" not in model_loss_terms(off.config)
    assert all(layer.attention_aux_loss is None for layer in model.decoder_layers())


@pytest.mark.parametrize("kind", ["moh", "moa"])
def test_generation_with_the_kv_cache_matches_the_full_forward(kind):
    model = _model(kind).eval()
    gen = TextGenerator(model, None)
    prompt = _ids(1, 5, seed=2)[0].tolist()
    cached = gen.generate_ids(prompt, 10, temperature=0, use_cache=True)
    uncached = gen.generate_ids(prompt, 10, temperature=0, use_cache=False)
    assert cached == uncached and len(cached) == 10
    ids = _ids(2, 12)
    with torch.no_grad():
        full = model(ids).logits
        with model.decoding():  # the fused q/k/v decoding path
            out = model(ids[:, :8], use_cache=True)
            step = model(ids[:, 8:], past_key_values=out.past_key_values, use_cache=True)
    assert torch.allclose(torch.cat([out.logits, step.logits], 1), full, atol=1e-5)


def test_cross_attention_context_in_cached_decoding_and_at_init():
    model = _model("cross").eval()
    assert [layer.cross_attn is not None for layer in model.layers] == [False, True]
    ids, context = _ids(2, 10), torch.randn(2, 4, 32)
    with torch.no_grad():
        plain = model(ids).logits
        assert torch.equal(model(ids, context=context).logits, plain)  # the gate starts closed
        model.layers[1].cross_attn.gate.fill_(1.0)
        full = model(ids, context=context).logits
        out = model(ids[:, :6], use_cache=True, context=context)
        step = model(ids[:, 6:], past_key_values=out.past_key_values, use_cache=True, context=context)
        assert torch.equal(model(ids, context=context[:, :0]).logits, plain)  # empty context
    assert not torch.allclose(full, plain)
    assert torch.allclose(torch.cat([out.logits, step.logits], 1), full, atol=1e-5)


@pytest.mark.parametrize("kind, context, message", [
    ("standard", torch.zeros(2, 3, 32), "no cross-attention block; set model.cross_attention.every"),
    ("cross", torch.zeros(2, 3, 16), r"expected \(batch, positions, context_size\) = \(2, S, 32\)"),
    ("cross", None, "context_mask given without context"),
])
def test_a_context_the_model_cannot_take_is_refused_in_one_line(kind, context, message):
    model = _model(kind)
    mask = torch.ones(2, 3) if context is None else None
    with pytest.raises(ValueError, match=message) as err:
        model(_ids(2, 5), context=context, context_mask=mask)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["moh", "moa", "cross"])
def test_save_and_load_round_trip(tmp_path, kind):
    model = _model(kind).eval()
    folder = model.save_pretrained(tmp_path / kind)
    loaded = EnhancedMoEModel.from_pretrained(folder)
    assert loaded.config == model.config
    ids = _ids(2, 8)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", ["moh", "cross"])
def test_activation_checkpointing_gives_the_same_gradients(kind):
    grads = []
    for checkpointing in (False, True):
        model = _model(kind).train()
        model.set_activation_checkpointing(checkpointing)
        context = torch.randn(4, 3, 32, generator=torch.Generator().manual_seed(1)) if kind == "cross" else None
        if kind == "cross":
            with torch.no_grad():
                model.layers[1].cross_attn.gate.fill_(0.5)
        model(_ids(), labels=_ids(), context=context).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6), name


def test_meta_device_build_initialises_the_new_parameters():
    cfg = ModelConfig.model_validate({**yaml.safe_load(YAML), "attention": "moh", "cross_attention": {"every": 1}})
    with torch.device("meta"):
        model = EnhancedMoEModel(cfg)
    model.to_empty(device="cpu")
    model.init_weights(5)
    reference = EnhancedMoEModel(cfg)
    reference.init_weights(5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.equal(p, q), name
    assert all(layer.cross_attn.gate.item() == 0 for layer in model.layers)


def test_the_trainer_runs_moh_from_the_config_file(tmp_path, corpus_cache):
    config = tiny_config(tmp_path / "moh", corpus_cache, "model.attention=moh", "model.moh.shared_heads=1",
                         "training.max_steps=6", "training.eval_every=6", "training.eval_batches=1",
                         "training.log_every=2", "evaluation.sample_max_new_tokens=4")
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    summary = trainer.train()
    assert summary.steps == 6 and math.isfinite(summary.final_val_loss)
    records = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert all("attention_balance" in r for r in train), train[0].keys()
    assert isinstance(summary.sample, str)
