"""precision.fp8: FP8 training, emulated on CPU (and torchao's FP8 GEMMs on a GPU that has them)."""

import copy
import dataclasses
import importlib.util
import logging
import types

import pytest
import torch
from torch import nn

from Ava.errors import AvaConfigError
from Ava.layers.experts import Experts
from Ava.layers.routing import Router
from Ava.models import EnhancedMoEModel
from Ava.optimization import build_optimizer
from Ava.optimization.fp8_training import (
    E4M3,
    E5M2,
    FP8EmulatedExperts,
    FP8EmulatedLinear,
    fp8_quantize_dequantize,
    fp8_scale,
    fp8_unsupported_reason,
)
from Ava.training import EnhancedModularTrainer
from Ava.training.parallel import SingleProcess
from tests.conftest import tiny_config

CPU = torch.device("cpu")
EMULATED = ("precision.fp8.enabled=true", "precision.fp8.emulate=true")
HAS_TORCHAO = importlib.util.find_spec("torchao") is not None


def _prepared(tmp_path, cache, *overrides):
    config = tiny_config(tmp_path / "runs", cache, *overrides)
    torch.manual_seed(0)
    model = SingleProcess(CPU).prepare_model(EnhancedMoEModel(config.model), config)
    return model, config


def _losses(tmp_path, cache, *overrides, steps=12):
    model, config = _prepared(tmp_path, cache, *overrides)
    trainer = EnhancedModularTrainer(model, config)
    trainer.optimizer = build_optimizer(model, config.optimizer, config.training.learning_rate, trainer.device)
    trainer.scheduler = types.SimpleNamespace(step=lambda: None)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, config.model.vocab_size, (4, 32), generator=gen) for _ in range(2)]
    return [float(trainer.train_step([batches[i % 2]])["loss"]) for i in range(steps)]


def test_tensorwise_and_rowwise_scales_on_a_known_tensor():
    x = torch.tensor([[1.0, -2.0, 4.0], [0.5, 0.25, -8.0]])
    assert fp8_scale(x, E4M3, "tensorwise").item() == 448 / 8  # one scale: max(e4m3) / amax
    assert fp8_scale(x, E5M2, "tensorwise").item() == 57344 / 8
    # rowwise: per row along the inner dimension, rounded down to a power of 2 (448/4 -> 64, 448/8 -> 32)
    assert fp8_scale(x, E4M3, "rowwise", dim=-1).flatten().tolist() == [64.0, 32.0]
    assert fp8_scale(x, E4M3, "rowwise", dim=0).flatten().tolist() == [256.0, 128.0, 32.0]
    # quantize→dequantize = (x · s).to(fp8) / s; values on the fp8 grid after scaling come back exactly
    assert torch.equal(fp8_quantize_dequantize(x, E4M3, "rowwise", dim=-1), x)
    y = torch.tensor([[1.1, 3.3, 100.0, -1000.0]])
    s = 448 / 1000
    expected = (y * s).to(E4M3).float() / s
    assert torch.equal(fp8_quantize_dequantize(y, E4M3, "tensorwise"), expected)
    assert not torch.equal(expected, y)  # 1.1 and 3.3 are rounded (3 mantissa bits)


@pytest.mark.skipif(not HAS_TORCHAO, reason="torchao is not installed")
@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
@pytest.mark.parametrize("autocast", [False, True])
def test_the_emulated_linear_equals_torchaos_float8_linear(recipe, autocast):
    """Ava's emulation gives torchao's Float8Linear (emulate=True) results bit for bit: output,
    input gradient and weight gradient."""
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(64, 32))
    ours = copy.deepcopy(ref)
    convert_to_float8_training(ref, config=dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe),
                                                                emulate=True))
    ours[0].__class__ = FP8EmulatedLinear
    ours[0].fp8_recipe = recipe
    x = torch.randn(16, 64) * 3
    outs, grads = [], []
    for model in (ref, ours):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = model(xi)
        y.backward(torch.linspace(-1, 1, y.numel()).reshape(y.shape).to(y.dtype))
        outs.append(y)
        grads.append((xi.grad, model[0].weight.grad))
    assert outs[0].dtype == outs[1].dtype
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_emulated_fp8_training_tracks_the_bf16_loss_curve(tmp_path, corpus_cache):
    """12 steps of the tiny model: every step's loss within 2% of bf16's (measured: 0.32%
    tensorwise, 0.11% rowwise)."""
    ref = _losses(tmp_path / "bf16", corpus_cache, "precision.dtype=bf16")
    for recipe in ("tensorwise", "rowwise"):
        fp8 = _losses(tmp_path / recipe, corpus_cache, "precision.dtype=bf16", *EMULATED,
                      f"precision.fp8.recipe={recipe}")
        gaps = [abs(a - b) / b for a, b in zip(fp8, ref, strict=True)]
        assert max(gaps) < 0.02, (recipe, max(gaps))
        assert fp8 != ref  # FP8 really changed the numerics
    assert ref[-1] < ref[0] - 1.0  # and the curve being tracked goes somewhere


