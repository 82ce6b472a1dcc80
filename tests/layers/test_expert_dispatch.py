"""The token dispatcher (layers/token_dispatcher.py): buffer layouts and both gathers' gradients."""

import dataclasses

import pytest
import torch

from Ava.layers.routing import RouterOutput, apply_capacity, route_expert_choice, route_topk
from Ava.layers.token_dispatcher import (
    BufferLayout,
    LocalDispatcher,
    combine,
    dispatch,
    gather_bmm_combine,
    gather_slots,
    plan_dispatch,
)

LAYOUTS = {  # the BufferLayout of the routing
    "exact": lambda routing: BufferLayout(),
    "rounded": lambda routing: BufferLayout(multiple=8),
    "fixed": lambda routing: BufferLayout(cap=int(routing.tokens_per_expert_E.max()) + 3),
    "uniform": lambda routing: BufferLayout(multiple=4, uniform=True),
}
ROUTINGS = ["dropless", "capacity", "expert-choice"]


def _routing(kind, T=29, E=5, D=12, K=2, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(T, D)
    if kind == "expert-choice":  # K = E slots per token, 0..E of them on
        return x, route_expert_choice(x, torch.randn(E, D), K, 1.0)
    routing = route_topk(x, torch.randn(E, D), K, True)
    return x, (apply_capacity(routing, 1.0) if kind == "capacity" else routing)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ROUTINGS)
def test_buffer_blocks_hold_each_experts_slots_then_zeros(layout, kind):
    x, routing = _routing(kind)
    plan = plan_dispatch(routing, LAYOUTS[layout](routing))
    buf = dispatch(x, plan)
    assert buf.shape == (plan.rows, x.shape[1])
    starts = (torch.cumsum(plan.counts_E, 0) - plan.counts_E).tolist()
    kept_TK = routing.mask_TK if routing.mask_TK is not None else torch.ones_like(routing.indices_TK, dtype=torch.bool)
    used = torch.zeros(plan.rows, dtype=torch.bool)
    for t in range(x.shape[0]):
        for k in range(routing.indices_TK.shape[1]):
            if not kept_TK[t, k]:
                continue
            row, e = int(plan.row_S[t * routing.indices_TK.shape[1] + k]), int(routing.indices_TK[t, k])
            assert starts[e] <= row < starts[e] + int(routing.tokens_per_expert_E[e])  # its expert's block, first rows
            assert not used[row]
            used[row] = True
            torch.testing.assert_close(buf[row], x[t], rtol=0, atol=0)
    assert (buf[~used] == 0).all()  # padding rows are zeros
    if layout == "fixed":
        assert (plan.counts_E == int(routing.tokens_per_expert_E.max()) + 3).all()
    if layout == "rounded":
        assert (plan.counts_E % 8 == 0).all() and (plan.counts_E >= routing.tokens_per_expert_E).all()
    assert plan.padded == bool((~used).any())


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ROUTINGS)
def test_dispatch_and_combine_gradients_match_autograd(layout, kind):
    """Both hand-written backwards equal autograd over a plain indexing reference; off slots get
    no gradient and contribute nothing."""
    x, routing = _routing(kind, seed=1)
    plan = plan_dispatch(routing, LAYOUTS[layout](routing))
    T, K = routing.indices_TK.shape
    weights = routing.weights_TK.clone().requires_grad_()
    plan = dataclasses.replace(plan, weights_TK=weights)
    scale = torch.randn(plan.rows, x.shape[1])  # a stand-in for the experts: any per-row function
    out_grad = torch.randn(T, x.shape[1])

    x1 = x.clone().requires_grad_()
    y1 = combine(dispatch(x1, plan) * scale, plan)
    (y1 * out_grad).sum().backward()

    x2 = x.clone().requires_grad_()
    w2 = routing.weights_TK.clone().requires_grad_()
    source = torch.cat([x2, torch.zeros(1, x.shape[1])])[plan.source_R] if plan.padded else x2[plan.source_R]
    slots_TKD = (source * scale)[plan.row_S].view(T, K, -1)
    if routing.mask_TK is not None:
        slots_TKD = slots_TKD * routing.mask_TK.unsqueeze(-1)
    y2 = (w2.unsqueeze(-1) * slots_TKD).sum(dim=1)
    (y2 * out_grad).sum().backward()

    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights.grad, w2.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_off_slots_pass_no_gradient_back_whatever_arrives(layout):
    """gather_slots alone, with an arbitrary upstream gradient (non-zero on off slots too): the
    buffer gets exactly the kept slots' gradients, rows of nobody's slot get zero."""
    x, routing = _routing("capacity", seed=2)
    plan = plan_dispatch(routing, LAYOUTS[layout](routing))
    y = torch.randn(plan.rows, x.shape[1], requires_grad=True)
    up = torch.randn(*routing.indices_TK.shape, x.shape[1])
    (gather_slots(y, plan) * up).sum().backward()
    want = torch.zeros_like(y)
    kept = routing.mask_TK.reshape(-1)
    want[plan.row_S[kept]] = up.reshape(-1, x.shape[1])[kept]
    assert (~kept).any()  # the capacity dropped some slots: the case under test
    torch.testing.assert_close(y.grad, want, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ROUTINGS)
