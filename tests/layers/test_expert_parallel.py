"""Expert parallelism (layers/expert_parallel.py, AllToAllDispatcher): the sharded MoE block equals
the single-process one, on forked Gloo processes (tests/distributed_harness.py).

Every rank builds the same seed-initialised MoE block, shards its experts over the expert-parallel
group and runs its own tokens through it; the reference is the unsharded block on the same rank's
tokens. Per rank i the output, the input's gradient and the router weight's gradient must equal
the reference's on rank i's tokens. An expert's weights get gradient from the tokens of every
rank of the group (the all-to-all's backward brings them home), so the exact relation is

    grad of rank i's slice (EP, after rank i's own backward)
        = Σ over ranks j of the group of (reference gradient on rank j's tokens)[rank i's experts]

where each rank j backpropagates its own loss_j = Σ out_j · g_j. Only the order of that sum
differs (one GEMM over all received rows against one GEMM per rank, then added), so the expert
weight gradients agree to rounding: they are O(1..10), so they are held to |diff| ≤ 1e-6·(1 + |ref|)
elementwise (measured: at most 1 ulp, 9.5e-7 absolute at values in [8, 16)). The output and the
input and router gradients pass through gathers and collectives only and are held to 1e-6 absolute
(measured: bitwise equal).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from Ava.config import ModelConfig
from Ava.layers import MoEBlock, routed_experts
from Ava.layers.expert_kernels import ExpertKernel, grouped_kernel, loop_kernel
from Ava.layers.expert_parallel import (
    expert_parameter_names,
    gather_expert_state,
    shard_expert_state,
    shard_experts,
)
from Ava.layers.kernels import batched_autograd_kernel
from Ava.layers.token_dispatcher import AllToAllDispatcher, BufferLayout, LocalDispatcher
from tests.distributed_harness import run_workers

HIDDEN, EXPERTS, TOP_K, TOKENS = 32, 4, 2, 24
BACKENDS = ("grouped", "loop", "batched")
# Layouts the registry gives none of these kernels on CPU fp32: rounded and fixed blocks over the
# local experts (padding rows inside the received buffer).
EXTRA_KERNELS = (
    ExpertKernel("grouped-rounded", grouped_kernel, BufferLayout(multiple=8)),
    ExpertKernel("loop-fixed", loop_kernel, BufferLayout(cap=2 * TOKENS * 4)),  # ≥ any local expert's rows
    ExpertKernel("batched-uniform8", batched_autograd_kernel, BufferLayout(multiple=8, uniform=True)),
)
# What each scenario does to the routing: capacity dropping, and selection biases that keep
# experts away (-10 beats any probability): "sparse" sends no token to expert 3 from any rank and,
# on the group's first rank, none to the last rank's experts either (a zero-row split both ways);
# "idle-rank": the group's last rank has no tokens at all (it still joins every collective).
SCENARIOS = {
    "dropless": dict(capacity_factor=None, banned=lambda ep_rank, ep_size: []),
    "capacity": dict(capacity_factor=0.5, banned=lambda ep_rank, ep_size: []),
    "idle-rank": dict(capacity_factor=0.5, banned=lambda ep_rank, ep_size: [],
                      tokens=lambda ep_rank, ep_size: 0 if ep_rank == ep_size - 1 else TOKENS),
    "sparse": dict(capacity_factor=None, banned=lambda ep_rank, ep_size: (
        [3] if ep_rank else sorted({3, *range(EXPERTS - EXPERTS // ep_size, EXPERTS)}))),
    "sparse-capacity": dict(capacity_factor=0.75, banned=lambda ep_rank, ep_size: (
        [3] if ep_rank else sorted({3, *range(EXPERTS - EXPERTS // ep_size, EXPERTS)}))),
}
TOL = 1e-6  # fp32; absolute for the output and the input/router gradients, relative to 1 + |ref| for the experts'
BF16_GRAD_TOL = 3e-2  # bf16 expert-weight gradients, relative to the reference's largest entry (tests.helpers)


def _block(backend: str, capacity_factor: float | None) -> MoEBlock:
    cfg = ModelConfig(
        vocab_size=64, hidden_size=HIDDEN, num_layers=1, num_heads=4, num_experts=EXPERTS,
        moe={"top_k": TOP_K, "moe_intermediate_size": 24, "backend": backend, "aux_free_bias": True,
             "capacity_factor": capacity_factor},
    )
    torch.manual_seed(0)
    block = MoEBlock(cfg)
    with torch.no_grad():  # a router that prefers experts clearly (std 0.02 gives near-uniform probabilities)
        block.gate.weight.normal_(std=0.5)
    return block


def _inputs(rank: int, tokens: int = TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, tokens, D) inputs and output gradients of a global rank: different on every rank."""
    gen = torch.Generator().manual_seed(1000 + rank)
    x, g = torch.randn(1, TOKENS, HIDDEN, generator=gen), torch.randn(1, TOKENS, HIDDEN, generator=gen)
    return x[:, :tokens], g[:, :tokens]