def test_listed_modules_stay_high_precision_and_the_log_says_emulated(tmp_path, corpus_cache, caplog):
    with caplog.at_level(logging.INFO, logger="Ava.optimization.fp8_training"):
        model, _ = _prepared(tmp_path, corpus_cache, *EMULATED, "precision.fp8.recipe=rowwise")
    line = caplog.messages[-1]
    assert "EMULATED on cpu" in line and "rowwise" in line
    assert "high precision: embed_tokens, lm_head, routers (2), norms" in line
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    kinds = {type(mod) for name, mod in model.named_modules() if name.endswith("mlp.gate")}
    assert kinds == {Router}
    attention = [mod for name, mod in model.named_modules() if ".self_attn." in name and isinstance(mod, nn.Linear)]
    assert attention and all(type(mod) is FP8EmulatedLinear for mod in attention)
    assert all(type(mod) is FP8EmulatedExperts for mod in model.modules() if isinstance(mod, Experts))


def test_experts_false_leaves_the_experts_alone(tmp_path, corpus_cache):
    model, _ = _prepared(tmp_path, corpus_cache, *EMULATED, "precision.fp8.experts=false")
    assert all(type(mod) is Experts for mod in model.modules() if isinstance(mod, Experts))


def test_emulated_experts_are_close_to_the_plain_ones_and_train_their_weights():
    torch.manual_seed(0)
    plain = Experts(4, 32, 32, backend="loop")
    fp8 = copy.deepcopy(plain)
    fp8.__class__ = FP8EmulatedExperts
    fp8.fp8_recipe = "tensorwise"
    router = Router(32, 4, top_k=2)
    x = torch.randn(16, 32)
    routing = router(x)
    y_plain, y_fp8 = plain(x, routing), fp8(x, routing)
    assert not torch.equal(y_plain, y_fp8)
    assert (y_plain - y_fp8).norm() / y_plain.norm() < 0.1  # e4m3: ~2^-4 relative per operand
    y_fp8.square().sum().backward()
    assert fp8.gate_up_proj.grad is not None and fp8.gate_up_proj.grad.abs().sum() > 0


def test_the_checkpoint_holds_the_plain_weights_under_the_same_names(tmp_path, corpus_cache):
    plain, _ = _prepared(tmp_path / "a", corpus_cache)
    fp8, _ = _prepared(tmp_path / "b", corpus_cache, *EMULATED)
    state = SingleProcess(CPU).model_state_dict(fp8)
    reference = SingleProcess(CPU).model_state_dict(plain)
    assert list(state) == list(reference)
    assert all(torch.equal(state[k], reference[k]) for k in state)  # nothing quantized in place


def test_off_leaves_the_model_bit_identical(tmp_path, corpus_cache):
    """precision.fp8 off (the default): no module changes class, outputs and gradients are the
    plain model's bit for bit."""
    prepared, config = _prepared(tmp_path, corpus_cache)
    torch.manual_seed(0)
    plain = EnhancedMoEModel(config.model)
    plain.init_weights(config.run.seed)
    assert [type(m) for m in prepared.modules()] == [type(m) for m in plain.modules()]
    ids = torch.randint(0, config.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    a, b = prepared(ids, labels=ids), plain(ids, labels=ids)
    a.loss.backward()
    b.loss.backward()
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(prepared.parameters(), plain.parameters(), strict=True)
               if p.grad is not None)


def test_real_fp8_where_it_cannot_run_is_refused_in_one_line(tmp_path, corpus_cache):
    with pytest.raises(AvaConfigError, match=r"precision.fp8: cpu has no FP8 GEMMs; set precision.fp8.emulate: true") \
            as err:
        _prepared(tmp_path, corpus_cache, "precision.fp8.enabled=true")
    assert "\n" not in str(err.value)
    assert fp8_unsupported_reason(CPU) == "cpu has no FP8 GEMMs"


@pytest.mark.parametrize("overrides, message", [
    (("precision.dtype=fp16",), "not fp16"),
    (("precision.qat={bits: 8}",), "use one of them"),
])
def test_contradictory_precision_settings_are_refused(tmp_path, corpus_cache, overrides, message):
    with pytest.raises(AvaConfigError, match=message):
        tiny_config(tmp_path, corpus_cache, *EMULATED, *overrides)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9) or not HAS_TORCHAO,
                    reason="needs a GPU with FP8 (compute capability >= 8.9) and torchao")
def test_torchao_fp8_linears_train_on_a_gpu(tmp_path, corpus_cache):
    from torchao.float8.float8_linear import Float8Linear

    config = tiny_config(tmp_path, corpus_cache, "precision.dtype=bf16", "precision.fp8.enabled=true",
                         "precision.fp8.experts=false", "run.device=cuda")
    model = SingleProcess(torch.device("cuda")).prepare_model(EnhancedMoEModel(config.model), config)
    assert any(isinstance(mod, Float8Linear) for mod in model.modules())
    ids = torch.randint(0, config.model.vocab_size, (4, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
