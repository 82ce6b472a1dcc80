"""LoRA adapters (layers/lora.py): a new adapter changes nothing, merging folds it exactly, and
over a quantized base (QLoRA) only the adapters train."""

import pytest
import torch

from Ava.config import ModelConfig
from Ava.layers.lora import LoRAExperts, LoRALinear, adapter_state_dict, apply_lora, lora_modules, merge_lora
from Ava.layers.quantized import QuantizedParameter, dequantize_modules, quantize_modules
from Ava.models import EnhancedMoEModel

ALL = ["attention", "mlp", "experts", "router"]


def _model(seed: int = 0) -> EnhancedMoEModel:
    cfg = ModelConfig(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                      max_seq_len=32, intermediate_size=96, moe={"top_k": 2, "moe_intermediate_size": 32,
                                                                 "first_dense_layers": 1})
    torch.manual_seed(seed)
    model = EnhancedMoEModel(cfg)
    model.init_weights(seed)
    return model.eval()


def _ids() -> torch.Tensor:
    # 192 rows: above the packed int8/int4 kernels' row limit, so a quantized base computes in fp32 too
    return torch.randint(0, 128, (6, 32), generator=torch.Generator().manual_seed(3))


def _train_adapters(model: torch.nn.Module) -> None:
    """Non-zero B matrices, as after some training."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in adapter_state_dict(model).items():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_new_adapters_leave_the_output_unchanged_and_cover_every_target():
    model = _model()
    ref = model(_ids()).logits
    names = apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=ALL, seed=1)
    assert torch.equal(model(_ids()).logits, ref)  # B starts at zero
    kinds = {type(model.get_submodule(n)).__name__ for n in names}
    assert {"LoRALinear", "LoRAExperts"} <= kinds
    assert any(n.endswith("mlp.gate") for n in names) and any(n.endswith("mlp.down_proj") for n in names)
    assert not any(n.startswith(("mtp", "lm_head", "embed")) for n in names)
    assert sorted(lora_modules(model)) == sorted(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_merge_equals_the_adapted_model_and_restores_plain_keys():
    model = _model()
    plain_keys = set(model.state_dict())
    apply_lora(model, rank=4, alpha=8, dropout=0.0, targets=ALL, seed=1)
    _train_adapters(model)
    adapted = model(_ids()).logits
    assert not torch.allclose(adapted, _model()(_ids()).logits, atol=1e-3)  # the adapters matter
    merge_lora(model)
    assert set(model.state_dict()) == plain_keys
    torch.testing.assert_close(model(_ids()).logits, adapted, atol=1e-5, rtol=1e-5)


def test_adapter_delta_is_scaled_b_times_a():
    linear = torch.nn.Linear(8, 6, bias=False)
    lora = LoRALinear(linear, rank=2, alpha=6.0)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = x @ (linear.weight + 3.0 * lora.lora_B @ lora.lora_A).T
    torch.testing.assert_close(lora(x), expected)
    torch.testing.assert_close(lora.merged()(x), expected)


@pytest.mark.parametrize("scheme, group", [("int8", None), ("int4", 32)])
def test_qlora_trains_only_the_adapters_over_a_frozen_quantized_base(scheme, group):
    model = _model()
    quantize_modules(model, scheme, group)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, targets=ALL, seed=1)
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    assert any(isinstance(m, QuantizedParameter) for m in model.modules())
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = _ids()
    losses = []
    for _ in range(8):
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    after = {k: v for k, v in model.state_dict().items() if "lora_" not in k}
    assert base.keys() == after.keys() and all(torch.equal(base[k], after[k]) for k in base)
    model.eval()
    adapted = model(ids).logits
    merge_lora(model)
    assert not any(isinstance(m, (QuantizedParameter, LoRAExperts)) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, adapted, atol=1e-4, rtol=1e-4)


def test_dequantize_modules_inverts_quantize_modules_up_to_its_error():
    model = _model()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    quantize_modules(model, "int8")
    dequantize_modules(model)
    state = model.state_dict()
    assert set(state) == set(ref)
    for key, value in ref.items():
        torch.testing.assert_close(state[key].float(), value.float(), atol=value.abs().max().item() / 100, rtol=0)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="unknown LoRA target 'embeddings'"):
        apply_lora(_model(), rank=2, alpha=2, dropout=0.0, targets=["embeddings"])


def test_adapt_base_quantizes_then_adapts_and_names_the_key_of_a_bad_setting():
    from Ava.layers.lora import adapt_base

    model = _model()
    names = adapt_base(model, "int4", 32, rank=2, alpha=2, dropout=0.0, targets=["attention", "experts"])
    assert names and all(isinstance(model.get_submodule(n), (LoRALinear, LoRAExperts)) for n in names)
    assert any(isinstance(m, QuantizedParameter) for m in model.modules())  # the base is quantized
    with pytest.raises(ValueError, match=r"^finetune\.base_group_size: int4 group size 128 does not divide"):
        adapt_base(_model(), "int4", 128, rank=2, alpha=2, dropout=0.0, targets=["attention"])
    with pytest.raises(ValueError, match=r"^finetune\.lora\.targets: unknown LoRA target 'embeddings'"):
        adapt_base(_model(), "none", None, rank=2, alpha=2, dropout=0.0, targets=["embeddings"])
