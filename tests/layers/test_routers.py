"""Every router's defining property, capacity dropping, and fp32 under autocast."""

import math

import pytest
import torch

from Ava.layers import (
    Router,
    RouterOutput,
    apply_capacity,
    expert_capacity,
    group_limited_mask,
    hash_experts,
    route_topk,
)
from Ava.layers.routing import count_per_expert
from Ava.losses.balancing import load_balancing_loss

D, E = 16, 8


def _router(kind: str = "softmax", top_k: int = 2, **kw) -> Router:
    torch.manual_seed(0)
    router = Router(D, E, top_k, kind=kind, **kw)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


def test_sigmoid_weights_sum_to_scaling_factor_and_select_top_scores():
    router = _router("sigmoid", top_k=3, routed_scaling_factor=2.5)
    x = torch.randn(40, D)
    out = router(x)
    scores = torch.sigmoid(x @ router.weight.t())
    assert torch.equal(out.indices_TK, scores.topk(3, dim=-1).indices)
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.full((40,), 2.5))
    sel = scores.gather(1, out.indices_TK)
    torch.testing.assert_close(out.weights_TK, 2.5 * sel / sel.sum(-1, keepdim=True))
    torch.testing.assert_close(out.probs_TE.sum(-1), torch.ones(40))  # normalised affinities


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
def test_bias_changes_selection_but_not_weights(kind):
    router = _router(kind, top_k=2, aux_free_bias=True, norm_topk_prob=False)
    x = torch.randn(64, D)
    before = router(x)
    router.expert_bias[3] = 10.0  # expert 3 now wins every selection
    after = router(x)
    assert (after.indices_TK == 3).any(dim=-1).all()
    assert not torch.equal(before.indices_TK, after.indices_TK)
    # The weights are the unbiased scores of whatever was selected.
    scores = torch.sigmoid(after.logits_TE) if kind == "sigmoid" else after.probs_TE
    torch.testing.assert_close(after.weights_TK, scores.gather(1, after.indices_TK))
    torch.testing.assert_close(after.logits_TE, before.logits_TE)
    assert "expert_bias" in dict(router.named_buffers())


def test_switch_is_top1_with_raw_probability():
    router = _router("switch", top_k=1)
    x = torch.randn(20, D)
    out = router(x)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    assert out.indices_TK.shape == (20, 1)
    torch.testing.assert_close(out.weights_TK[:, 0], probs.max(-1).values)


def test_noisy_topk_is_noisy_in_training_and_deterministic_in_eval():
    router = _router("noisy_topk", top_k=2)
    assert "noise_weight" in dict(router.named_parameters())
    x = torch.randn(64, D)
    router.train()
    a, b = router(x), router(x)
    assert not torch.equal(a.probs_TE, b.probs_TE)
    torch.testing.assert_close(a.logits_TE, b.logits_TE)  # clean logits reported
    router.eval()
    c, d = router(x), router(x)
    assert torch.equal(c.indices_TK, d.indices_TK) and torch.equal(c.weights_TK, d.weights_TK)
    ref = route_topk(x, router.weight, 2)
    torch.testing.assert_close(c.weights_TK, ref.weights_TK)
    # The noise std is softplus(x·W_noise), so the noise weights learn.
    router.train()
    out = router(x)
    (out.weights_TK * torch.randn_like(out.weights_TK)).sum().backward()
    assert router.noise_weight.grad.abs().sum() > 0


def test_expert_choice_gives_every_expert_exactly_c_tokens():
    router = _router("expert_choice", top_k=2, capacity_factor=1.0)
    x = torch.randn(32, D)
    out = router(x)
    c = expert_capacity(32, 2, E, 1.0)
    assert c == 8
    assert out.indices_TK.shape == (32, E) and out.mask_TK.shape == (32, E)
    assert torch.equal(out.mask_TK.sum(0), torch.full((E,), c))
    assert torch.equal(out.tokens_per_expert_E, torch.full((E,), c))
    # Expert e took its c highest-probability tokens.
    for e in range(E):
        top = set(out.probs_TE[:, e].topk(c).indices.tolist())
        assert set(torch.where(out.mask_TK[:, e])[0].tolist()) == top
    assert (out.weights_TK[~out.mask_TK] == 0).all()
    per_token = out.mask_TK.sum(1)
    assert per_token.min() >= 0 and per_token.sum() == E * c  # tokens get 0..E experts


