"""RMSNorm (layers/norm.py): the fused fp32 path equals the formula, and its hand-written
backward equals autograd's."""

import pytest
import torch

from Ava.layers.norm import RMSNorm, _RMSNormFunction, rms_norm


def _formula(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def test_fp32_forward_is_the_formula_bitwise():
    torch.manual_seed(0)
    norm = RMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(norm(x), _formula(x, norm.weight, 1e-5), rtol=0, atol=0)
    x.requires_grad_()  # the autograd path (custom backward on CPU) has the same forward
    torch.testing.assert_close(norm(x), _formula(x, norm.weight, 1e-5), rtol=0, atol=0)


def test_backward_passes_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _RMSNormFunction.apply(a, b, 1e-6), (x, w))


@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)])
def test_gradients_equal_autograd_of_the_formula(needs):
    torch.manual_seed(1)
    x = torch.randn(2, 9, 16, requires_grad=needs[0])
    w = torch.rand(16, requires_grad=needs[1])
    up = torch.randn(2, 9, 16)
    (rms_norm(x, w, 1e-6) * up).sum().backward()
    x2, w2 = x.detach().clone().requires_grad_(needs[0]), w.detach().clone().requires_grad_(needs[1])
    (_formula(x2, w2, 1e-6) * up).sum().backward()
    for a, b in ((x, x2), (w, w2)):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        else:
            assert a.grad is None
