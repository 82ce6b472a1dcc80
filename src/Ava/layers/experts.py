"""Routed experts as 3-D parameters, with one function per kernel backend over the same tensors.

Legend: T tokens, D hidden, E experts, K experts per token, I expert intermediate width, F = 2I,
S = T·K token-slots (one row per (token, chosen expert) pair).

Layout (HF transformers 5.23 Qwen3-MoE): ``gate_up_proj [E, 2I, D]`` (rows ``:I`` are the gate,
``I:`` the up projection) and ``down_proj [E, D, I]``, so expert e computes
``down[e] @ (silu(gate[e] @ x) * (up[e] @ x))``. Switching backends never changes a checkpoint.

Backends (every slot the router left on is computed; slots off in ``routing.mask_TK``, from
capacity dropping or expert-choice, are skipped and contribute 0):
- ``loop``: a Python loop over experts with boolean selection; slow, obviously right, the
  reference the tests compare against.
- ``grouped``: sort token-slots by expert (dispatch), two ``torch._grouped_mm`` calls over the
  contiguous per-expert row blocks (experts), un-sort and weight-sum (combine).
- ``batched``: the same dispatch, then the rows are scattered into a zero-padded (E, C_max, D)
  buffer (C_max = the busiest expert's count) and run through ``torch.bmm``; padding rows are
  zeros, so they add nothing forward and receive no gradient.
- ``auto`` (default): :func:`resolve_backend` — ``batched`` on CPU in bf16 at balanced load,
  else ``grouped`` where ``torch._grouped_mm`` exists, else
  ``batched`` (numbers in docs/moe.md).

All compute in the autocast dtype when autocast is on (``_grouped_mm`` is not on autocast's
op list, so the cast is explicit here); the weighted combine is a batched product that
accumulates in fp32 inside the GEMM (:func:`combine_sorted`).
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
        chosen_TK = routing.indices_TK == e
        if routing.mask_TK is not None:
            chosen_TK = chosen_TK & routing.mask_TK
        tok_N, slot_N = torch.where(chosen_TK)  # N = slots expert e computes
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

    Slots that are off (``routing.mask_TK`` False) sort after every expert's block and are not
    gathered: the first ``num_kept`` sorted rows are the computed ones (S_kept = num_kept).

    Attributes:
        token_S: (S_kept,) long, the token of each computed sorted slot.
        order_S: (S,) long, the token-major slot (t·K + k) of each sorted row.
        unsort_S: (S,) long, inverse permutation: sorted row of token-major slot s = t·K + k.
        weights_TK: (T, K) fp32 gate weights in token-major order (0 for off slots).
        offsets_E: (E,) int32 cumulative row ends of each expert's block (``_grouped_mm`` offs).
        tokens_per_expert_E: (E,) long rows per expert.
        num_tokens: T.
        top_k: K.
        num_kept: S_kept = T·K when dropless.
    """

    token_S: torch.Tensor
    order_S: torch.Tensor
    unsort_S: torch.Tensor
    weights_TK: torch.Tensor
    offsets_E: torch.Tensor
    tokens_per_expert_E: torch.Tensor
    num_tokens: int
    top_k: int
    num_kept: int


class _GatherSlots(torch.autograd.Function):
    """Rows of x for each sorted slot; the backward sums each token's K slot gradients.

    Autograd's own backward of ``x[token_S]`` is an accumulating ``index_put`` (slow on CPU,
    atomic and non-deterministic on GPU); knowing the slots are a permutation of T·K rows lets
    the backward be one gather and a sum over K instead. Slots that are off (sorted last, not
    gathered) get zero gradient rows appended before the gather.
    """

    @staticmethod
    def forward(ctx, x_TD, token_S, unsort_S, top_k):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(unsort_S)
        ctx.top_k = top_k
        return x_TD.index_select(0, token_S)  # (S_kept, D)

    @staticmethod
    def backward(ctx, grad_SD):  # noqa: D102
        (unsort_S,) = ctx.saved_tensors
        grad_SD = _pad_rows(grad_SD, unsort_S.numel())  # (S, D)
        grad_TKD = grad_SD.index_select(0, unsort_S).view(-1, ctx.top_k, grad_SD.shape[-1])  # (T, K, D)
        return grad_TKD.sum(dim=1), None, None, None


