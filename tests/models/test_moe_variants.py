"""Model-level MoE options: layer placement, shared experts, hash routing, capacity, aux-free bias."""

import pytest
import torch

from Ava.config import ModelConfig
from Ava.models import EnhancedMoEModel


def _model(seed: int = 0, num_layers: int = 2, **moe) -> EnhancedMoEModel:
    cfg = ModelConfig(vocab_size=53, hidden_size=32, num_layers=num_layers, num_heads=4, num_kv_heads=2,
                      num_experts=4, max_seq_len=32, moe={"top_k": 2, "moe_intermediate_size": 32, **moe})
    torch.manual_seed(seed)
    return EnhancedMoEModel(cfg)


def test_moe_every_and_first_dense_place_the_moe_layers():
    model = _model(num_layers=6, first_dense_layers=1, moe_every=2)
    assert [layer.is_moe for layer in model.layers] == [False, True, False, True, False, True]
    ids = torch.randint(0, 53, (1, 6))
    assert [s.layer for s in model(ids, labels=ids).router_stats] == [1, 3, 5]


def test_shared_experts_naming_width_and_accounting():
    plain, shared = _model(), _model(num_shared_experts=2)
    keys = set(shared.state_dict())
    assert "layers.0.mlp.shared_experts.gate_proj.weight" in keys
    assert shared.layers[0].mlp.shared_experts.gate_proj.weight.shape == (2 * 32, 32)
    extra = 2 * 3 * 32 * (2 * 32)  # per layer: gate, up, down of a 32 -> 64 -> 32 SwiGLU
    assert shared.num_parameters() - plain.num_parameters() == extra
    assert shared.num_parameters(active_only=True) - plain.num_parameters(active_only=True) == extra
    assert shared.flops_per_token(16) - plain.flops_per_token(16) == pytest.approx(6 * extra)
    ids = torch.randint(0, 53, (2, 8))
    out = shared(ids, labels=ids)
    out.loss.backward()
    assert shared.layers[1].mlp.shared_experts.down_proj.weight.grad.abs().sum() > 0


def test_hash_router_in_the_model_routes_by_token_id():
    model = _model(router="hash", top_k=1).eval()
    ids = torch.tensor([[3, 7, 3, 9, 7, 3]])
    with torch.no_grad():
        out = model(ids)
    # The token-per-expert counts equal those of hashing the ids, in every MoE layer.
    from Ava.layers import hash_experts

    expected = torch.bincount(hash_experts(ids.flatten(), 4, 1).flatten(), minlength=4)
    for stats in out.router_stats:
        assert torch.equal(stats.tokens_per_expert, expected)


def test_capacity_reports_dropped_tokens_and_eval_factor_applies():
    model = _model(capacity_factor=0.5, eval_capacity_factor=2.0)  # eval: C = T, never drops
    with torch.no_grad():
        for layer in model.layers:
            layer.mlp.gate.weight.normal_(0, 1.0)  # skewed routing
    ids = torch.randint(0, 53, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model.train()(ids, labels=ids)
    dropped = sum(int(s.dropped_tokens) for s in out.router_stats)
    assert dropped > 0
    for s in out.router_stats:
        assert s.tokens_per_expert.sum() == 2 * 16 * 2  # routed slots, counted before dropping
    with torch.no_grad():
        out_eval = model.eval()(ids, labels=ids)
    assert sum(int(s.dropped_tokens) for s in out_eval.router_stats) == 0


def test_expert_choice_model_has_no_balance_term():
    model = _model(router="expert_choice", capacity_factor=1.0, aux_loss_coef=0.01, seq_aux_loss_coef=0.01)
    ids = torch.randint(0, 53, (2, 8))
    out = model(ids, labels=ids)
    assert set(out.aux_losses) == {"z_loss"}
    for s in out.router_stats:
        assert torch.equal(s.tokens_per_expert, torch.full((4,), 8))  # c = 16·2/4
    out.loss.backward()
    assert model.layers[0].mlp.gate.weight.grad.abs().sum() > 0


def test_expert_bias_updates_and_round_trips_through_safetensors(tmp_path):
    model = _model(aux_free_bias=True, bias_update_rate=0.01, router="sigmoid")
    assert "layers.0.mlp.gate.expert_bias" in model.state_dict()
    model.update_expert_bias([torch.tensor([10, 0, 3, 3]), torch.tensor([1, 1, 1, 1])])
    b0 = model.layers[0].mlp.gate.expert_bias
    torch.testing.assert_close(b0, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    assert model.layers[1].mlp.gate.expert_bias.abs().sum() == 0  # balanced: sign(0) = 0
    model.save_pretrained(tmp_path / "ckpt")
    loaded = EnhancedMoEModel.from_pretrained(tmp_path / "ckpt")
    torch.testing.assert_close(loaded.layers[0].mlp.gate.expert_bias, b0)
    with pytest.raises(ValueError, match="2 MoE layers"):
        model.update_expert_bias([torch.ones(4)])
    plain = _model()
    assert not any("expert_bias" in k for k in plain.state_dict())
    plain.update_expert_bias([torch.ones(4), torch.ones(4)])  # no-op without aux_free_bias


def test_noisy_topk_model_is_deterministic_in_eval():
    model = _model(router="noisy_topk")
    ids = torch.randint(0, 53, (1, 8))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
