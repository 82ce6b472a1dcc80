"""RoPE (layers/rotary.py): the fused QK-norm + RoPE of training equals the module path."""

import pytest
import torch

from Ava.layers.norm import RMSNorm
from Ava.layers.rotary import RotaryEmbedding, _NormRotary, apply_rotary, norm_rotary


def _tables(B=2, T=5, K=8):
    rot = RotaryEmbedding(K, 16)
    return rot(torch.arange(T).expand(B, T))


def _module_path(x, norm, cos, sin):
    return apply_rotary(norm(x), cos, sin).to(x.dtype)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_norm_rotary_equals_norm_then_rotary(dtype, tol):
    torch.manual_seed(0)
    cos, sin = _tables()
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 3, 8).to(dtype)
    up = torch.randn(2, 5, 3, 8).to(dtype)
    grads = []
    for fn in (lambda a: _module_path(a, norm, cos, sin), lambda a: norm_rotary(a, norm.weight, 1e-6, cos, sin)):
        a = x.clone().requires_grad_()
        out = fn(a)
        assert out.dtype == dtype
        (out.float() * up.float()).sum().backward()
        grads.append((out.float(), a.grad.float(), norm.weight.grad.clone()))
        norm.weight.grad = None
    for new, old in zip(*grads):
        torch.testing.assert_close(new, old, rtol=tol, atol=tol)


def test_norm_rotary_passes_gradcheck():
    torch.manual_seed(0)
    cos, sin = (t.double() for t in _tables())
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64, requires_grad=True)
    w = torch.rand(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _NormRotary.apply(a, b, 1e-6, cos, sin), (x, w))
