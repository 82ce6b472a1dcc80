"""Routed experts as 3-D parameters, with one function per kernel backend over the same tensors.

Legend: T tokens, D hidden, E experts, K experts per token, I expert intermediate width,
S = T·K token-slots (one row per (token, chosen expert) pair).

Layout (HF transformers 5.23 Qwen3-MoE): ``gate_up_proj [E, 2I, D]`` (rows ``:I`` are the gate,
``I:`` the up projection) and ``down_proj [E, D, I]``, so expert e computes
``down[e] @ (silu(gate[e] @ x) * (up[e] @ x))``. Switching backends never changes a checkpoint.

Backends (dropless: every token-slot is computed, no capacity):
- ``loop``: a Python loop over experts with boolean selection; slow, obviously right, the
  reference the tests compare against.
- ``grouped``: sort token-slots by expert (dispatch), two ``torch._grouped_mm`` calls over the
  contiguous per-expert row blocks (experts), un-sort and weight-sum (combine).

Both compute in the autocast dtype when autocast is on (``_grouped_mm`` is not on autocast's
op list, so the cast is explicit here) and accumulate the weighted combine in fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .routing import RouterOutput


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls should run in: autocast's when it is on for ``x``'s device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# --------------------------------------------------------------------------------------------
# loop: the reference
# --------------------------------------------------------------------------------------------


def experts_loop(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """Reference backend: one masked SwiGLU per expert, weighted and added back per token.

    Args:
        x_TD: (T, D) hidden states.
        routing: the router's decision (``indices_TK``, ``weights_TK``).
        gate_up_proj_EID: (E, 2I, D) expert gate/up weights.
        down_proj_EDI: (E, D, I) expert down weights.

    Returns:
        (T, D) ``Σ_k w_tk · expert_{i_tk}(x_t)``, in the compute dtype.
    """
    dtype = _compute_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    inter = down_proj_EDI.shape[-1]
    out_TD = torch.zeros(x_TD.shape, dtype=torch.float32, device=x_TD.device)
    for e in range(gate_up_proj_EID.shape[0]):
        tok_N, slot_N = torch.where(routing.indices_TK == e)  # N = slots routed to expert e
        h_N2I = x_TD[tok_N] @ gate_up_proj_EID[e].to(dtype).t()  # (N, 2I)
        act_NI = F.silu(h_N2I[:, :inter]) * h_N2I[:, inter:]  # (N, I)
        y_ND = act_NI @ down_proj_EDI[e].to(dtype).t()  # (N, D)
        w_N1 = routing.weights_TK[tok_N, slot_N].unsqueeze(-1)  # (N, 1) fp32
        out_TD = out_TD.index_add(0, tok_N, y_ND.float() * w_N1)
    return out_TD.to(dtype)


# --------------------------------------------------------------------------------------------
# grouped: dispatch -> grouped GEMMs -> combine
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispatchPlan:
    """How token-slots were sorted by expert, so combine can undo it.

    Attributes:
        token_S: (S,) long, the token of each sorted slot.
        order_S: (S,) long, the token-major slot (t·K + k) of each sorted row.
        unsort_S: (S,) long, inverse permutation: sorted row of token-major slot s = t·K + k.
        weights_S: (S,) fp32 gate weight of each sorted slot.
        offsets_E: (E,) int32 cumulative row ends of each expert's block (``_grouped_mm`` offs).
        tokens_per_expert_E: (E,) long rows per expert.
        num_tokens: T.
        top_k: K.
    """

    token_S: torch.Tensor
    order_S: torch.Tensor
    unsort_S: torch.Tensor
    weights_S: torch.Tensor
    offsets_E: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int
    top_k: int


class _GatherSlots(torch.autograd.Function):
    """Rows of x for each sorted slot; the backward sums each token's K slot gradients.

    Autograd's own backward of ``x[token_S]`` is an accumulating ``index_put`` (slow on CPU,
    atomic and non-deterministic on GPU); knowing the slots are a permutation of T·K rows lets
    the backward be one gather and a sum over K instead.
    """

    @staticmethod
    def forward(ctx, x_TD, token_S, unsort_S, top_k):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(unsort_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, token_S)  # (S, D)

    @staticmethod
    def backward(ctx, grad_SD):  # noqa: D102
        (unsort_S,) = ctx.saved_tensors
        grad_TKD = grad_SD.index_select(0, unsort_S).view(-1, ctx.top_k, grad_SD.shape[-1])  # (T, K, D)
        return grad_TKD.sum(dim=1), None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation, with the inverse permutation as its backward (a gather)."""

    @staticmethod
    def forward(ctx, x_SD, perm_S, inverse_S):  # noqa: D102
        ctx.save_for_backward(inverse_S)
        return x_SD.index_select(0, perm_S)

    @staticmethod
    def backward(ctx, grad_SD):  # noqa: D102
        (inverse_S,) = ctx.saved_tensors
        return grad_SD.index_select(0, inverse_S), None, None


def dispatch_sorted(x_TD: torch.Tensor, routing: RouterOutput) -> tuple[torch.Tensor, DispatchPlan]:
    """Gather one row per token-slot, sorted by expert (stable, so token order is kept).

    Args:
        x_TD: (T, D) hidden states.
        routing: the router's decision.

    Returns:
        ``(x_SD, plan)``: (S, D) rows grouped by expert, and the :class:`DispatchPlan`.
    """
    num_tokens, top_k = routing.indices_TK.shape
    expert_S = routing.indices_TK.reshape(-1)  # (S,) token-major
    order_S = torch.argsort(expert_S, stable=True)  # sorted row -> token-major slot
    unsort_S = torch.empty_like(order_S)
    unsort_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    token_S = order_S // top_k
    plan = DispatchPlan(
        token_S=token_S,
        order_S=order_S,
        unsort_S=unsort_S,
        weights_S=routing.weights_TK.reshape(-1)[order_S],
        offsets_E=torch.cumsum(routing.tokens_per_expert_E, dim=0).to(torch.int32),
        tokens_per_expert_E=routing.tokens_per_expert_E,
        num_tokens=num_tokens,
        top_k=top_k,
    )
    return _GatherSlots.apply(x_TD, token_S, unsort_S, top_k), plan  # (S, D)


