"""Expert backends: `grouped` agrees with the `loop` reference, forward and backward."""

import pytest
import torch

from Ava.config import ModelConfig
from Ava.layers import Experts, MoEBlock, RouterOutput, experts_grouped, experts_loop
from tests.helpers import assert_bf16_param_grads_close


def _block(top_k: int, num_experts: int = 4, seed: int = 0) -> MoEBlock:
    cfg = ModelConfig(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_experts=num_experts,
        moe={"top_k": top_k, "moe_intermediate_size": 48},
    )
    torch.manual_seed(seed)
    block = MoEBlock(cfg)
    torch.nn.init.normal_(block.gate.weight, std=0.5)
    return block


def _fwd_bwd(block: MoEBlock, backend: str, x: torch.Tensor, grad_out: torch.Tensor, autocast: bool = False):
    block.zero_grad(set_to_none=True)
    block.experts.backend = backend
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = block(x).hidden_states
    (y.float() * grad_out).sum().backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return y.detach(), x.grad.clone(), grads


@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_grouped_matches_loop_fp32(top_k):
    block = _block(top_k)
    torch.manual_seed(1)
    x = torch.randn(2, 24, 32)
    g = torch.randn(2, 24, 32)
    y_loop, gx_loop, gp_loop = _fwd_bwd(block, "loop", x, g)
    y_grp, gx_grp, gp_grp = _fwd_bwd(block, "grouped", x, g)
    torch.testing.assert_close(y_grp, y_loop, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx_grp, gx_loop, atol=1e-5, rtol=1e-5)
    assert set(gp_loop) == {"gate.weight", "experts.gate_up_proj", "experts.down_proj"}
    for name in gp_loop:
        torch.testing.assert_close(gp_grp[name], gp_loop[name], atol=1e-5, rtol=1e-5, msg=name)
    assert gp_loop["gate.weight"].abs().sum() > 0  # the router learns through the gate weights


def test_grouped_matches_loop_with_idle_experts():
    # All tokens on experts 0 and 2: experts 1 and 3 get empty row blocks.
    torch.manual_seed(2)
    experts = Experts(num_experts=4, hidden_size=16, intermediate_size=8)
    x = torch.randn(10, 16, requires_grad=True)
    indices = torch.tensor([[0, 2], [2, 0]] * 5)
    weights = torch.rand(10, 2)
    routing = RouterOutput(
        indices_TK=indices, weights_TK=weights, logits_TE=torch.zeros(10, 4),
        probs_TE=torch.full((10, 4), 0.25), tokens_per_expert_E=torch.tensor([10, 0, 10, 0]),
    )
    g = torch.randn(10, 16)
    results = []
    for fn in (experts_loop, experts_grouped):
        experts.zero_grad(set_to_none=True)
        x.grad = None
        y = fn(x, routing, experts.gate_up_proj, experts.down_proj)
        (y * g).sum().backward()
        results.append((y.detach(), x.grad.clone(), experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert results[1][2][1].abs().sum() == 0  # idle expert: zero gradient, not garbage


def test_grouped_backward_accepts_expanded_gradient():
    # `y.sum().backward()` hands an expanded gradient; _grouped_mm's CPU backward rejects those
    # unless the backend feeds it through an op with a fresh gradient.
    block = _block(top_k=2)
    x = torch.randn(1, 8, 32, requires_grad=True)
    block(x).hidden_states.sum().backward()
    assert torch.isfinite(x.grad).all()


# bf16 keeps 8 mantissa bits (relative rounding 2^-8 ≈ 0.4%); both backends round at the same
# places but sum in different orders, so they agree to a few bf16 ulps; against fp32 the error
# is the usual bf16 matmul error.
BF16_TOL = {"atol": 2e-2, "rtol": 2e-2}


@pytest.mark.parametrize("top_k", [1, 2])
def test_backends_agree_under_bf16_autocast(top_k):
    block = _block(top_k)
    torch.manual_seed(3)
    x = torch.randn(2, 16, 32)
    g = torch.randn(2, 16, 32)
    y32, gx32, _ = _fwd_bwd(block, "loop", x, g)
    y_loop, gx_loop, gp_loop = _fwd_bwd(block, "loop", x, g, autocast=True)
    y_grp, gx_grp, gp_grp = _fwd_bwd(block, "grouped", x, g, autocast=True)
    assert y_loop.dtype == y_grp.dtype == torch.bfloat16
    torch.testing.assert_close(y_grp.float(), y_loop.float(), **BF16_TOL)
    torch.testing.assert_close(gx_grp, gx_loop, **BF16_TOL)
    assert_bf16_param_grads_close(gp_grp, gp_loop)
    torch.testing.assert_close(y_grp.float(), y32, atol=5e-2, rtol=5e-2)
