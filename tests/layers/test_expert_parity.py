"""Every expert kernel, layout, dispatcher and decode path agrees with an independent reference.

The reference (:func:`reference_experts`) is the routed-experts math without any dispatch: one
masked SwiGLU per expert over the tokens that chose it, weighted and added back per token in
fp32. Nothing in it is shared with the layer, so a bug in the dispatcher or the combine shows.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from Ava.config import ModelConfig
from Ava.layers import (
    BufferLayout,
    DispatchPlan,
    ExpertKernel,
    Experts,
    MoEBlock,
    RouterOutput,
    kernel_for,
    routed_experts,
)
from Ava.layers.expert_kernels import grouped_kernel, grouped_mm_aligned, loop_kernel
from Ava.layers.kernels import batched_autograd_kernel, experts_gathered, experts_slots
from Ava.layers.routing import apply_capacity, route_expert_choice, route_topk
from tests.helpers import assert_bf16_param_grads_close


def reference_experts(x_TD, routing, gate_up_proj_EFD, down_proj_EDI):
    """(T, D) -> (T, D): ``Σ_k w_tk · expert_{i_tk}(x_t)`` over the slots that are on, dispatch-free."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x_TD.dtype
    x_TD = x_TD.to(dtype)
    inter = down_proj_EDI.shape[-1]
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32)
    for e in range(gate_up_proj_EFD.shape[0]):
        chosen_TK = routing.indices_TK == e
        if routing.mask_TK is not None:
            chosen_TK = chosen_TK & routing.mask_TK
        tok_N, slot_N = torch.where(chosen_TK)  # N = the slots expert e computes
        h_NF = x_TD[tok_N] @ gate_up_proj_EFD[e].to(dtype).t()  # (N, 2I)
        y_ND = (F.silu(h_NF[:, :inter]) * h_NF[:, inter:]) @ down_proj_EDI[e].to(dtype).t()  # (N, D)
        out_TD = out_TD.index_add(0, tok_N, y_ND.float() * routing.weights_TK[tok_N, slot_N].unsqueeze(-1))
    return out_TD.to(dtype)


# --------------------------------------------------------------------------------------------
# the MoE block: every backend against the reference
# --------------------------------------------------------------------------------------------

BACKENDS = ["loop", "grouped", "batched", "auto"]


def _block(top_k: int, num_experts: int = 8, seed: int = 0, **moe) -> MoEBlock:
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_experts=num_experts,
        moe={"top_k": top_k, "moe_intermediate_size": 24, **moe},
    )
    torch.manual_seed(seed)
    block = MoEBlock(cfg)
    torch.nn.init.normal_(block.gate.weight, std=0.5)
    return block


def _fwd_bwd(block: MoEBlock, backend: str, x, grad_out, autocast: bool = False):
    """Output, routing, input gradient and parameter gradients; ``reference`` runs the block's
    router and shared experts around :func:`reference_experts`."""
    block.zero_grad(set_to_none=True)
    block.experts.backend = "loop" if backend == "reference" else backend
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if backend == "reference":
            x_ND = x.reshape(-1, x.shape[-1])
            routing = block.gate(x_ND)
            y_ND = reference_experts(x_ND, routing, block.experts.gate_up_proj, block.experts.down_proj)
            if block.shared_experts is not None:
                y_ND = y_ND + block.shared_experts(x_ND)
            hidden = y_ND.view(x.shape)
        else:
            out = block(x)
            hidden, routing = out.hidden_states, out.routing
    (hidden.float() * grad_out).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    return hidden.detach(), routing, x.grad.clone(), grads


def _assert_same(ref, got, **tol):
    (out_r, _, gx_r, gp_r), (out_g, _, gx_g, gp_g) = ref, got
    torch.testing.assert_close(out_g.float(), out_r.float(), **tol)
    torch.testing.assert_close(gx_g, gx_r, **tol)
    assert set(gp_g) == set(gp_r)
    for name in gp_r:
        torch.testing.assert_close(gp_g[name], gp_r[name], **tol, msg=name)


