"""Each optimizer against a closed-form step or a reference implementation; groups; state round-trip."""

import io

import pytest
import torch

from Ava.config import EnhancedTrainingConfig, OptimizerConfig, check_compatibility
from Ava.models import EnhancedMoEModel
from Ava.optimization import (
    Lion, MuonWithAdamW, SophiaG, build_optimizer, newton_schulz, optimizer_state_bytes, parameter_groups,
)

CPU = torch.device("cpu")


def _tiny_model(**moe):
    cfg = EnhancedTrainingConfig.from_dict({"model": {
        "vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_experts": 4,
        "max_seq_len": 16, "moe": {"top_k": 2, "moe_intermediate_size": 32, **moe}}})
    torch.manual_seed(0)
    return EnhancedMoEModel(cfg.model)


def _loss(model, seed=0):
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(seed))
    return model(ids, labels=ids).loss


def _train(model, opt, steps=3):
    for i in range(steps):
        _loss(model, i).backward()
        if isinstance(opt, SophiaG):
            opt.update_hessian(scale=32)
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_groups_split_decay_router_expert_with_lr_multipliers():
    model = _tiny_model()
    cfg = OptimizerConfig(router_lr_mult=0.5, expert_lr_mult=2.0, weight_decay=0.1)
    groups = {g["name"]: g for g in parameter_groups(model, cfg, 1e-3)}
    assert list(groups) == ["no_decay", "decay", "head", "router", "expert"]
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(names[id(p)].endswith("mlp.gate.weight") for p in groups["router"]["params"])
    assert all(p.ndim == 3 for p in groups["expert"]["params"])
    assert any(names[id(p)] == "embed_tokens.weight" for p in groups["no_decay"]["params"])
    assert all(p.ndim == 1 or names[id(p)] == "embed_tokens.weight" for p in groups["no_decay"]["params"])
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.1
    assert groups["router"]["lr"] == pytest.approx(5e-4) and groups["expert"]["lr"] == pytest.approx(2e-3)
    total = sum(len(g["params"]) for g in groups.values())
    assert total == len(list(model.parameters()))


def test_lion_matches_its_closed_form():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    opt = Lion([p], lr=0.1, betas=(0.9, 0.99), weight_decay=0.1)
    g1, g2 = torch.tensor([0.3, -0.2, 0.0]), torch.tensor([-1.0, 0.1, 0.2])
    p.grad = g1.clone()
    opt.step()  # m0 = 0 → u = sign(g1); θ = θ(1 − lr·λ) − lr·u
    theta1 = torch.tensor([1.0, -2.0, 0.5]) * (1 - 0.01) - 0.1 * torch.sign(g1)
    assert torch.allclose(p.detach(), theta1)
    m1 = 0.01 * g1
    p.grad = g2.clone()
    opt.step()
    theta2 = theta1 * (1 - 0.01) - 0.1 * torch.sign(0.9 * m1 + 0.1 * g2)
    assert torch.allclose(p.detach(), theta2)
    assert torch.allclose(opt.state[p]["exp_avg"], 0.99 * m1 + 0.01 * g2)


def test_sophia_clips_the_newton_step():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = SophiaG([p], lr=0.1, betas=(0.5, 0.5), rho=1.0, weight_decay=0.0, eps=1e-12)
    p.grad = torch.tensor([1.0, 2.0, 4.0])
    opt.update_hessian(scale=2.0)  # h = 0.5·2·g² = g²
    assert torch.allclose(opt.state[p]["hessian"], torch.tensor([1.0, 4.0, 16.0]))
    p.grad = torch.tensor([4.0, 2.0, -4.0])
    opt.step()  # m = 0.5·g = [2, 1, −2]; m/h = [2, 0.25, −0.125] → clipped to [1, 0.25, −0.125]
    assert torch.allclose(p.detach(), -0.1 * torch.tensor([1.0, 0.25, -0.125]))


