"""The kernel registry (layers/kernels/): what runs where, resolved once per model and device."""

from types import SimpleNamespace

import pytest
import torch

import Ava.layers.experts as experts_module
from Ava.config import ModelConfig
from Ava.layers import BufferLayout, Experts, MoEBlock, describe_auto, kernel_for, resolve_backend, resolve_kernels
from Ava.layers.expert_kernels import grouped_kernel, loop_kernel
from Ava.layers.kernels import KERNELS, batched_autograd_kernel, batched_kernel, experts_gathered, experts_slots
from Ava.layers.kernels.batched import BatchedSwiGLU, batched_swiglu_autograd
from Ava.layers.routing import apply_capacity, route_topk


def _block(backend: str, num_experts: int = 8) -> MoEBlock:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_experts=num_experts,
                      moe={"top_k": 2, "moe_intermediate_size": 24, "backend": backend})
    torch.manual_seed(0)
    return MoEBlock(cfg)


def test_kernels_are_resolved_once_per_backend_device_and_dtype(monkeypatch):
    calls = []
    real = experts_module.resolve_kernels
    monkeypatch.setattr(experts_module, "resolve_kernels", lambda *args: calls.append(args) or real(*args))
    block = _block("auto")
    x = torch.randn(2, 12, 32)
    for _ in range(3):
        block(x).hidden_states.sum().backward()
    assert calls == [("auto", "cpu", torch.float32, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            block(x)
    assert calls[1:] == [("auto", "cpu", torch.bfloat16, 8)]
    with torch.no_grad():
        block(x[:, :1])  # the decode path: the same resolution
        block(x)
    assert len(calls) == 2
    block.experts.backend = "batched"  # reassigned: resolved again, once
    block(x)
    block(x)
    assert calls[2:] == [("batched", "cpu", torch.float32, 8)]


def test_registry_layouts_per_device_and_dtype():
    assert set(KERNELS) == {"loop", "grouped", "batched"}
    bf16, fp32 = torch.bfloat16, torch.float32
    # CPU bf16 pads blocks to 64 rows for oneDNN; fp32 and accelerators run exact rows.
    assert kernel_for("grouped", "cpu", bf16).layout == BufferLayout(multiple=64)
    assert kernel_for("grouped", "cpu", fp32).layout == BufferLayout()
    assert kernel_for("grouped", "cuda", bf16).layout == BufferLayout()
    assert kernel_for("grouped", "cuda", bf16).fn is grouped_kernel
    assert kernel_for("batched", "cpu", bf16).layout == BufferLayout(multiple=64, uniform=True)
    assert kernel_for("batched", "cuda", bf16).layout == BufferLayout(uniform=True)
    # the hand-written batched backward below fp32 only
    assert kernel_for("batched", "cpu", bf16).fn is batched_kernel
    assert kernel_for("batched", "cpu", fp32).fn is batched_autograd_kernel
    assert kernel_for("loop", "cpu", bf16).fn is loop_kernel
    assert kernel_for("loop", "cpu", bf16).layout == BufferLayout()


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown experts backend"):
        resolve_kernels("fast", "cpu", torch.float32, 8)
    with pytest.raises(ValueError, match="unknown experts backend"):
        Experts(4, 8, 8, backend="fast")


def test_auto_resolves_to_a_concrete_kernel():
    assert resolve_backend("auto") == ("grouped" if hasattr(torch, "_grouped_mm") else "batched")
    assert resolve_backend("loop") == "loop"
    block = _block("auto")
    assert block.experts.backend == "auto"
    x = torch.randn(1, 8, 32)
    y_auto = block(x).hidden_states
    block.experts.backend = "loop"
    torch.testing.assert_close(y_auto, block(x).hidden_states, atol=1e-5, rtol=1e-5)


def test_auto_without_grouped_mm_is_batched(monkeypatch):
    monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    for device, dtype in [("cpu", torch.float32), ("cpu", torch.bfloat16), ("cuda", torch.bfloat16)]:
        assert resolve_kernels("auto", device, dtype, 64).kernel.name == "batched"
    assert describe_auto("cuda", torch.bfloat16, 8) == "batched"


def test_auto_picks_batched_only_for_many_balanced_experts_in_bf16_on_cpu():
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
    choice = resolve_kernels("auto", "cpu", torch.bfloat16, 64)
    assert choice.select(balanced).name == "batched" and choice.select(skewed).name == "grouped"
    assert choice.select(balanced).layout.uniform and choice.select(skewed).layout == BufferLayout(multiple=64)
    # the trainer's log line says the same
    assert describe_auto("cpu", torch.float32, 64) == "grouped"
    assert describe_auto("cpu", torch.bfloat16, 8) == "grouped"
    assert describe_auto("cpu", torch.bfloat16, 64) == \
        "batched while the busiest expert has ≤ 2× the mean load, else grouped"
    assert describe_auto("cuda", torch.bfloat16, 64) == "grouped"
    assert experts_module.describe_auto is describe_auto  # the trainer imports it from layers.experts


def test_decode_path_rule():
    torch.manual_seed(0)
    x = torch.randn(3, 32)
    routing = route_topk(x, torch.randn(32, 32), 2, True)  # 6 slots
    cpu = resolve_kernels("grouped", "cpu", torch.float32, 32).decode
    assert cpu.name == "slots" and cpu.fn is experts_slots
    gpu = resolve_kernels("grouped", "cuda", torch.float32, 24).decode
    assert gpu.name == "gathered" and gpu.fn is experts_gathered
    with torch.no_grad():
        assert cpu.applies(routing)  # CPU: fewer slots than experts
        assert not resolve_kernels("loop", "cpu", torch.float32, 6).decode.applies(routing)  # as many as experts
        assert gpu.applies(routing)  # accelerators: ≤ E/4 slots
        assert not resolve_kernels("loop", "cuda", torch.float32, 23).decode.applies(routing)
        assert not cpu.applies(apply_capacity(routing, 0.1))  # slots off: the kernels
    assert not cpu.applies(routing)  # with autograd on, the training kernels run


def test_batched_swiglu_backward_equals_autograd():
    """BatchedSwiGLU (used below fp32) has the gradients of the plain expression (checked in fp32)."""
    torch.manual_seed(2)
    E, C, D, inter = 3, 7, 16, 12
    inputs = [torch.randn(E, C, D), 0.3 * torch.randn(E, 2 * inter, D), 0.3 * torch.randn(E, D, inter)]
    grad = torch.randn(E, C, D)
    results = []
    for fn in (batched_swiglu_autograd, BatchedSwiGLU.apply):
        leaves = [t.clone().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.backward(grad)
        results.append([y.detach()] + [t.grad for t in leaves])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", [BufferLayout(), BufferLayout(multiple=8), BufferLayout(multiple=8, uniform=True)])
def test_kernels_agree_row_by_row_on_the_same_buffer(layout):
    """Given the same rows and counts, every kernel computes the same per-row outputs (padding
    rows stay zero), whatever dispatcher made the buffer."""
    torch.manual_seed(3)
    E, D, inter = 5, 16, 24
    counts_E = torch.tensor([3, 0, 9, 1, 6])
    if layout.multiple > 1:
        counts_E = (counts_E + layout.multiple - 1) // layout.multiple * layout.multiple
    if layout.uniform:
        counts_E = torch.full((E,), int(counts_E.max()))
    rows_RD = torch.randn(int(counts_E.sum()), D)
    gate_up, down = 0.3 * torch.randn(E, 2 * inter, D), 0.3 * torch.randn(E, D, inter)
    want = loop_kernel(rows_RD, counts_E, gate_up, down)
    kernels = [grouped_kernel] + ([batched_kernel, batched_autograd_kernel] if layout.uniform else [])
    for fn in kernels:
        torch.testing.assert_close(fn(rows_RD, counts_E, gate_up, down), want, rtol=1e-5, atol=1e-5)
    assert (loop_kernel(torch.zeros_like(rows_RD), counts_E, gate_up, down) == 0).all()
