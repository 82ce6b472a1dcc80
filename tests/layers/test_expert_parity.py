"""Every expert backend agrees with `loop`: top-1/2/8, shared experts, capacity dropping, bf16."""

import pytest
import torch

from Ava.config import ModelConfig
from Ava.layers import EXPERT_BACKENDS, MoEBlock, resolve_backend
from tests.helpers import assert_bf16_param_grads_close

BACKENDS = ["batched", "grouped"]


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
    block.zero_grad(set_to_none=True)
    block.experts.backend = backend
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = block(x)
    (out.hidden_states.float() * grad_out).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters() if p.grad is not None}
    return out, x.grad.clone(), grads


def _assert_same(ref, got, **tol):
    (out_r, gx_r, gp_r), (out_g, gx_g, gp_g) = ref, got
    torch.testing.assert_close(out_g.hidden_states.float(), out_r.hidden_states.float(), **tol)
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
def test_backend_matches_loop_fp32(case, backend):
    block = _block(**CASES[case])
    torch.manual_seed(1)
    x, g = torch.randn(2, 24, 32), torch.randn(2, 24, 32)
    ref = _fwd_bwd(block, "loop", x, g)
    got = _fwd_bwd(block, backend, x, g)
    _assert_same(ref, got, atol=1e-5, rtol=1e-5)
    assert ref[2]["gate.weight"].abs().sum() > 0  # the router learns through the gate weights
    if "shared" in case:
        assert ref[2]["shared_experts.gate_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("backend", ["loop", *BACKENDS])
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
    loop_routing = _block(top_k=1, capacity_factor=0.5).gate(x.view(32, 32))
    assert torch.equal(loop_routing.mask_TK, routing.mask_TK)


def test_busy_and_idle_experts_batched():
    # Biased router: most tokens on one expert, several experts idle (empty and max-size blocks).
    block = _block(top_k=2)
    with torch.no_grad():
        block.gate.weight[0] += 3.0 * block.gate.weight[0].sign()
    torch.manual_seed(3)
    x, g = torch.randn(1, 40, 32), torch.randn(1, 40, 32)
    x = x + block.gate.weight[0] * 0.5
    ref = _fwd_bwd(block, "loop", x, g)
    assert (ref[0].routing.tokens_per_expert_E == 0).any()
    _assert_same(ref, _fwd_bwd(block, "batched", x, g), atol=1e-5, rtol=1e-5)


# bf16 keeps 8 mantissa bits (relative rounding 2^-8 ≈ 0.4%); all backends round at the same
# places but sum in different orders, so they agree to a few bf16 ulps (2e-2 abs/rel on outputs
# of size ~1; weight gradients within 3% of their largest entry).
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["top1", "top2", "top8", "top2+capacity"])
def test_backend_matches_loop_bf16(case, backend):
    block = _block(**CASES[case])
    torch.manual_seed(4)
    x, g = torch.randn(2, 16, 32), torch.randn(2, 16, 32)
    out_r, gx_r, gp_r = _fwd_bwd(block, "loop", x, g, autocast=True)
    out_g, gx_g, gp_g = _fwd_bwd(block, backend, x, g, autocast=True)
    assert out_g.hidden_states.dtype == torch.bfloat16
    torch.testing.assert_close(out_g.hidden_states.float(), out_r.hidden_states.float(), **BF16_TOL)
    torch.testing.assert_close(gx_g, gx_r, **BF16_TOL)
    assert_bf16_param_grads_close(gp_g, gp_r)


def test_auto_resolves_to_a_concrete_backend():
    assert resolve_backend("auto") == ("grouped" if hasattr(torch, "_grouped_mm") else "batched")
    assert resolve_backend("loop") == "loop"
    block = _block(top_k=2, backend="auto")
    assert block.experts.backend == "auto"
    torch.manual_seed(5)
    x = torch.randn(1, 8, 32)
    y_auto = block(x).hidden_states
    block.experts.backend = "loop"
    torch.testing.assert_close(y_auto, block(x).hidden_states, atol=1e-5, rtol=1e-5)
    assert set(EXPERT_BACKENDS) == {"loop", "batched", "grouped"}


@pytest.mark.parametrize("tokens, top_k", [(1, 1), (1, 2), (3, 2)])
@pytest.mark.parametrize("path", ["slots", "gathered"])
def test_decode_fast_paths_match_loop(tokens, top_k, path):
    """Inference on few slots reads only the chosen experts; same result as loop."""
    from Ava.layers.experts import DECODE_PATHS, Experts, experts_loop
    from Ava.layers.routing import route_topk

    torch.manual_seed(0)
    experts = Experts(32, 32, 48)
    gate = torch.randn(32, 32)
    x = torch.randn(tokens, 32)
    routing = route_topk(x, gate, top_k, True)
    with torch.no_grad():
        fast = DECODE_PATHS[path](x, routing, experts.gate_up_proj, experts.down_proj)
        reference = experts_loop(x, routing, experts.gate_up_proj, experts.down_proj)
    assert torch.allclose(fast, reference, atol=1e-5)