def _ban(block: MoEBlock, banned: list[int]) -> None:
    block.gate.expert_bias.zero_()
    block.gate.expert_bias[banned] = -10.0


def _run(block: MoEBlock, x_BTD: torch.Tensor, g_BTD: torch.Tensor, kernel: ExpertKernel | None = None,
         bf16: bool = False):
    """Forward and backward of Σ out·g; the output, the input's and every parameter's gradient."""
    block.zero_grad(set_to_none=True)
    x = x_BTD.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        if kernel is None:
            out = block(x).hidden_states
        else:  # a kernel with a layout of our own, through the same dispatcher
            routing = block.gate(x.flatten(0, 1))
            out = routed_experts(x.flatten(0, 1), routing, block.experts.gate_up_proj, block.experts.down_proj,
                                 kernel, block.experts.dispatcher).view_as(x)
    (out.float() * g_BTD).sum().backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in block.named_parameters()}
    return out.detach(), x.grad.clone(), grads


def _max_diffs(ep_group, ep_ranks: list[int], backend: str, scenario: str, kernel=None,
               bf16: bool = False) -> dict[str, float]:
    """This rank's largest differences between the sharded block and the single-process reference.

    In bf16 the expert-weight gradients are measured against 3% of the reference's largest entry
    (``tests.helpers.assert_bf16_param_grads_close``'s bound: the sum over ranks rounds differently).
    """
    cfg = SCENARIOS[scenario]
    ep_rank, ep_size = dist.get_rank(ep_group), dist.get_world_size(ep_group)
    tokens = cfg.get("tokens", lambda ep_rank, ep_size: TOKENS)
    reference = _block(backend, cfg["capacity_factor"])
    sharded = _block(backend, cfg["capacity_factor"])
    shard_experts(sharded, ep_group)
    local = EXPERTS // ep_size
    mine = slice(ep_rank * local, (ep_rank + 1) * local)

    expert_grads = {"experts.gate_up_proj": 0.0, "experts.down_proj": 0.0}  # Σ_j of reference grads
    for j, global_rank in enumerate(ep_ranks):  # every rank of my group, as a single process
        _ban(reference, cfg["banned"](j, ep_size))
        out_ref, dx_ref, grads_ref = _run(reference, *_inputs(global_rank, tokens(j, ep_size)), kernel, bf16)
        for name in expert_grads:
            expert_grads[name] = expert_grads[name] + grads_ref[name][mine]
        if j == ep_rank:
            mine_ref = out_ref, dx_ref, grads_ref["gate.weight"]
    _ban(sharded, cfg["banned"](ep_rank, ep_size))
    out, dx, grads = _run(sharded, *_inputs(dist.get_rank(), tokens(ep_rank, ep_size)), kernel, bf16)
    assert out.shape == mine_ref[0].shape and dx.shape == mine_ref[1].shape
    diffs = {
        "output": (out - mine_ref[0]).abs().max().item() if out.numel() else 0.0,
        "input grad": (dx - mine_ref[1]).abs().max().item() if dx.numel() else 0.0,
        "router grad": (grads["gate.weight"] - mine_ref[2]).abs().max().item(),
    }
    for name, total in expert_grads.items():
        assert grads[name].shape == total.shape, (name, grads[name].shape, total.shape)
        if bf16:
            diffs[name + " grad / max|ref|"] = (grads[name] - total).abs().max().item() / total.abs().max().item()
        else:
            diffs[name + " grad"] = ((grads[name] - total).abs() / (1 + total.abs())).max().item()
        diffs[name + " grad (abs, not checked)"] = (grads[name] - total).abs().max().item()
    return diffs


def _ep_world(rank: int, world_size: int, scenario: str) -> dict:
    group = dist.group.WORLD
    results = {b: _max_diffs(group, list(range(world_size)), b, scenario) for b in BACKENDS}
    for kernel in EXTRA_KERNELS:
        results[kernel.name] = _max_diffs(group, list(range(world_size)), "grouped", scenario, kernel)
    return results


