"""Top-k softmax router: fp32 under autocast, correct top-k, weights and counts."""

import torch

from Ava.layers import RouterOutput, TopKRouter, route_topk


def _router(top_k: int = 2, norm: bool = True) -> TopKRouter:
    torch.manual_seed(0)
    router = TopKRouter(hidden_size=16, num_experts=4, top_k=top_k, norm_topk_prob=norm)
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


def test_router_picks_top_k_of_softmax_and_renormalises():
    router = _router(top_k=2, norm=True)
    x = torch.randn(32, 16)
    out = router(x)
    assert isinstance(out, RouterOutput)
    probs = torch.softmax(x @ router.weight.t(), dim=-1)
    torch.testing.assert_close(out.probs_TE, probs)
    torch.testing.assert_close(out.logits_TE, x @ router.weight.t())
    top_p, top_i = probs.topk(2, dim=-1)
    assert torch.equal(out.indices_TK, top_i)
    torch.testing.assert_close(out.weights_TK, top_p / top_p.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights_TK.sum(-1), torch.ones(32))


def test_router_without_renormalisation_keeps_raw_probabilities():
    router = _router(top_k=2, norm=False)
    out = router(torch.randn(8, 16))
    torch.testing.assert_close(out.weights_TK, out.probs_TE.gather(1, out.indices_TK))
    assert (out.weights_TK.sum(-1) < 1).all()


def test_tokens_per_expert_counts_every_slot():
    router = _router(top_k=3)
    out = router(torch.randn(50, 16))
    assert out.tokens_per_expert_E.dtype == torch.long
    assert out.tokens_per_expert_E.sum().item() == 50 * 3
    assert torch.equal(out.tokens_per_expert_E, torch.bincount(out.indices_TK.flatten(), minlength=4))


def test_router_stays_fp32_under_bf16_autocast():
    router = _router()
    x = torch.randn(16, 16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = router(x.bfloat16())
    for t in (out.logits_TE, out.probs_TE, out.weights_TK):
        assert t.dtype == torch.float32
    # Same decision as an fp32 router on the bf16-rounded input.
    ref = route_topk(x.bfloat16().float(), router.weight, 2)
    torch.testing.assert_close(out.probs_TE, ref.probs_TE)
    assert torch.equal(out.indices_TK, ref.indices_TK)


def test_router_output_is_frozen():
    out = _router()(torch.randn(4, 16))
    try:
        out.indices_TK = None  # type: ignore[misc]
    except AttributeError:
        return
    raise AssertionError("RouterOutput must be a frozen dataclass")