def _pad_rows(x_ND: torch.Tensor, rows: int) -> torch.Tensor:
    """Append zero rows up to ``rows`` (the dropped slots); no copy when nothing is missing."""
    if x_ND.shape[0] == rows:
        return x_ND
    return F.pad(x_ND, (0, 0, 0, rows - x_ND.shape[0]))


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
    num_experts = routing.tokens_per_expert_E.shape[0]
    expert_S = routing.indices_TK.reshape(-1)  # (S,) token-major
    num_kept = expert_S.numel()
    if routing.mask_TK is not None:
        # Off slots get the id E, so the stable sort puts them after every expert's block. The
        # kept count sets a shape, so it is read on the host (one sync, only with capacity).
        expert_S = expert_S.masked_fill(~routing.mask_TK.reshape(-1), num_experts)
        num_kept = int(routing.tokens_per_expert_E.sum())
    order_S = torch.argsort(expert_S, stable=True)  # sorted row -> token-major slot
    unsort_S = torch.empty_like(order_S)
    unsort_S[order_S] = torch.arange(order_S.numel(), device=order_S.device)
    kept_S = order_S[:num_kept]
    token_S = kept_S // top_k
    plan = DispatchPlan(
        token_S=token_S,
        order_S=order_S,
        unsort_S=unsort_S,
        weights_TK=routing.weights_TK,
        offsets_E=torch.cumsum(routing.tokens_per_expert_E, dim=0).to(torch.int32),
        tokens_per_expert_E=routing.tokens_per_expert_E,
        num_tokens=num_tokens,
        top_k=top_k,
        num_kept=num_kept,
    )
    return _GatherSlots.apply(x_TD, token_S, unsort_S, top_k), plan  # (S_kept, D)


def _grouped_matmul(
    x_SM: torch.Tensor, w_EMN: torch.Tensor, offsets_E: torch.Tensor, tokens_per_expert_E: torch.Tensor
) -> torch.Tensor:
    """Row block e of ``x_SM`` times ``w_EMN[e]``; (S, M) x (E, M, N) -> (S, N)."""
    if _grouped_mm_aligned(x_SM, *w_EMN.shape[1:]):
        return torch._grouped_mm(x_SM, w_EMN, offs=offsets_E)
    # Builds without the kernel, or rows it rejects: split on the host (one sync) and loop.
    blocks = x_SM.split(tokens_per_expert_E.tolist())
    return torch.cat([blk @ w_EMN[e] for e, blk in enumerate(blocks)])


def row_multiple(x_SD: torch.Tensor) -> int:
    """Rows each expert's block is padded up to a multiple of, for the backends' GEMMs (1 = none).

    On CPU in bf16 the GEMMs run on oneDNN kernels built per shape, and routing changes every
    step, so exact per-expert row counts meant new shapes every step. Padding the row counts to
    multiples of 64 keeps the set of shapes small. ``python benchmarks/moe_layer.py --dtypes bf16
    --tokens 2048 --fresh-routing --ablations`` (fwd+bwd ms, padded / exact rows): grouped 38.0 /
    73.6 and batched 38.6 / 67.6 at 8 experts top-2; with one input reused (no new shapes) 33.1 /
    34.9 and 33.5 / 35.9, so the cost was the shapes. fp32 (MKL) and GPUs do not need it.
    """
    return 64 if x_SD.device.type == "cpu" and x_SD.dtype == torch.bfloat16 else 1