def _grouped_matmul(
    x_SM: torch.Tensor, w_EMN: torch.Tensor, offsets_E: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """Row block e of ``x_SM`` times ``w_EMN[e]``; (S, M) x (E, M, N) -> (S, N)."""
    if hasattr(torch, "_grouped_mm"):
        return torch._grouped_mm(x_SM, w_EMN, offs=offsets_E)
    # Builds without the kernel: split on the host (one sync) and loop.
    blocks = x_SM.split(tokens_per_expert_E.tolist())
    return torch.cat([blk @ w_EMN[e] for e, blk in enumerate(blocks)])


def grouped_swiglu(
    x_SD: torch.Tensor,
    plan: DispatchPlan,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """Every expert's SwiGLU on its block of sorted rows, as two grouped GEMMs.

    The weights are passed as transposed views (no copy); ``_grouped_mm`` accepts them.

    Args:
        x_SD: (S, D) rows sorted by expert, in the compute dtype.
        plan: from :func:`dispatch_sorted`.
        gate_up_proj_EID: (E, 2I, D).
        down_proj_EDI: (E, D, I).

    Returns:
        (S, D) expert outputs, unweighted, in sorted order.
    """
    dtype = x_SD.dtype
    inter = down_proj_EDI.shape[-1]
    gate_up_EID = gate_up_proj_EID.to(dtype)
    counts_E = plan.tokens_per_expert_E
    # Gate and up as two GEMMs over weight views rather than one (S, 2I) GEMM then a split: the
    # split's backward zero-fills and copies a (S, 2I) gradient; on the 2-core CPU this is a few
    # percent faster in fp32 (61 vs 64 ms at the benchmark defaults) and equal in bf16.
    w_gate_EDI = gate_up_EID[:, :inter].transpose(1, 2)  # (E, D, I) view
    w_up_EDI = gate_up_EID[:, inter:].transpose(1, 2)  # (E, D, I) view
    gate_SI = _grouped_matmul(x_SD, w_gate_EDI, plan.offsets_E, counts_E)  # (S, I)
    up_SI = _grouped_matmul(x_SD, w_up_EDI, plan.offsets_E, counts_E)  # (S, I)
    act_SI = F.silu(gate_SI) * up_SI  # (S, I)
    w_down_EID = down_proj_EDI.to(dtype).transpose(1, 2)  # (E, I, D) view
    return _grouped_matmul(act_SI, w_down_EID, plan.offsets_E, counts_E)  # (S, D)


def combine_sorted(y_SD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Weight each slot's output, un-sort, and sum the K slots of each token.

    The weighting happens first on purpose: the multiply's backward hands ``_grouped_mm`` a
    freshly allocated, contiguous gradient (its CPU backward rejects expanded ones). Un-sorting
    is a permutation gather both ways and the K slots are summed, so forward and backward are
    deterministic (no ``index_add``/``index_put`` atomics on GPU).

    Args:
        y_SD: (S, D) expert outputs in sorted order.
        plan: from :func:`dispatch_sorted`.

    Returns:
        (T, D) in ``y_SD``'s dtype (accumulated in fp32).
    """
    yw_SD = y_SD.float() * plan.weights_S.unsqueeze(-1)  # (S, D) fp32
    yw_token_major_SD = _PermuteRows.apply(yw_SD, plan.unsort_S, plan.order_S)  # (S, D)
    y_TKD = yw_token_major_SD.view(plan.num_tokens, plan.top_k, -1)  # (T, K, D)
    return y_TKD.sum(dim=1).to(y_SD.dtype)  # (T, D)


def experts_grouped(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """Grouped backend: dispatch -> grouped SwiGLU -> combine. Same contract as :func:`experts_loop`."""
    x_TD = x_TD.to(_compute_dtype(x_TD))
    x_SD, plan = dispatch_sorted(x_TD, routing)  # (S, D)
    y_SD = grouped_swiglu(x_SD, plan, gate_up_proj_EID, down_proj_EDI)  # (S, D)
    return combine_sorted(y_SD, plan)  # (T, D)


ExpertsFn = Callable[[torch.Tensor, RouterOutput, torch.Tensor, torch.Tensor], torch.Tensor]

EXPERT_BACKENDS: "MappingProxyType[str, ExpertsFn]" = MappingProxyType(
    {"loop": experts_loop, "grouped": experts_grouped}
)


class Experts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (HF 5.23 layout).

    Args:
        num_experts: E.
        hidden_size: D.
        intermediate_size: I, each expert's width.
        backend: a key of :data:`EXPERT_BACKENDS`; may be reassigned at any time.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "grouped") -> None:
        super().__init__()
        if backend not in EXPERT_BACKENDS:
            raise ValueError(f"unknown experts backend {backend!r}; use one of {sorted(EXPERT_BACKENDS)}")
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Kaiming-uniform-like defaults, as nn.Linear would give; the model re-initialises.
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(intermediate_size), 1 / math.sqrt(intermediate_size))

    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Run the routed experts; (T, D) -> (T, D) weighted sum over each token's K experts."""
        return EXPERT_BACKENDS[self.backend](x_TD, routing, self.gate_up_proj, self.down_proj)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, intermediate={self.intermediate_size}, "
            f"backend={self.backend!r}"
        )