def test_hash_depends_on_token_id_only():
    router = _router("hash", top_k=2)
    ids = torch.tensor([5, 9, 5, 123, 9, 5])
    out1 = router(torch.randn(6, D), ids)
    out2 = router(torch.randn(6, D), ids)
    assert torch.equal(out1.indices_TK, out2.indices_TK)  # hidden states do not matter
    assert torch.equal(out1.indices_TK[0], out1.indices_TK[2])  # same id -> same experts
    assert torch.equal(out1.indices_TK, hash_experts(ids, E, 2))
    assert (out1.indices_TK[:, 0] != out1.indices_TK[:, 1]).all()
    # Spread: ids 0..4095 fill every expert within 10% of uniform.
    counts = torch.bincount(hash_experts(torch.arange(4096), E, 1).flatten(), minlength=E)
    assert counts.min() > 0.9 * 4096 / E
    with pytest.raises(ValueError, match="token ids"):
        router(torch.randn(6, D))


def test_group_limited_picks_only_from_top_groups():
    router = _router("sigmoid", top_k=2, n_groups=4, topk_groups=2)
    x = torch.randn(50, D)
    out = router(x)
    scores = torch.sigmoid(out.logits_TE).view(50, 4, 2)  # (T, G, E/G)
    group_score = scores.sum(-1)  # top-2 of 2 experts = both
    top_groups = group_score.topk(2, dim=-1).indices  # (T, 2)
    chosen_groups = out.indices_TK // 2
    for t in range(50):
        assert set(chosen_groups[t].tolist()) <= set(top_groups[t].tolist())
    # And group limiting matters: without it some token picks outside its top groups.
    free = _router("sigmoid", top_k=2)(x)
    outside = [(not set((free.indices_TK[t] // 2).tolist()) <= set(top_groups[t].tolist())) for t in range(50)]
    assert any(outside)


def test_group_limited_mask_hand_case():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.2, 0.5, 0.0]])  # 3 groups of 2: sums 1.7, 0.3, 0.5
    mask = group_limited_mask(scores, n_groups=3, topk_groups=2)
    assert mask.tolist() == [[True, True, False, False, True, True]]


def test_capacity_drops_overflow_in_priority_order():
    # T=6, K=1, E=2, CF=1 -> C = 3; five tokens want expert 0: tokens 0,1,2 keep, 3,4 drop.
    indices = torch.tensor([[0], [0], [1], [0], [0], [0]])
    routing = RouterOutput(indices, torch.ones(6, 1), torch.zeros(6, 2), torch.full((6, 2), 0.5),
                           torch.tensor([5, 1]))
    out = apply_capacity(routing, 1.0)
    assert out.mask_TK[:, 0].tolist() == [True, True, True, True, False, False]
    assert out.tokens_per_expert_E.tolist() == [3, 1] and out.dropped_E.tolist() == [2, 0]
    assert out.weights_TK[4:].abs().sum() == 0
    assert out.routed_per_expert_E.tolist() == [5, 1]


def test_capacity_keeps_first_choices_before_second_choices():
    # K=2, E=2, T=4, CF=0.5 -> C = 2. Expert 0 is everyone's 2nd choice except token 3's 1st.
    indices = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1]])
    routing = RouterOutput(indices, torch.ones(4, 2), torch.zeros(4, 2), torch.full((4, 2), 0.5),
                           torch.tensor([4, 4]))
    out = apply_capacity(routing, 0.5)
    # Expert 1 (C=2): first choices of tokens 0, 1 kept; token 2's first and token 3's second dropped.
    # Expert 0: token 3's first choice ranks ahead of every second choice, then token 0's second.
    assert out.mask_TK[:, 0].tolist() == [True, True, False, True]
    assert out.mask_TK[:, 1].tolist() == [True, False, False, False]
    assert out.tokens_per_expert_E.tolist() == [2, 2] and out.dropped_E.tolist() == [2, 2]