def test_decode_path_rule():
    from Ava.layers.experts import Experts, decode_path, experts_slots
    from Ava.layers.routing import route_topk

    torch.manual_seed(0)
    x = torch.randn(3, 32)
    routing = route_topk(x, torch.randn(32, 32), 2, True)  # 6 slots
    with torch.no_grad():
        assert decode_path(x, routing, 32) == "slots"  # CPU, fewer slots than experts
        assert decode_path(x, routing, 6) is None  # as many slots as experts: the backend
        assert decode_path(x.to("meta"), routing, 24) == "gathered"  # accelerators: ≤ E/4 slots
        assert decode_path(x.to("meta"), routing, 23) is None
        experts = Experts(32, 32, 48)
        torch.testing.assert_close(experts(x, routing),
                                   experts_slots(x, routing, experts.gate_up_proj, experts.down_proj))
    assert decode_path(x, routing, 32) is None  # with autograd on, the training backends run


def test_auto_picks_batched_only_for_many_balanced_experts_in_bf16_on_cpu():
    from types import SimpleNamespace

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("auto is batched everywhere without torch._grouped_mm")
    balanced = SimpleNamespace(tokens_per_expert_E=torch.tensor([10, 12, 9, 11] * 16))  # 64 experts
    skewed = SimpleNamespace(tokens_per_expert_E=torch.tensor([40, 1, 1, 0] * 16))
    few = SimpleNamespace(tokens_per_expert_E=torch.tensor([10, 12, 9, 11] * 2))  # 8 experts
    x32, x16 = torch.zeros(4, 8), torch.zeros(4, 8, dtype=torch.bfloat16)
    assert resolve_backend("auto", x32, balanced) == "grouped"
    assert resolve_backend("auto", x16, balanced) == "batched"
    assert resolve_backend("auto", x16, skewed) == "grouped"
    assert resolve_backend("auto", x16, few) == "grouped"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert resolve_backend("auto", x32, balanced) == "batched"  # autocast's dtype counts
    assert resolve_backend("grouped", x16, balanced) == "grouped"  # an explicit choice stays
    # the trainer's log line says the same
    from Ava.layers.experts import describe_auto

    assert describe_auto("cpu", torch.float32, 64) == "grouped"
    assert describe_auto("cpu", torch.bfloat16, 8) == "grouped"
    assert describe_auto("cpu", torch.bfloat16, 64).startswith("batched while")
    assert describe_auto("cuda", torch.bfloat16, 64) == "grouped"


@pytest.mark.parametrize("backend", ["grouped", "batched"])
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_padded_expert_blocks_change_nothing(monkeypatch, backend, capacity):
    """Blocks padded to a multiple of rows (what CPU bf16 uses to keep GEMM shapes few) give the
    loop's output and gradients exactly as far as fp32 allows; checked in fp32 by forcing it."""
    import Ava.layers.experts as experts_module
    from Ava.layers.experts import EXPERT_BACKENDS, experts_loop
    from Ava.layers.routing import apply_capacity, route_topk

    torch.manual_seed(0)
    E, D, I, T = 6, 16, 24, 37
    gate_up = (0.2 * torch.randn(E, 2 * I, D)).requires_grad_()
    down = (0.2 * torch.randn(E, D, I)).requires_grad_()
    x = torch.randn(T, D, requires_grad=True)
    routing = route_topk(x.detach(), torch.randn(E, D), 2, True)
    if capacity is not None:
        routing = apply_capacity(routing, capacity)

    def run(fn):
        for t in (x, gate_up, down):
            t.grad = None
        y = fn(x, routing, gate_up, down)
        y.pow(2).sum().backward()
        return [y.detach()] + [t.grad.clone() for t in (x, gate_up, down)]

    reference = run(experts_loop)
    monkeypatch.setattr(experts_module, "row_multiple", lambda x_SD: 8)
    padded = run(EXPERT_BACKENDS[backend])
    for got, want in zip(padded, reference):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("inter", [24, 3])  # 3 fp32 = 12-byte rows: _grouped_mm rejects them, grouped loops
def test_expert_backends_match_loop_gradients(inter):
    """batched and grouped (kernel or its fallback) give the loop's outputs and gradients."""
    from Ava.layers.experts import EXPERT_BACKENDS, _grouped_mm_aligned, experts_loop
    from Ava.layers.routing import route_topk

    torch.manual_seed(1)
    E, D, T = 5, 16, 29
    gate_up = (0.3 * torch.randn(E, 2 * inter, D)).requires_grad_()
    down = (0.3 * torch.randn(E, D, inter)).requires_grad_()
    x = torch.randn(T, D, requires_grad=True)
    routing = route_topk(x.detach(), torch.randn(E, D), 2, True)
    assert _grouped_mm_aligned(x, inter) == (inter == 24)
    results = []
    for fn in (experts_loop, EXPERT_BACKENDS["grouped"], EXPERT_BACKENDS["batched"]):
        for t in (x, gate_up, down):
            t.grad = None
        (fn(x, routing, gate_up, down) * torch.linspace(-1, 1, D)).sum().backward()
        results.append([t.grad.clone() for t in (x, gate_up, down)])
    for other in results[1:]:
        for got, want in zip(other, results[0]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_batched_swiglu_backward_equals_autograd():
    """_BatchedSwiGLU (used below fp32) has the gradients of the plain expression (checked in fp32)."""
    from Ava.layers.experts import _batched_swiglu_autograd, _BatchedSwiGLU

    torch.manual_seed(2)
    E, C, D, inter = 3, 7, 16, 12
    inputs = [torch.randn(E, C, D), 0.3 * torch.randn(E, 2 * inter, D), 0.3 * torch.randn(E, D, inter)]
    grad = torch.randn(E, C, D)
    results = []
    for fn in (_batched_swiglu_autograd, _BatchedSwiGLU.apply):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