def padded_rows(
    plan: DispatchPlan, multiple: int, cap: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Where each sorted row goes when expert blocks are padded with zero rows.

    Args:
        plan: from :func:`dispatch_sorted`.
        multiple: every block's row count is rounded up to a multiple of this.
        cap: give every expert this many rows (the batched layout, already a multiple) instead of
            its own rounded count.

    Returns:
        ``(padded_S, offsets_E, counts_E, rows)``: (S_kept,) long row of each sorted row in the
        padded buffer, (E,) int32 end offsets and (E,) long sizes of the padded blocks, and the
        buffer's row count (it sets a shape: E·cap, or read on the host without ``cap``).
    """
    counts_E = plan.tokens_per_expert_E
    num_experts, num_rows = counts_E.shape[0], plan.num_kept
    if cap is not None:
        padded_E = torch.full_like(counts_E, cap)
    else:
        padded_E = (counts_E + multiple - 1) // multiple * multiple
    ends_E = torch.cumsum(padded_E, dim=0)
    expert_S = torch.repeat_interleave(torch.arange(num_experts, device=counts_E.device), counts_E,
                                       output_size=num_rows)  # (S_kept,)
    row_S = torch.arange(num_rows, device=counts_E.device) - (plan.offsets_E.long() - counts_E)[expert_S]
    padded_S = (ends_E - padded_E)[expert_S] + row_S
    rows = num_experts * cap if cap is not None else (int(ends_E[-1]) if num_experts else 0)  # host read
    return padded_S, ends_E.to(torch.int32), padded_E, rows


def grouped_swiglu(
    x_SD: torch.Tensor,
    plan: DispatchPlan,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """Every expert's SwiGLU on its block of sorted rows, as grouped GEMMs.

    Where :func:`row_multiple` asks for it (CPU bf16), the blocks are first copied into a
    zero-padded buffer whose block sizes are multiples of it (SwiGLU(0) = 0, so padding rows add
    nothing and get no gradient).

    Args:
        x_SD: (S, D) rows sorted by expert, in the compute dtype.
        plan: from :func:`dispatch_sorted`.
        gate_up_proj_EID: (E, 2I, D).
        down_proj_EDI: (E, D, I).

    Returns:
        (S, D) expert outputs, unweighted, in sorted order.
    """
    multiple = row_multiple(x_SD)
    if multiple == 1:
        return _grouped_swiglu_blocks(x_SD, plan.offsets_E, plan.tokens_per_expert_E, gate_up_proj_EID,
                                      down_proj_EDI)
    padded_S, offsets_E, counts_E, rows = padded_rows(plan, multiple)
    x_pad_PD = x_SD.new_zeros(rows, x_SD.shape[-1]).index_copy(0, padded_S, x_SD)  # (P, D)
    y_pad_PD = _grouped_swiglu_blocks(x_pad_PD, offsets_E, counts_E, gate_up_proj_EID, down_proj_EDI)
    return y_pad_PD.index_select(0, padded_S)  # (S, D)


def _grouped_mm_aligned(x: torch.Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` exists and takes rows of these widths in ``x``'s dtype: it
    (and its backward's 2-D × 2-D form) requires 16-byte aligned row strides."""
    item = x.element_size()
    return hasattr(torch, "_grouped_mm") and all((w * item) % 16 == 0 for w in (x.shape[-1], *widths))


def _grouped_swiglu_blocks(
    x_SD: torch.Tensor,
    offsets_E: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU of row block e (ending at ``offsets_E[e]``) with expert e's weights: (S, D) -> (S, D).

    The weights are passed as transposed views (no copy); ``_grouped_mm`` accepts them.
    """
    dtype = x_SD.dtype
    w_gate_up_EDF = gate_up_proj_EID.to(dtype).transpose(1, 2)  # (E, D, 2I) view
    h_SF = _grouped_matmul(x_SD, w_gate_up_EDF, offsets_E, counts_E)  # (S, 2I): gate | up
    act_SI = _SwiGLUHalves.apply(h_SF)  # (S, I)
    w_down_EID = down_proj_EDI.to(dtype).transpose(1, 2)  # (E, I, D) view
    return _grouped_matmul(act_SI, w_down_EID, offsets_E, counts_E)  # (S, D)


def _swiglu_halves_backward(
    grad_NI: torch.Tensor, h_NF: torch.Tensor, silu_NI: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient of ``silu(h[..., :I]) * h[..., I:]`` w.r.t. ``h``, written into one new (…, 2I) tensor."""
    inter = grad_NI.shape[-1]
    gate_NI, up_NI = h_NF[..., :inter], h_NF[..., inter:]
    if silu_NI is None:
        silu_NI = F.silu(gate_NI)
    grad_NF = torch.empty_like(h_NF)
    torch.ops.aten.silu_backward.grad_input(grad_NI * up_NI, gate_NI, grad_input=grad_NF[..., :inter])
    torch.mul(grad_NI, silu_NI, out=grad_NF[..., inter:])
    return grad_NF


class _SwiGLUHalves(torch.autograd.Function):
    """``silu(gate) * up`` for ``h = [gate | up]`` (one GEMM over the fused gate/up weight).

    Slicing ``h`` under autograd would give each half's gradient as a zero-filled (S, 2I) tensor
    and add the two; here backward writes both halves into one tensor.
    """

    @staticmethod
    def forward(ctx, h_SF):  # noqa: D102
        inter = h_SF.shape[-1] // 2
        ctx.save_for_backward(h_SF)
        return F.silu(h_SF[:, :inter]) * h_SF[:, inter:]

    @staticmethod
    def backward(ctx, grad_SI):  # noqa: D102
        (h_SF,) = ctx.saved_tensors
        return _swiglu_halves_backward(grad_SI, h_SF)


def combine_sorted(y_SD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Un-sort the slots' outputs and take each token's weighted sum over its K slots.

    Un-sorting is a permutation gather both ways (deterministic: no ``index_add``/``index_put``
    atomics on GPU). The weighted sum is one batched product per token, ``w_t (1, K) @ y_t (K, D)``,
    in the compute dtype with fp32 accumulation inside the GEMM, whose backward gives the slots'
    and the weights' gradients as two more batched products. Against an fp32 multiply, sum and
    cast over the (T·K, D) rows (``python benchmarks/moe_layer.py --tokens 2048 --fresh-routing
    --ablations``, fwd+bwd ms, this / ``fp32 combine``): 64 experts top-8 bf16 65.1 / 75.0
    (grouped) and 59.8 / 66.9 (batched), fp32 68.4 / 69.5; 8 experts top-2 fp32 46.0 / 48.3, bf16
    30.9 / 29.2 and 69.5 / 69.6 in a second run (noise). Under autocast the routing weights enter
    rounded to the compute dtype, as in HF's Qwen3-MoE.

    Args:
        y_SD: (S_kept, D) expert outputs in sorted order.
        plan: from :func:`dispatch_sorted`.

    Returns:
        (T, D) in ``y_SD``'s dtype.
    """
    y_SD = _pad_rows(y_SD, plan.order_S.numel())  # (S, D): off slots contribute zeros
    y_TKD = _PermuteRows.apply(y_SD, plan.unsort_S, plan.order_S).view(plan.num_tokens, plan.top_k, -1)
    w_T1K = plan.weights_TK.to(y_SD.dtype).unsqueeze(1)  # (T, 1, K); off slots have weight 0
    return torch.bmm(w_T1K, y_TKD).squeeze(1)  # (T, D)


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


# --------------------------------------------------------------------------------------------
# batched: dispatch -> zero-padded (E, C_max, D) -> bmm -> combine
# --------------------------------------------------------------------------------------------


def batched_swiglu(
    x_SD: torch.Tensor,
    plan: DispatchPlan,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """Every expert's SwiGLU as three ``bmm`` over a zero-padded per-expert buffer.

    Row r of expert e's block lands at padded row ``e·C_max + r``; the other rows stay zero, and
    since SwiGLU(0) = 0 (no biases) they add nothing and get no gradient back. C_max is the
    busiest expert's count rounded up to :func:`row_multiple`, read on the host (one sync per
    layer call).

    Args:
        x_SD: (S_kept, D) rows sorted by expert, in the compute dtype.
        plan: from :func:`dispatch_sorted`.
        gate_up_proj_EID: (E, 2I, D).
        down_proj_EDI: (E, D, I).

    Returns:
        (S_kept, D) expert outputs, unweighted, in sorted order.
    """
    dtype = x_SD.dtype
    num_experts, hidden = gate_up_proj_EID.shape[0], x_SD.shape[-1]
    multiple = row_multiple(x_SD)
    busiest = int(plan.tokens_per_expert_E.max()) if x_SD.shape[0] else 0
    cap = max(-(-busiest // multiple) * multiple, multiple)
    padded_S, _, _, rows = padded_rows(plan, multiple, cap=cap)  # row e·cap + r for row r of expert e
    x_pad_ND = x_SD.new_zeros(rows, hidden).index_copy(0, padded_S, x_SD)
    x_ECD = x_pad_ND.view(num_experts, cap, hidden)  # (E, C_max, D)
    swiglu = _batched_swiglu_autograd if dtype == torch.float32 else _BatchedSwiGLU.apply
    y_ECD = swiglu(x_ECD, gate_up_proj_EID.to(dtype), down_proj_EDI.to(dtype))  # (E, C_max, D)
    return y_ECD.reshape(num_experts * cap, hidden).index_select(0, padded_S)  # (S_kept, D)


def _batched_swiglu_autograd(x_ECD: torch.Tensor, gate_up_EFD: torch.Tensor, down_EDI: torch.Tensor) -> torch.Tensor:
    """The batched SwiGLU as plain autograd over three ``bmm`` (the fp32 path; cf. :class:`_BatchedSwiGLU`)."""
    inter = down_EDI.shape[-1]
    gate_ECI = torch.bmm(x_ECD, gate_up_EFD[:, :inter].transpose(1, 2))  # (E, C, I)
    up_ECI = torch.bmm(x_ECD, gate_up_EFD[:, inter:].transpose(1, 2))  # (E, C, I)
    return torch.bmm(F.silu(gate_ECI) * up_ECI, down_EDI.transpose(1, 2))  # (E, C, D)


class _BatchedSwiGLU(torch.autograd.Function):
    """``down(silu(x·W_gateᵀ) ⊙ x·W_upᵀ)`` per expert as 2 ``bmm`` forward and 4 backward.

    Autograd over the plain expression runs 3 ``bmm`` forward and 6 backward, and the gradient
    of the gate/up weight slices is zero-filled and copied into the (E, 2I, D) weight gradient.
    Here the gate and up projections are one ``bmm`` over the fused weight, and backward builds
    the (E, C, 2I) gradient of that product in place, so the fused weight's gradient and the
    input's gradient are one ``bmm`` each; the gate's gradient is ATen's ``silu_backward``.
    Used below fp32 only: ``python benchmarks/moe_layer.py --tokens 2048 --fresh-routing
    --ablations`` (2-core CPU, fwd+bwd ms, this / autograd): bf16 35.8 / 35.5 and 39.5 / 37.3 at
    8 experts top-2, 72.5 / 79.7 at 64 top-8; fp32 64.7 / 55.3 and 68.7 / 58.4 at 8, 106.7 / 96.7
    at 64 — so fp32 keeps plain autograd.
    """

    @staticmethod
    def forward(ctx, x_ECD, gate_up_EFD, down_EDI):  # noqa: D102  (F = 2I)
        inter = down_EDI.shape[-1]
        h_ECF = torch.bmm(x_ECD, gate_up_EFD.transpose(1, 2))  # (E, C, 2I)
        act_ECI = F.silu(h_ECF[..., :inter]) * h_ECF[..., inter:]
        ctx.save_for_backward(x_ECD, h_ECF, gate_up_EFD, down_EDI)
        return torch.bmm(act_ECI, down_EDI.transpose(1, 2))  # (E, C, D)

    @staticmethod
    def backward(ctx, grad_ECD):  # noqa: D102
        x_ECD, h_ECF, gate_up_EFD, down_EDI = ctx.saved_tensors
        inter = down_EDI.shape[-1]
        silu_ECI = F.silu(h_ECF[..., :inter])
        grad_act_ECI = torch.bmm(grad_ECD, down_EDI)  # (E, C, I)
        grad_down_EDI = torch.bmm(grad_ECD.transpose(1, 2), silu_ECI * h_ECF[..., inter:])  # (E, D, I)
        grad_h_ECF = _swiglu_halves_backward(grad_act_ECI, h_ECF, silu_ECI)  # (E, C, 2I)
        grad_gate_up_EFD = torch.bmm(grad_h_ECF.transpose(1, 2), x_ECD)  # (E, 2I, D)
        grad_x_ECD = torch.bmm(grad_h_ECF, gate_up_EFD)  # (E, C, D)
        return grad_x_ECD, grad_gate_up_EFD, grad_down_EDI


def experts_batched(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """Batched backend: dispatch -> padded bmm SwiGLU -> combine. Same contract as :func:`experts_loop`."""
    x_TD = x_TD.to(_compute_dtype(x_TD))
    x_SD, plan = dispatch_sorted(x_TD, routing)  # (S_kept, D)
    y_SD = batched_swiglu(x_SD, plan, gate_up_proj_EID, down_proj_EDI)  # (S_kept, D)
    return combine_sorted(y_SD, plan)  # (T, D)


ExpertsFn = Callable[[torch.Tensor, RouterOutput, torch.Tensor, torch.Tensor], torch.Tensor]

# --------------------------------------------------------------------------------------------
# decode fast paths: a few tokens, no autograd
# --------------------------------------------------------------------------------------------


def decode_path(x_TD: torch.Tensor, routing: RouterOutput, num_experts: int) -> str | None:
    """The inference fast path for few token-slots, or None for the configured backend.

    ``slots`` (CPU, fewer slots than experts): one SwiGLU per slot on the chosen expert's weights
    in place. ``gathered`` (accelerators, at most E/4 slots): the chosen experts' weights copied
    into one ``bmm``, with no host sync. ``python benchmarks/moe_layer.py --decode 1 2 3 4
    --moe-intermediate 256`` (E 8 top-2, µs slots / grouped / gathered): 1 token 154 / 510 / 324,
    2 tokens 294 / 614 / 607, 3 tokens 461 / 632 / 921, 4 tokens (8 slots = E) 603 / 759 / 1,028;
    an earlier run had grouped ahead at 8 slots, hence "fewer slots than experts".
    """
    if torch.is_grad_enabled() or routing.mask_TK is not None:
        return None
    slots = routing.indices_TK.numel()
    if x_TD.device.type == "cpu":
        return "slots" if slots < num_experts else None
    return "gathered" if 4 * slots <= num_experts else None


def experts_slots(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """One SwiGLU per token-slot, reading the chosen expert's weights in place: (T, D) -> (T, D).

    For one to a few decoded tokens on CPU: every op here is a small matrix-vector product whose
    cost is the dispatch, so the fewest ops win; nothing is copied (the expert index is read on
    the host, a free sync on CPU). Inference only; same math as the other backends (tests compare
    it with ``loop``).
    """
    dtype = _compute_dtype(x_TD)
    x_TD = x_TD.to(dtype)
    cast = gate_up_proj_EID.dtype != dtype  # bf16 inference over fp32 weights: cast the chosen only
    gate_weights = routing.weights_TK.tolist()  # fp32 values, exact as Python floats
    rows: list[torch.Tensor] = []
    for t, chosen in enumerate(routing.indices_TK.tolist()):
        x_1D = x_TD[t:t + 1]  # 2-D: F.linear then needs no unsqueeze/squeeze
        y_1D = None
        for e, weight in zip(chosen, gate_weights[t]):
            w_up, w_down = gate_up_proj_EID[e], down_proj_EDI[e]
            if cast:
                w_up, w_down = w_up.to(dtype), w_down.to(dtype)
            gate_1I, up_1I = F.linear(x_1D, w_up).chunk(2, dim=-1)  # (1, 2I) -> 2 × (1, I), one call
            out_1D = F.linear(F.silu(gate_1I) * up_1I, w_down).float() * weight
            y_1D = out_1D if y_1D is None else y_1D + out_1D  # fp32, summed in top-k order
        rows.append(y_1D)
    return (torch.cat(rows) if len(rows) > 1 else rows[0]).to(dtype)  # (T, D)


def experts_gathered(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """One SwiGLU per token-slot with that slot's expert weights gathered: (T, D) -> (T, D).

    With S = T·K ≤ E/4 (one decoded token) the grouped kernels still walk every expert's
    weights; gathering the S chosen expert matrices reads S/E of the memory instead, without a
    host sync (accelerators; on CPU :func:`experts_slots` is faster). Inference only; same math
    as the other backends (tests compare it with ``loop``).
    """
    dtype = _compute_dtype(x_TD)
    T, K = routing.indices_TK.shape
    idx_S = routing.indices_TK.reshape(-1)  # (S,)
    x_S1D = x_TD.to(dtype).repeat_interleave(K, dim=0).unsqueeze(1)  # (S, 1, D)
    w1_SID = gate_up_proj_EID.index_select(0, idx_S).to(dtype)  # (S, 2I, D)
    h_S2I = torch.bmm(x_S1D, w1_SID.transpose(1, 2)).squeeze(1)  # (S, 2I)
    inter = down_proj_EDI.shape[-1]
    act_S1I = (F.silu(h_S2I[:, :inter]) * h_S2I[:, inter:]).unsqueeze(1)  # (S, 1, I)
    w2_SDI = down_proj_EDI.index_select(0, idx_S).to(dtype)  # (S, D, I)
    y_SD = torch.bmm(act_S1I, w2_SDI.transpose(1, 2)).squeeze(1)  # (S, D)
    w_S1 = routing.weights_TK.reshape(-1, 1)  # (S, 1) fp32
    return (y_SD.float() * w_S1).view(T, K, -1).sum(dim=1).to(dtype)  # (T, D)


DECODE_PATHS: "MappingProxyType[str, ExpertsFn]" = MappingProxyType(
    {"slots": experts_slots, "gathered": experts_gathered}
)


EXPERT_BACKENDS: "MappingProxyType[str, ExpertsFn]" = MappingProxyType(
    {"loop": experts_loop, "batched": experts_batched, "grouped": experts_grouped}
)
BACKEND_CHOICES = (*EXPERT_BACKENDS, "auto")


BATCHED_MAX_SKEW = 2.0  # auto on CPU in bf16: batched while the busiest expert has ≤ 2× the mean load


def resolve_backend(name: str, x_TD: torch.Tensor | None = None, routing: RouterOutput | None = None) -> str:
    """The concrete backend for ``name``.

    ``auto`` is ``grouped``, except on CPU with a bf16 compute dtype (autocast or bf16 weights)
    and a balanced load (busiest expert ≤ :data:`BATCHED_MAX_SKEW` × the mean), where it is
    ``batched``; without ``torch._grouped_mm`` it is ``batched``. The rule comes from whole
    training steps on the 2-core CPU (``benchmarks/train_throughput.py``, docs/performance.md):
    fp32 ``grouped`` is 1.09–1.54× ``batched``; in bf16, with expert blocks padded to multiples
    of 64 rows (:func:`row_multiple`), the two are equal at 8 experts (3,773 vs 3,722 tok/s) and
    ``batched`` is 1.11× at 64 (one ``bmm`` per projection instead of one GEMM per expert).
    ``batched`` pads every expert to the busiest one, so under skewed load (max/mean 4–8, early
    in training or in a collapsing router) it was 1.3–2.3× slower; hence the skew limit. On GPUs
    ``grouped`` is the kernel made for this. The choice depends only on the data of the step, so
    every run and rank makes the same one.

    Args:
        name: a key of :data:`EXPERT_BACKENDS` or ``"auto"``.
        x_TD: the step's tokens (device and compute dtype), if known.
        routing: the step's routing (load), if known.

    Returns:
        A key of :data:`EXPERT_BACKENDS`.
    """
    if name != "auto":
        return name
    if not hasattr(torch, "_grouped_mm"):
        return "batched"
    if x_TD is not None and routing is not None and x_TD.device.type == "cpu" \
            and _compute_dtype(x_TD) == torch.bfloat16:
        load_E = routing.tokens_per_expert_E
        if float(load_E.max()) <= BATCHED_MAX_SKEW * float(load_E.float().mean()):
            return "batched"
    return "grouped"


class Experts(nn.Module):
    """E SwiGLU experts stored as two 3-D parameters (HF 5.23 layout).

    Args:
        num_experts: E.
        hidden_size: D.
        intermediate_size: I, each expert's width.
        backend: a key of :data:`EXPERT_BACKENDS` or ``auto``; may be reassigned at any time.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, backend: str = "grouped") -> None:
        super().__init__()
        if backend not in BACKEND_CHOICES:
            raise ValueError(f"unknown experts backend {backend!r}; use one of {sorted(BACKEND_CHOICES)}")
        self.num_experts = num_experts
        self.intermediate_size = intermediate_size
        self.backend = backend
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # Kaiming-uniform-like defaults, as nn.Linear would give; the model re-initialises.
        nn.init.uniform_(self.gate_up_proj, -1 / math.sqrt(hidden_size), 1 / math.sqrt(hidden_size))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(intermediate_size), 1 / math.sqrt(intermediate_size))

    # Data-dependent shapes and host reads: torch.compile of a layer runs this eager (graph break).
    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:
        """Run the routed experts; (T, D) -> (T, D) weighted sum over each token's K experts."""
        fast = decode_path(x_TD, routing, self.num_experts)
        if fast is not None:
            return DECODE_PATHS[fast](x_TD, routing, self.gate_up_proj, self.down_proj)
        backend = resolve_backend(self.backend, x_TD, routing)
        return EXPERT_BACKENDS[backend](x_TD, routing, self.gate_up_proj, self.down_proj)

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, intermediate={self.intermediate_size}, "
            f"backend={self.backend!r}"
        )