def test_sophia_without_curvature_is_sign_momentum():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = SophiaG([p], lr=0.01, rho=0.04, weight_decay=0.0)
    p.grad = torch.tensor([1e-3, -5.0])
    opt.step()  # h = 0 → ratio = m/ε clipped to ±1
    assert torch.allclose(p.detach(), torch.tensor([-0.01, 0.01]))


def test_muon_matches_torch_muon_on_a_matrix():
    torch.manual_seed(0)
    w0 = torch.randn(16, 8)
    ours = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0.clone())
    opt = MuonWithAdamW([{"params": [ours], "use_muon": True}], lr=0.02, weight_decay=0.1)
    ref_opt = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for seed in range(3):
        g = torch.randn(16, 8, generator=torch.Generator().manual_seed(seed))
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.allclose(ours, ref, atol=1e-3), (ours - ref).abs().max()


def test_newton_schulz_orthogonalises_each_expert_slice():
    g = torch.randn(4, 24, 8, generator=torch.Generator().manual_seed(0))
    batched = newton_schulz(g).float()
    for e in range(4):  # the batched call equals per-slice calls
        assert torch.allclose(batched[e], newton_schulz(g[e]).float(), atol=1e-2)
    singular = torch.linalg.svdvals(batched)  # (4, 8): ≈ U(0.5, 1.5), not g's spread
    assert singular.min() > 0.4 and singular.max() < 1.6
    assert torch.linalg.svdvals(g).max() / torch.linalg.svdvals(g).min() > 2


def test_muon_adamw_part_matches_torch_adamw():
    w0 = torch.randn(5, generator=torch.Generator().manual_seed(1))
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = MuonWithAdamW([{"params": [ours]}], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    ref_opt = torch.optim.AdamW([ref], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1)
    for seed in range(3):
        g = torch.randn(5, generator=torch.Generator().manual_seed(seed))
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.allclose(ours, ref, atol=1e-6)


def test_muon_groups_cover_hidden_matrices_and_experts_only():
    model = _tiny_model()
    opt = build_optimizer(model, OptimizerConfig(name="muon"), 1e-3, CPU)
    by_name = {g["name"]: g["use_muon"] for g in opt.param_groups}
    assert by_name == {"no_decay": False, "decay": True, "head": False, "router": False, "expert": True}
    opt = build_optimizer(model, OptimizerConfig(name="muon", muon_experts="adamw"), 1e-3, CPU)
    assert {g["name"]: g["use_muon"] for g in opt.param_groups}["expert"] is False


@pytest.mark.parametrize("name", ["adamw", "lion", "sophia", "adafactor", "muon"])
def test_every_optimizer_trains_and_its_state_round_trips_weights_only(name):
    model = _tiny_model()
    opt = build_optimizer(model, OptimizerConfig(name=name), 3e-3, CPU)
    before = _loss(model, 0).item()
    _train(model, opt, steps=4)
    assert optimizer_state_bytes(opt) > 0
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)

    twin = _tiny_model()
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, OptimizerConfig(name=name), 3e-3, CPU)
    twin_opt.load_state_dict(state)
    _train(model, opt, steps=2)
    _train(twin, twin_opt, steps=2)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b), name
    if name != "adafactor":  # Adafactor's relative step is tiny at lr 3e-3 after 6 steps
        assert _loss(model, 0).item() < before


def test_lion_with_adamw_lr_warns():
    cfg = EnhancedTrainingConfig.from_dict({"optimizer": {"name": "lion"}, "training": {"learning_rate": 2e-3}})
    assert any(i.key == "training.learning_rate" and i.severity == "warning" for i in check_compatibility(cfg))


def test_null_betas_pick_the_published_defaults():
    model = _tiny_model()
    assert build_optimizer(model, OptimizerConfig(name="lion"), 1e-4, CPU).param_groups[0]["betas"] == (0.9, 0.99)
    assert build_optimizer(model, OptimizerConfig(name="sophia"), 1e-4, CPU).param_groups[0]["betas"] == (0.965, 0.99)
    opt = build_optimizer(model, OptimizerConfig(betas=(0.8, 0.9)), 1e-4, CPU)
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