CASES = {
    "top1": dict(top_k=1),
    "top2": dict(top_k=2),
    "top8": dict(top_k=8),
    "top2+shared": dict(top_k=2, num_shared_experts=2),
    "top2+capacity": dict(top_k=2, capacity_factor=0.5),
    "top1+capacity+shared": dict(top_k=1, capacity_factor=0.75, num_shared_experts=1),
    "sigmoid+groups": dict(top_k=2, router="sigmoid", n_groups=4, topk_groups=2, routed_scaling_factor=2.5),
    "expert_choice": dict(top_k=2, router="expert_choice", capacity_factor=1.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_backend_matches_reference_fp32(case, backend):
    block = _block(**CASES[case])
    torch.manual_seed(1)
    x, g = torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    ref = _fwd_bwd(block, "reference", x, g)
    _assert_same(ref, _fwd_bwd(block, backend, x, g), atol=1e-5, rtol=1e-5)
    assert ref[3]["gate.weight"].abs().sum() > 0  # the router learns through the gate weights
    if "shared" in case:
        assert ref[3]["shared_experts.gate_proj.weight"].abs().sum() > 0


# bf16 keeps 8 mantissa bits (relative rounding 2^-8 ≈ 0.4%); all backends round at the same
# places but sum in different orders, so they agree to a few bf16 ulps (2e-2 abs/rel on outputs
# of size ~1; weight gradients within 3% of their largest entry).
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["top1", "top2", "top8", "top2+capacity", "expert_choice"])
def test_backend_matches_reference_bf16(case, backend):
    block = _block(**CASES[case])
    torch.manual_seed(4)
    x, g = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    out_r, _, gx_r, gp_r = _fwd_bwd(block, "reference", x, g, autocast=True)
    out_g, _, gx_g, gp_g = _fwd_bwd(block, backend, x, g, autocast=True)
    assert out_g.dtype == torch.bfloat16
    torch.testing.assert_close(out_g.float(), out_r.float(), **BF16_TOL)
    torch.testing.assert_close(gx_g, gx_r, **BF16_TOL)
    assert_bf16_param_grads_close(gp_g, gp_r)


def test_bf16_is_close_to_fp32():
    block = _block(top_k=2)
    torch.manual_seed(3)
    x, g = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    y32 = _fwd_bwd(block, "grouped", x, g)[0]
    y16 = _fwd_bwd(block, "grouped", x, g, autocast=True)[0]
    torch.testing.assert_close(y16.float(), y32, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropped_slots_are_the_same_and_contribute_nothing(backend):
    block = _block(top_k=1, capacity_factor=0.5)
    torch.manual_seed(2)
    x = torch.randn(1, 32, 32)
    block.experts.backend = backend
    out = block(x)
    routing = out.routing
    assert routing.dropped_E.sum() > 0
    dropped_tokens = ~routing.mask_TK[:, 0]
    # A token whose only slot was dropped gets exactly zero from the MoE (residual passes through).
    assert out.hidden_states.view(32, 32)[dropped_tokens].abs().max() == 0
    assert (out.hidden_states.view(32, 32)[~dropped_tokens].abs().sum(-1) > 0).all()
    # Capacity is decided before the experts run, so every backend drops these same slots.
    assert torch.equal(_block(top_k=1, capacity_factor=0.5).gate(x.view(32, 32)).mask_TK, routing.mask_TK)


@pytest.mark.parametrize("backend", ["grouped", "batched"])
def test_busy_and_idle_experts(backend):
    # Biased router: most tokens on one expert, several experts idle (empty and max-size blocks).
    block = _block(top_k=2)
    with torch.no_grad():
        block.gate.weight[0] += 3.0 * block.gate.weight[0].sign()
    torch.manual_seed(3)
    x, g = torch.randn(1, 40, 32), torch.randn(1, 40, 32)
    x = x + block.gate.weight[0] * 0.5
    ref = _fwd_bwd(block, "reference", x, g)
    assert (ref[1].tokens_per_expert_E == 0).any()
    got = _fwd_bwd(block, backend, x, g)
    _assert_same(ref, got, atol=1e-5, rtol=1e-5)
    assert got[3]["experts.gate_up_proj"][ref[1].tokens_per_expert_E == 0].abs().sum() == 0  # idle: zero grad


def test_backward_accepts_an_expanded_gradient():
    # `y.sum().backward()` hands an expanded gradient; _grouped_mm's CPU backward rejects those
    # unless the kernel feeds it through an op with a fresh gradient.
    block = _block(top_k=2)
    x = torch.randn(1, 8, 32, requires_grad=True)
    block(x).hidden_states.sum().backward()
    assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------------------------
# kernels and layouts, called directly
# --------------------------------------------------------------------------------------------


def _weights(E=6, D=16, inter=24, seed=0):
    torch.manual_seed(seed)
    return (0.2 * torch.randn(E, 2 * inter, D)).requires_grad_(), (0.2 * torch.randn(E, D, inter)).requires_grad_()


def _fwd_bwd_fn(fn, x, routing, gate_up, down):
    for t in (x, gate_up, down):
        t.grad = None
    y = fn(x, routing, gate_up, down)
    (y * torch.linspace(-1, 1, x.shape[1])).pow(2).sum().backward()
    return [y.detach()] + [t.grad.clone() for t in (x, gate_up, down)]


KERNELS_AND_LAYOUTS = {
    "loop exact": ExpertKernel("loop", loop_kernel),
    "loop rounded": ExpertKernel("loop", loop_kernel, BufferLayout(multiple=8)),
    "grouped exact": ExpertKernel("grouped", grouped_kernel),
    "grouped rounded": ExpertKernel("grouped", grouped_kernel, BufferLayout(multiple=8)),
    "grouped fixed": ExpertKernel("grouped", grouped_kernel, BufferLayout(cap=40)),
    "batched uniform": ExpertKernel("batched", batched_autograd_kernel, BufferLayout(multiple=8, uniform=True)),
    "batched fixed": ExpertKernel("batched", batched_autograd_kernel, BufferLayout(cap=40)),
}


@pytest.mark.parametrize("capacity", [None, 1.0])
@pytest.mark.parametrize("name", sorted(KERNELS_AND_LAYOUTS))
def test_every_kernel_and_layout_matches_reference(name, capacity):
    """Padding rows (to a multiple, the busiest count or a fixed cap) change nothing: the
    reference's output and gradients, checked in fp32."""
    gate_up, down = _weights()
    x = torch.randn(37, 16, requires_grad=True)
    routing = route_topk(x.detach(), torch.randn(6, 16), 2, True)
    if capacity is not None:
        routing = apply_capacity(routing, capacity)
        assert routing.mask_TK is not None
    kernel = KERNELS_AND_LAYOUTS[name]
    got = _fwd_bwd_fn(lambda *a: routed_experts(*a, kernel=kernel), x, routing, gate_up, down)
    want = _fwd_bwd_fn(reference_experts, x, routing, gate_up, down)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inter", [24, 3])  # 3 fp32 = 12-byte rows: _grouped_mm rejects them, grouped loops
def test_grouped_kernel_and_its_fallback_match_reference(inter):
    gate_up, down = _weights(E=5, inter=inter, seed=1)
    x = torch.randn(29, 16, requires_grad=True)
    routing = route_topk(x.detach(), torch.randn(5, 16), 2, True)
    assert grouped_mm_aligned(x, inter) == (inter == 24)
    want = _fwd_bwd_fn(reference_experts, x, routing, gate_up, down)
    for name in ("loop", "grouped", "batched"):
        kernel = kernel_for(name, "cpu", torch.float32)
        got = _fwd_bwd_fn(lambda *a, k=kernel: routed_experts(*a, kernel=k), x, routing, gate_up, down)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------
# another dispatcher: kernels see only rows and counts
# --------------------------------------------------------------------------------------------


class ReversedPlainDispatcher:
    """A dispatcher written independently of :class:`LocalDispatcher`: each expert's slots in
    reverse token order, blocks laid out as the kernel asks, plain autograd both ways (an index
    gather in, an index-add out) and its own plan."""

    calls = 0

    def dispatch(self, x_TD, routing, layout=BufferLayout()):
        self.calls += 1
        T, K = routing.indices_TK.shape
        E = routing.tokens_per_expert_E.numel()
        on_TK = routing.mask_TK if routing.mask_TK is not None else torch.ones(T, K, dtype=torch.bool)
        slots = [[(t, k) for t in reversed(range(T)) for k in range(K)
                  if on_TK[t, k] and routing.indices_TK[t, k] == e] for e in range(E)]
        counts = [len(s) for s in slots]
        if layout.cap is not None:
            blocks = [layout.cap] * E
        elif layout.uniform:
            blocks = [max(-(-max(counts) // layout.multiple) * layout.multiple, layout.multiple)] * E
        else:
            blocks = [-(-c // layout.multiple) * layout.multiple for c in counts]
        source, token, slot, row = [], [], [], []
        for e in range(E):
            for t, k in slots[e]:
                token.append(t), slot.append(k), row.append(len(source))
                source.append(t)
            source += [T] * (blocks[e] - counts[e])  # padding rows read a zero row
        rows_RD = torch.cat([x_TD, x_TD.new_zeros(1, x_TD.shape[1])])[torch.tensor(source, dtype=torch.long)]
        plan = {"token": torch.tensor(token, dtype=torch.long), "slot": torch.tensor(slot, dtype=torch.long),
                "row": torch.tensor(row, dtype=torch.long), "weights_TK": routing.weights_TK, "T": T}
        return rows_RD, torch.tensor(blocks), plan

    def combine(self, y_RD, plan):
        w_U1 = plan["weights_TK"][plan["token"], plan["slot"]].unsqueeze(-1)
        out_TD = torch.zeros(plan["T"], y_RD.shape[1], dtype=torch.float32)
        return out_TD.index_add(0, plan["token"], y_RD[plan["row"]].float() * w_U1).to(y_RD.dtype)


@pytest.mark.parametrize("kind", ["dropless", "capacity", "expert-choice"])
@pytest.mark.parametrize("backend", ["loop", "grouped", "batched"])
def test_kernels_work_under_another_dispatcher(backend, kind):
    torch.manual_seed(5)
    experts = Experts(6, 16, 24, backend=backend, dispatcher=ReversedPlainDispatcher())
    x = torch.randn(23, 16, requires_grad=True)
    gate = torch.randn(6, 16)
    if kind == "expert-choice":
        routing = route_expert_choice(x.detach(), gate, 2, 1.0)
    else:
        routing = route_topk(x.detach(), gate, 2, True)
        routing = apply_capacity(routing, 0.75) if kind == "capacity" else routing
    got = _fwd_bwd_fn(lambda x_, r, *_: experts(x_, r), x, routing, experts.gate_up_proj, experts.down_proj)
    want = _fwd_bwd_fn(reference_experts, x, routing, experts.gate_up_proj, experts.down_proj)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # few slots without autograd: decode paths need the local dispatcher, the kernel runs
        one = route_topk(x[:1].detach(), gate, 2, True)
        calls = experts.dispatcher.calls
        y = experts(x[:1], one)
        assert experts.dispatcher.calls == calls + 1
        torch.testing.assert_close(y, reference_experts(x[:1], one, experts.gate_up_proj, experts.down_proj))


def test_plan_is_frozen():
    assert dataclasses.is_dataclass(DispatchPlan) and DispatchPlan.__dataclass_params__.frozen


# --------------------------------------------------------------------------------------------
# decode fast paths
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens, top_k", [(1, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("path", [experts_slots, experts_gathered])
def test_decode_fast_paths_match_reference(tokens, top_k, path):
    """Inference on few slots reads only the chosen experts; same result as the reference."""
    torch.manual_seed(0)
    experts = Experts(32, 32, 48)
    x = torch.randn(tokens, 32)
    routing = route_topk(x, torch.randn(32, 32), top_k, True)
    with torch.no_grad():
        fast = path(x, routing, experts.gate_up_proj, experts.down_proj)
        reference = reference_experts(x, routing, experts.gate_up_proj, experts.down_proj)
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)


def test_experts_take_the_decode_path_only_without_autograd():
    torch.manual_seed(0)
    experts = Experts(32, 32, 48)
    x = torch.randn(3, 32)
    routing = route_topk(x, torch.randn(32, 32), 2, True)  # 6 slots < 32 experts: slots on CPU
    with torch.no_grad():
        assert torch.equal(experts(x, routing), experts_slots(x, routing, experts.gate_up_proj, experts.down_proj))
    with torch.enable_grad():
        y = experts(x, routing)
    assert y.requires_grad  # the training kernels ran
    torch.testing.assert_close(y.detach(), reference_experts(x, routing, experts.gate_up_proj, experts.down_proj))


def test_every_slot_off_gives_zeros():
    T, E, D = 4, 3, 8
    routing = RouterOutput(
        indices_TK=torch.zeros(T, 2, dtype=torch.long), weights_TK=torch.zeros(T, 2),
        logits_TE=torch.zeros(T, E), probs_TE=torch.full((T, E), 1 / E),
        tokens_per_expert_E=torch.zeros(E, dtype=torch.long), mask_TK=torch.zeros(T, 2, dtype=torch.bool),
    )
    for backend in ("loop", "grouped", "batched"):
        experts = Experts(E, D, 4, backend=backend)
        x = torch.randn(T, D, requires_grad=True)
        y = experts(x, routing)
        assert (y == 0).all()
        y.sum().backward()
        assert (x.grad == 0).all()
