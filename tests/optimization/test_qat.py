"""precision.qat: fake-quantized weights in the forward, straight-through gradients, plain checkpoints."""

import copy

import pytest
import torch
from torch import nn
from safetensors.torch import load_file

from Ava.errors import AvaConfigError
from Ava.layers.experts import Experts
from Ava.layers.quantized import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from Ava.layers.routing import Router
from Ava.models import EnhancedMoEModel
from Ava.optimization.qat import (
    FakeQuantEmbedding,
    FakeQuantExperts,
    FakeQuantLinear,
    apply_qat,
    qat_modules,
    set_qat_step,
)
from Ava.training import EnhancedModularTrainer
from Ava.training.parallel import SingleProcess
from tests.conftest import tiny_config

CPU = torch.device("cpu")


def _int8(w):
    return dequantize_int8(*quantize_int8(w))


def _int4(w, group):
    return dequantize_int4(*quantize_int4(w, group))


def _linear(bits=8, group=None, start=0):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    apply_qat(model, bits, group, start)
    return model, model[0]


@pytest.mark.parametrize("bits, group, reference", [(8, None, _int8), (4, 32, lambda w: _int4(w, 32)),
                                                    (4, 64, lambda w: _int4(w, 64))])
def test_the_forward_uses_quantize_then_dequantize_of_the_weight(bits, group, reference):
    model, lin = _linear(bits, group)
    assert type(lin) is FakeQuantLinear
    x = torch.randn(5, 64)
    expected = nn.functional.linear(x, reference(lin.weight.detach()), lin.bias)
    assert torch.equal(model(x), expected)
    assert not torch.equal(model(x), nn.functional.linear(x, lin.weight, lin.bias))


def test_the_gradient_passes_straight_through_the_rounding():
    model, lin = _linear(4, 32)
    x = torch.randn(5, 64)
    model(x).square().sum().backward()
    # the gradient of a linear whose weight *is* the dequantized one, handed to the master weight unchanged
    dq = _int4(lin.weight.detach(), 32).requires_grad_()
    nn.functional.linear(x, dq, lin.bias).square().sum().backward()
    assert torch.equal(lin.weight.grad, dq.grad)


def test_experts_and_embeddings_are_fake_quantized_too():
    torch.manual_seed(0)
    experts = Experts(4, 64, 32, backend="loop")
    plain = copy.deepcopy(experts)
    holder = nn.ModuleDict({"experts": experts, "embed": nn.Embedding(10, 64)})
    apply_qat(holder, 8, None, 0)
    assert type(experts) is FakeQuantExperts and type(holder["embed"]) is FakeQuantEmbedding
    x = torch.randn(8, 64)
    routing = Router(64, 4, top_k=2)(x)
    with torch.no_grad():
        plain.gate_up_proj.copy_(_int8(plain.gate_up_proj))
        plain.down_proj.copy_(_int8(plain.down_proj))
    assert torch.equal(experts(x, routing), plain(x, routing))
    ids = torch.tensor([1, 2, 3])
    assert torch.equal(holder["embed"](ids), _int8(holder["embed"].weight.detach())[ids])


def test_fake_quantization_starts_at_start_step():
    model, lin = _linear(8, None, start=3)
    x = torch.randn(5, 64)
    plain = nn.functional.linear(x, lin.weight, lin.bias)
    set_qat_step(model, 2)
    assert torch.equal(model(x), plain)
    set_qat_step(model, 3)
    assert torch.equal(model(x), nn.functional.linear(x, _int8(lin.weight.detach()), lin.bias))


def test_the_model_prepared_for_qat_converts_every_ava_quantize_target_and_not_the_routers(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache, "precision.qat={bits: 4, group_size: 32, start_step: 0}")
    model = SingleProcess(CPU).prepare_model(EnhancedMoEModel(config.model), config)
    converted = qat_modules(model)
    assert model.lm_head in converted and model.embed_tokens in converted
    assert all(type(m) is FakeQuantExperts for m in model.modules() if isinstance(m, Experts))
    assert all(type(m) is Router for name, m in model.named_modules() if name.endswith("mlp.gate"))
    assert all(m.qat_bits == 4 and m.qat_group_size == 32 for m in converted)


def test_a_qat_run_checkpoints_the_plain_weights(tmp_path, corpus_cache):
    overrides = ("precision.qat={bits: 4}", "training.max_steps=3", "training.eval_every=3",
                 "training.eval_batches=1", "evaluation.sample_max_new_tokens=0")
    trainer = EnhancedModularTrainer.from_config(tiny_config(tmp_path, corpus_cache, *overrides))
    summary = trainer.train()
    saved = load_file(f"{summary.run_dir}/checkpoints/step_3/model.safetensors")
    plain = EnhancedMoEModel(trainer.config.model).state_dict()
    assert set(saved) <= set(plain)  # the names of a plain model (tied tensors stored once)
    live = trainer.model.state_dict()
    assert all(torch.equal(saved[k], live[k]) for k in saved)
    w = saved["layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(w, _int4(w, 32))  # not the quantized values


def test_qat_off_touches_nothing(tmp_path, corpus_cache):
    config = tiny_config(tmp_path, corpus_cache)
    model = SingleProcess(CPU).prepare_model(EnhancedMoEModel(config.model), config)
    assert qat_modules(model) == []


@pytest.mark.parametrize("override, message", [
    ("precision.qat={bits: 8, group_size: 32}", "group_size applies to bits 4 only"),
    ("precision.qat={bits: 3}", "bits"),
    ("precision.qat={bits: 4, group_size: 48}", "group_size"),
])
def test_bad_qat_settings_are_refused(tmp_path, corpus_cache, override, message):
    with pytest.raises(AvaConfigError, match=message):
        tiny_config(tmp_path, corpus_cache, override)


def test_a_group_size_that_does_not_divide_a_width_is_refused_in_one_line():
    model = nn.Sequential(nn.Linear(48, 32))
    with pytest.raises(AvaConfigError, match=r"precision.qat.group_size: 32 does not divide the input width of 0"):
        apply_qat(model, 4, 32, 0)


def test_the_trainer_turns_fake_quantization_on_at_start_step(tmp_path, corpus_cache, monkeypatch):
    """Each optimizer step tells the QAT modules its number: off before start_step, on from it."""
    seen = []
    original = EnhancedModularTrainer.train_step

    def record(self, *args, **kwargs):
        result = original(self, *args, **kwargs)  # train_step sets the flag for the step it runs
        seen.append(all(m.qat_active for m in qat_modules(self.model)))
        return result

    monkeypatch.setattr(EnhancedModularTrainer, "train_step", record)
    overrides = ("precision.qat={bits: 8, start_step: 2}", "training.max_steps=4", "training.eval_every=4",
                 "training.eval_batches=1", "evaluation.sample_max_new_tokens=0")
    EnhancedModularTrainer.from_config(tiny_config(tmp_path, corpus_cache, *overrides)).train()
    assert seen == [False, False, True, True]