def test_uniform_blocks_are_the_busiest_count_rounded_up(kind):
    _, routing = _routing(kind)
    plan = plan_dispatch(routing, BufferLayout(multiple=4, uniform=True))
    busiest = int(routing.tokens_per_expert_E.max())
    cap = -(-busiest // 4) * 4
    assert plan.counts_E.tolist() == [cap] * routing.tokens_per_expert_E.numel()
    assert plan.rows == cap * routing.tokens_per_expert_E.numel()


def test_cap_below_the_busiest_expert_is_an_error():
    _, routing = _routing("dropless")
    with pytest.raises(ValueError, match="busiest"):
        plan_dispatch(routing, BufferLayout(cap=int(routing.tokens_per_expert_E.max()) - 1))


def test_no_tokens_is_empty_both_ways():
    E, D, K = 4, 6, 2
    routing = route_topk(torch.randn(0, D), torch.randn(E, D), K, True)
    x = torch.randn(0, D, requires_grad=True)
    for layout in LAYOUTS.values():
        plan = plan_dispatch(routing, layout(routing))
        y = combine(dispatch(x, plan), plan)
        assert y.shape == (0, D)
        y.sum().backward()
        assert x.grad.shape == (0, D)


def test_every_slot_off_gives_zeros_and_zero_gradients():
    T, E, D, K = 4, 3, 6, 2
    routing = RouterOutput(
        indices_TK=torch.zeros(T, K, dtype=torch.long), weights_TK=torch.zeros(T, K),
        logits_TE=torch.zeros(T, E), probs_TE=torch.full((T, E), 1 / E),
        tokens_per_expert_E=torch.zeros(E, dtype=torch.long), mask_TK=torch.zeros(T, K, dtype=torch.bool),
    )
    x = torch.randn(T, D, requires_grad=True)
    weights = routing.weights_TK.clone().requires_grad_()
    plan = plan_dispatch(routing)
    plan = dataclasses.replace(plan, weights_TK=weights)
    y = combine(dispatch(x, plan), plan)
    assert plan.rows == 0 and (y == 0).all()
    y.sum().backward()
    assert (x.grad == 0).all() and (weights.grad == 0).all()


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_weighted_sum_matches_the_gathered_combine_in_bf16(layout):
    """The dropless combine (one embedding_bag) and the gathered one (the off-slot path) agree in
    bf16 to its rounding, values and both gradients, and weights without grad are fine."""
    x, routing = _routing("dropless", T=64, D=32, seed=3)
    plan = plan_dispatch(routing, LAYOUTS[layout](routing))
    y = torch.randn(plan.rows, x.shape[1]).bfloat16()
    out_grad = torch.randn(x.shape[0], x.shape[1]).bfloat16()
    results = []
    for fn in (combine, gather_bmm_combine):
        y_leaf = y.clone().requires_grad_()
        w_leaf = routing.weights_TK.clone().requires_grad_()
        out = fn(y_leaf, dataclasses.replace(plan, weights_TK=w_leaf))
        (out.float() * out_grad.float()).sum().backward()
        results.append((out.float(), y_leaf.grad.float(), w_leaf.grad))
    for new, old in zip(*results):
        torch.testing.assert_close(new, old, rtol=2e-2, atol=2e-2)
    grads = []
    for fn in (combine, gather_bmm_combine):  # routing weights without grad
        y_leaf = y.clone().requires_grad_()
        fn(y_leaf, plan).float().sum().backward()
        grads.append(y_leaf.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", ROUTINGS)
def test_local_dispatcher_is_plan_dispatch_and_combine(layout, kind):
    """The protocol's two calls are the plan, the gather and the combine above, and the counts
    handed to the kernel are the plan's block sizes (summing to the buffer's rows)."""
    x, routing = _routing(kind, seed=4)
    dispatcher = LocalDispatcher()
    rows, counts, plan = dispatcher.dispatch(x, routing, LAYOUTS[layout](routing))
    assert torch.equal(rows, dispatch(x, plan_dispatch(routing, LAYOUTS[layout](routing))))
    assert torch.equal(counts, plan.counts_E) and int(counts.sum()) == rows.shape[0] == plan.rows
    assert (counts >= routing.tokens_per_expert_E).all()
    y = torch.randn_like(rows)
    assert torch.equal(dispatcher.combine(y, plan), combine(y, plan))
