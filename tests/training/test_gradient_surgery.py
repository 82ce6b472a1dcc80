"""Each surgery method's defining property on two conflicting objectives; config rule; state."""

import io

import pytest
import torch

from Ava.config import EnhancedTrainingConfig, SurgeryConfig, check_compatibility
from Ava.training.gradient_surgery import (
    GradientSurgery, GradNormWeights, cagrad, graddrop, mgda, pcgrad,
)


def _conflicting(p=8, seed=0):
    """Two gradients with a negative dot product (objectives pulling apart)."""
    g = torch.Generator().manual_seed(seed)
    g1 = torch.randn(p, generator=g, dtype=torch.float64)
    g2 = -0.5 * g1 + 0.3 * torch.randn(p, generator=g, dtype=torch.float64)
    assert g1 @ g2 < 0
    return torch.stack([g1, g2])


@pytest.mark.parametrize("seed", range(5))
def test_pcgrad_removes_conflicts(seed):
    grads = _conflicting(seed=seed)
    projected = pcgrad(grads, torch.Generator().manual_seed(seed))
    assert projected[0] @ grads[1] >= -1e-9 and projected[1] @ grads[0] >= -1e-9
    combined = projected.sum(0)
    assert (grads @ combined >= -1e-9).all()  # the update no longer hurts either objective
    aligned = torch.stack([grads[0], 2 * grads[0]])
    assert torch.allclose(pcgrad(aligned), aligned)  # no conflict: untouched


def test_mgda_is_the_min_norm_point_of_the_hull():
    grads = _conflicting(seed=1)
    d = mgda(grads)
    alphas = torch.linspace(0, 1, 10001, dtype=torch.float64)
    hull = alphas[:, None] * grads[0] + (1 - alphas[:, None]) * grads[1]
    assert d.norm() <= hull.norm(dim=1).min() + 1e-6
    assert (grads @ d >= d @ d - 1e-9).all()  # optimality: every g_i·d ≥ ‖d‖²
    three = torch.cat([grads, grads[:1] * -0.2 + 0.1])
    d3 = mgda(three)
    assert (three @ d3 >= d3 @ d3 - 1e-4).all()


def test_cagrad_stays_in_the_ball_and_improves_the_worst_term():
    grads = _conflicting(seed=2)
    g0 = grads.mean(0)
    for c in (0.2, 0.5, 1.0):
        d = cagrad(grads, c)
        assert (d - g0).norm() <= c * g0.norm() + 1e-6
        assert (grads @ d).min() >= (grads @ g0).min() - 1e-9
    assert torch.allclose(cagrad(grads, 0.0), g0)


def test_graddrop_keeps_one_sign_per_coordinate():
    grads = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    out = graddrop(grads, torch.Generator().manual_seed(1))
    pos, neg = grads.clamp(min=0).sum(0), grads.clamp(max=0).sum(0)
    assert torch.all(torch.isclose(out, pos) | torch.isclose(out, neg))  # sign purity
    agree = (grads > 0).all(0) | (grads < 0).all(0)
    assert torch.allclose(out[agree], grads.sum(0)[agree])  # no conflict: nothing dropped
    # the positive side is kept with probability P: check on a strongly positive coordinate set
    skewed = torch.stack([torch.full((2000,), 3.0), torch.full((2000,), -1.0)]).double()
    kept_positive = (graddrop(skewed, torch.Generator().manual_seed(2)) > 0).double().mean()
    assert kept_positive == pytest.approx(0.5 * (1 + 2 / 4), abs=0.05)


def test_gradnorm_weights_move_toward_equal_training_rates():
    weights = GradNormWeights(2, alpha=1.5, lr=0.05)
    grads = torch.stack([torch.ones(4), torch.ones(4)]).double()
    weights.combine(grads, torch.tensor([1.0, 1.0]))  # records the initial losses
    for _ in range(5):  # term 0 stalls, term 1 trains fast → term 0 must get more weight
        weights.combine(grads, torch.tensor([1.0, 0.5]))
    assert weights.weights[0] > 1.0 > weights.weights[1]
    assert weights.weights.sum() == pytest.approx(2.0)
    # equal rates, unequal gradient norms: the weights equalise w_i‖∇L_i‖
    balance = GradNormWeights(2, lr=0.05)
    uneven = torch.stack([torch.ones(4), 3 * torch.ones(4)]).double()
    for _ in range(20):
        balance.combine(uneven, torch.tensor([1.0, 1.0]))
    w = balance.weights
    assert abs(w[0] * 2 - w[1] * 6) < abs(1 * 2 - 1 * 6)


def test_surgery_state_round_trips_weights_only():
    surgery = GradientSurgery(SurgeryConfig(method="gradnorm"), seed=0)
    surgery.combine(_conflicting(), torch.tensor([2.0, 1.0]))
    buffer = io.BytesIO()
    torch.save(surgery.state_dict(), buffer)
    buffer.seek(0)
    twin = GradientSurgery(SurgeryConfig(method="gradnorm"), seed=5)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(twin.gradnorm.weights, surgery.gradnorm.weights)
    assert torch.equal(twin.generator.get_state(), surgery.generator.get_state())


def test_surgery_with_a_single_loss_term_is_an_error():
    cfg = EnhancedTrainingConfig.from_dict({"gradient": {"surgery": {"method": "pcgrad", "terms": ["lm_loss"]}}})
    errors = [i for i in check_compatibility(cfg) if i.severity == "error"]
    assert [i.key for i in errors] == ["gradient.surgery.method"]
    cfg = EnhancedTrainingConfig.from_dict({"gradient": {"surgery": {"method": "mgda"}},
                                            "model": {"moe": {"aux_loss_coef": 0.0}}})
    assert "gradient.surgery.terms" in [i.key for i in check_compatibility(cfg)]