def test_eval_capacity_factor_applies_in_eval_mode():
    router = _router("softmax", top_k=2, capacity_factor=0.5, eval_capacity_factor=4.0)
    x = torch.randn(64, D)
    router.train()
    assert router(x).dropped_E.sum() > 0
    router.eval()
    out = router(x)
    assert out.mask_TK is None and out.dropped_E is None  # C ≥ T: nothing can overflow


@pytest.mark.parametrize("kind", ["softmax", "sigmoid", "switch", "noisy_topk", "expert_choice", "hash"])
def test_every_router_is_fp32_under_bf16_autocast(kind):
    kw = {"capacity_factor": 1.0} if kind == "expert_choice" else {}
    router = _router(kind, top_k=1 if kind == "switch" else 2, **kw)
    x = torch.randn(16, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x.bfloat16(), torch.arange(16))
    for t in (out.logits_TE, out.probs_TE, out.weights_TK):
        assert t.dtype == torch.float32
    assert math.isfinite(out.weights_TK.sum().item())


def test_bias_update_moves_toward_underloaded_experts():
    router = _router("sigmoid", aux_free_bias=True)
    router.update_bias(torch.tensor([10, 0, 5, 5, 5, 5, 5, 5]), rate=1e-3)
    assert router.expert_bias[0] == pytest.approx(-1e-3) and router.expert_bias[1] == pytest.approx(1e-3)
    assert router.expert_bias[2:].abs().max() == 0  # exactly at the mean (5): sign 0


def test_counts_are_bincount_without_calling_it(monkeypatch):
    """Tokens per expert come from an integer scatter-add (no host sync on a GPU): the same
    counts as ``bincount``, which no router calls."""
    torch.manual_seed(1)
    for num_experts, shape in [(8, (50, 2)), (64, (333, 8)), (5, (0, 2)), (3, (7, 1))]:
        indices = torch.randint(0, num_experts, shape)
        got = count_per_expert(indices, num_experts)
        assert got.dtype == torch.long
        assert torch.equal(got, torch.bincount(indices.flatten(), minlength=num_experts))
    real_bincount = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("bincount syncs with the host on a GPU"))
    for kind in ("softmax", "sigmoid", "switch", "noisy_topk", "hash"):
        top_k = 1 if kind == "switch" else 2
        out = _router(kind, top_k=top_k)(torch.randn(40, D), torch.arange(40))
        assert torch.equal(out.tokens_per_expert_E, real_bincount(out.indices_TK.flatten(), minlength=E))
        dropping = _router(kind, top_k=top_k, capacity_factor=0.5)(torch.randn(40, D), torch.arange(40))
        assert torch.equal(dropping.routed_per_expert_E, real_bincount(dropping.indices_TK.flatten(), minlength=E))
    probs = torch.softmax(torch.randn(40, E), dim=-1)
    indices = probs.topk(2, dim=-1).indices
    assert torch.equal(load_balancing_loss(probs, indices),  # counts itself without bincount
                       load_balancing_loss(probs, indices, real_bincount(indices.flatten(), minlength=E)))


# -- the unbiased top-k the sequence-wise / global balancing losses count --------------------


def test_unbiased_indices_are_none_without_bias_or_groups():
    out = _router()(torch.randn(32, D))
    assert out.balance_indices_TK is None
    assert out.unbiased_indices_TK is out.indices_TK


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_unbiased_indices_ignore_the_bias_and_the_group_limit(kind):
    router = _router(kind, aux_free_bias=True, n_groups=4, topk_groups=1)
    router.expert_bias[0] = 10.0  # every token's biased choice includes expert 0 (and group 0)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(3))
    out = apply_capacity(router(x), 1.0)  # capacity keeps the unbiased choice
    affinity_TE = out.logits_TE.sigmoid() if kind == "sigmoid" else out.probs_TE
    assert torch.equal(out.unbiased_indices_TK, affinity_TE.topk(2, dim=-1).indices)
    assert (out.indices_TK == 0).any(dim=-1).all()
    assert not torch.equal(out.unbiased_indices_TK, out.indices_TK)