def _check(results: list[dict]) -> None:
    for rank, per_backend in enumerate(results):
        for backend, diffs in per_backend.items():
            for what, diff in diffs.items():
                limit = BF16_GRAD_TOL if what.endswith("max|ref|") else TOL
                assert "not checked" in what or diff <= limit, f"rank {rank}, {backend}: {what} differs by {diff:.3g}"


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_ep2_equals_single_process(scenario):
    """ep=2: output, input/router gradients per rank, and each slice's gradient = Σ over ranks."""
    _check(run_workers(_ep_world, 2, scenario))


def _ep_world_bf16(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD
    return {f"{scenario}/{backend}": _max_diffs(group, [0, 1], backend, scenario, bf16=True)
            for scenario in ("dropless", "sparse-capacity") for backend in ("grouped", "batched")}


def test_ep2_bf16_autocast_equals_single_process():
    """CPU bf16 autocast: the grouped and batched kernels' blocks are padded to 64 rows over the local
    experts; output and input/router gradients still equal the reference's, expert gradients to bf16."""
    _check(run_workers(_ep_world_bf16, 2))


def _mesh_2x2(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    ep_group = mesh["ep"].get_group()
    ep_ranks = dist.get_process_group_ranks(ep_group)
    assert dist.get_rank(ep_group) == mesh["ep"].get_local_rank()
    results = {}
    for scenario in ("dropless", "sparse-capacity"):
        for backend in BACKENDS:
            results[f"{scenario}/{backend}"] = _max_diffs(ep_group, ep_ranks, backend, scenario)
    return results


def test_dp2_ep2_mesh_equals_single_process():
    """4 processes as a 2×2 dp×ep mesh: the ep sub-groups ({0, 1}, {2, 3}) each equal the reference."""
    _check(run_workers(_mesh_2x2, 4))


def _state_and_errors(rank: int, world_size: int) -> dict:
    group = dist.group.WORLD
    full = _block("auto", None)
    block = _block("auto", None)
    shard_experts(block, group)
    experts = block.experts
    assert (experts.num_experts, experts.num_local_experts, experts.ep_rank, experts.ep_size) == (4, 2, rank, 2)
    assert isinstance(experts.dispatcher, AllToAllDispatcher)
    assert f"experts=4, local_experts=2 (ep rank {rank} of 2)" in repr(experts)
    # The registry is keyed by the local count: the CPU decode path takes fewer slots than E/N.
    assert experts.kernels("cpu", torch.float32).decode.max_slots == 1
    names = expert_parameter_names(block)
    assert names == {"experts.gate_up_proj", "experts.down_proj"}
    for name in names:
        param = dict(block.named_parameters())[name]
        assert param.shape[0] == 2 and param.requires_grad
        torch.testing.assert_close(param, dict(full.named_parameters())[name][2 * rank:2 * rank + 2],
                                   rtol=0, atol=0)
    state = block.state_dict()
    consolidated = gather_expert_state(state, block)
    for name, tensor in full.state_dict().items():
        torch.testing.assert_close(consolidated[name], tensor, rtol=0, atol=0)
    resharded = shard_expert_state(consolidated, block)
    for name, tensor in state.items():
        torch.testing.assert_close(resharded[name], tensor, rtol=0, atol=0)
    block.load_state_dict(resharded)
    copied = copy.deepcopy(block)  # an EMA / reference copy: same group, own parameters
    assert copied.experts.dispatcher.group is experts.dispatcher.group
    assert copied.experts.gate_up_proj is not experts.gate_up_proj
    with pytest.raises(ValueError, match="already sharded"):
        shard_experts(block, group)
    assert expert_parameter_names(full) == set()
    # Inference under EP goes through the dispatcher (the decode paths read every expert in place).
    with torch.no_grad():
        x = _inputs(rank)[0][:, :1]
        torch.testing.assert_close(block(x).hidden_states, full(x).hidden_states, rtol=0, atol=1e-6)
    odd = _block("grouped", None)
    odd.experts.num_experts = 3  # pretend E = 3: not divisible by 2 ranks
    with pytest.raises(ValueError, match=r"3 experts over 2 ranks"):
        shard_experts(odd, group)
    with pytest.raises(ValueError, match=r"3 experts over 2 ranks"):
        AllToAllDispatcher(group, 3)
    return {}


def test_sharding_state_repr_and_non_divisible_experts():
    """shard_experts keeps the rank's slice, names it, the state round-trips, E % N ≠ 0 is refused."""
    run_workers(_state_and_errors, 2)


def test_local_dispatcher_is_the_default():
    block = _block("grouped", None)
    assert isinstance(block.experts.dispatcher, LocalDispatcher)
    assert block.experts.num_local_experts == EXPERTS and block.experts.ep_size == 1
    assert "local_experts" not in repr(block.experts)
