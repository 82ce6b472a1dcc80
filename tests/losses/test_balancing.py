"""Balancing losses and the causal LM loss, checked against hand-computed values."""

import math

import torch

from Ava.config import ModelConfig
from Ava.losses import causal_lm_loss, load_balancing_loss, router_z_loss
from Ava.models import EnhancedMoEModel


def test_aux_loss_is_one_for_uniform_routing():
    T, E = 8, 4  # top-2
    probs = torch.full((T, E), 1 / E)
    indices = torch.tensor([[0, 1], [2, 3]] * 4)  # every expert gets T·K/E slots
    torch.testing.assert_close(load_balancing_loss(probs, indices), torch.tensor(1.0))


def test_aux_loss_hand_computed_skewed_case():
    # T=2, E=2, K=1, both tokens on expert 0: f = [1, 0], P = [0.85, 0.15] -> 2 · 0.85 = 1.7
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2]], requires_grad=True)
    indices = torch.tensor([[0], [0]])
    loss = load_balancing_loss(probs, indices)
    torch.testing.assert_close(loss, torch.tensor(1.7))
    loss.backward()
    # dL/dp_ti = E · f_i / T: the gradient flows through P only, pushing down the loaded expert.
    torch.testing.assert_close(probs.grad, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_aux_loss_grows_with_skew():
    E, T = 4, 16
    values = []
    for conc in (0.25, 0.5, 0.75, 1.0):  # probability mass on expert 0
        probs = torch.full((T, E), (1 - conc) / (E - 1))
        probs[:, 0] = conc
        indices = probs.topk(1, dim=-1).indices if conc > 0.25 else torch.arange(T).remainder(E)[:, None]
        values.append(load_balancing_loss(probs, indices).item())
    assert math.isclose(values[0], 1.0, rel_tol=1e-6)
    assert values == sorted(values) and values[-1] == E


def test_z_loss_matches_hand_computation():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    lse = [math.log(2.0), 2.0 + math.log(1.0 + math.exp(-1.0))]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected))
    assert router_z_loss(logits.bfloat16()).dtype == torch.float32


def test_model_aux_loss_is_alpha_for_uniform_router():
    cfg = ModelConfig(vocab_size=40, hidden_size=32, num_layers=2, num_heads=4, num_experts=4,
                      moe={"top_k": 2, "moe_intermediate_size": 32, "aux_loss_coef": 0.05})
    torch.manual_seed(0)
    model = EnhancedMoEModel(cfg)
    for layer in model.layers:
        torch.nn.init.zeros_(layer.mlp.gate.weight)  # uniform probabilities
    ids = torch.randint(0, 40, (2, 8))
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.aux_losses["load_balance"], torch.tensor(0.05))
    # z-loss of zero logits: logsumexp = ln E
    torch.testing.assert_close(out.aux_losses["z_loss"], torch.tensor(cfg.moe.z_loss_coef * math.log(4) ** 2))


def test_causal_lm_loss_shifts_ignores_and_is_fp32():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7).bfloat16()
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 2] = -100
    loss = causal_lm_loss(logits, labels)
    assert loss.dtype == torch.float32
    lf, tgt = logits.float()[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1)
    keep = tgt != -100
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(lf[keep], tgt[keep]))
    all_ignored = torch.full((2, 5), -100)
    assert causal_lm_loss(logits, all_ignored).item() == 0.0
