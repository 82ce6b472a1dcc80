"""Dispatch and combine: the routed token-slots into a per-expert row buffer, and back.

Legend: T tokens, D hidden, E experts, K experts per token, S = T·K token-slots (slot ``t·K + k``
is token t's k-th choice, "token-major"), P rows of the expert buffer.

The buffer holds one block of rows per expert, in expert order; block e starts with expert e's
slots (in token order) and ends with zero rows up to the block's size. Three layouts:

- exact: every block is its expert's count (P = the computed slots); no padding.
- rounded (``multiple``): counts rounded up to a multiple, so GEMM shapes repeat from step to
  step (CPU bf16, :func:`~Ava.layers.experts.row_multiple`).
- fixed (``cap``, or ``uniform``: the busiest count rounded up to ``multiple``): every block has
  the same number of rows, so the buffer is an (E, cap, D) batch.

:func:`dispatch` fills the buffer with one gather (padding rows read an appended zero row) and
:func:`combine` reads it back with one weighted ``embedding_bag`` (each token's K rows summed in
one pass, fp32 accumulation); the dispatch's backward is the same unweighted. An
earlier version gathered the sorted slots first and then scattered them into the padded buffer
(and reversed both on the way back): two more passes over the (P, D) rows each way, with an
accumulating scatter in backward. ``python benchmarks/moe_layer.py --tokens 2048 --fresh-routing
--ablations`` (fwd+bwd ms, this / ``two-pass dispatch``): 64 experts top-8 bf16 54.4 / 58.7
(grouped), 41.8 / 53.2 (batched), fp32 55.3 / 57.9 and 68.3 / 73.7; 8 experts top-2 bf16
33.1 / 33.9, fp32 the same work.

Slots the router left off (``routing.mask_TK``: capacity dropping, expert-choice) get no buffer
row: :func:`combine` (such plans take :func:`gather_bmm_combine`) reads them as zeros (their
weight is 0 too), and :func:`dispatch`'s backward gives them zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .routing import RouterOutput


@dataclass(frozen=True)
class DispatchPlan:
    """Where every token-slot's row lives in the expert buffer.

    Attributes:
        row_S: (S,) long, buffer row of each token-major slot (off slots: 0, see the module doc).
        source_P: (P,) long, token of each buffer row; T on padding rows (they read a zero row).
        order_S: (S,) long, token-major slot of each slot sorted by expert (off slots last); with
            the exact layout and no off slots, the inverse of ``row_S``.
        offsets_E: (E,) int32, end row of each expert's block (``torch._grouped_mm``'s ``offs``).
        counts_E: (E,) long, rows in each expert's block (padding included).
        weights_TK: (T, K) fp32 gate weights (0 on off slots).
        mask_TK: (T, K) bool, False on off slots; None = every slot is computed.
        num_tokens: T.
        top_k: K.
        num_kept: slots computed (T·K when dropless).
        rows: P.
        padded: whether any block has padding rows (the buffer is not just the sorted slots).
    """

    row_S: torch.Tensor
    source_P: torch.Tensor
    order_S: torch.Tensor
    offsets_E: torch.Tensor
    counts_E: torch.Tensor
    weights_TK: torch.Tensor
    mask_TK: torch.Tensor | None
    num_tokens: int
    top_k: int
    num_kept: int
    rows: int
    padded: bool


def plan_dispatch(routing: RouterOutput, multiple: int = 1, cap: int | None = None,
                  uniform: bool = False) -> DispatchPlan:
    """The buffer layout of a routing decision.

    Args:
        routing: the router's decision.
        multiple: round every expert's block up to a multiple of this many rows (1 = exact).
        cap: give every block exactly this many rows; overrides ``multiple``. Must be at least
            the busiest expert's count (checked: ValueError).
        uniform: give every block the busiest expert's count rounded up to ``multiple`` (at
            least ``multiple`` rows): the (E, C, D) batch of the ``batched`` backend, whose C is
            then ``rows // E``.

    Returns:
        The :class:`DispatchPlan`. Host reads (one sync each, free on CPU): the kept count with
        off slots; the buffer size with rounded blocks, the busiest count with ``uniform``, or
        the check of ``cap``.
    """
    num_tokens, top_k = routing.indices_TK.shape
    counts_E = routing.tokens_per_expert_E
    num_experts = counts_E.shape[0]
    device = counts_E.device
    expert_S = routing.indices_TK.reshape(-1)  # (S,) token-major
    num_slots = num_kept = expert_S.numel()
    if routing.mask_TK is not None:
        # Off slots get the id E, so the stable sort puts them after every expert's block.
        expert_S = expert_S.masked_fill(~routing.mask_TK.reshape(-1), num_experts)
        num_kept = int(counts_E.sum())
    order_S = torch.argsort(expert_S, stable=True)  # sorted position -> token-major slot
    kept_S = order_S[:num_kept]
    if uniform:
        busiest = int(counts_E.max()) if num_experts and num_kept else 0  # host read
        cap = max(-(-busiest // multiple) * multiple, multiple)
    elif cap is not None and num_experts and int(counts_E.max()) > cap:  # host read
        raise ValueError(f"cap {cap} is below the busiest expert's {int(counts_E.max())} slots")
    if cap is None and multiple == 1:
        blocks_E, rows, padded = counts_E, num_kept, False
        ends_E = torch.cumsum(counts_E, dim=0)
        buffer_row_K = torch.arange(num_kept, device=device)  # (S_kept,) sorted position = buffer row
    else:
        blocks_E = torch.full_like(counts_E, cap) if cap is not None else (counts_E + multiple - 1) // multiple * multiple
        ends_E = torch.cumsum(blocks_E, dim=0)
        rows = num_experts * cap if cap is not None else (int(ends_E[-1]) if num_experts else 0)  # host read
        padded = rows != num_kept
        expert_K = torch.repeat_interleave(torch.arange(num_experts, device=device), counts_E, output_size=num_kept)
        within_K = torch.arange(num_kept, device=device) - (torch.cumsum(counts_E, dim=0) - counts_E)[expert_K]
        buffer_row_K = (ends_E - blocks_E)[expert_K] + within_K  # (S_kept,)
    row_S = torch.zeros(num_slots, dtype=torch.long, device=device).index_copy_(0, kept_S, buffer_row_K)
    token_K = kept_S // top_k
    if padded:
        source_P = torch.full((rows,), num_tokens, dtype=torch.long, device=device).index_copy_(0, buffer_row_K, token_K)
    else:
        source_P = token_K
    return DispatchPlan(
        row_S=row_S, source_P=source_P, order_S=order_S, offsets_E=ends_E.to(torch.int32), counts_E=blocks_E,
        weights_TK=routing.weights_TK, mask_TK=routing.mask_TK, num_tokens=num_tokens, top_k=top_k,
        num_kept=num_kept, rows=rows, padded=padded,
    )


def _token_rows(x_TD: torch.Tensor, source_P: torch.Tensor, padded: bool) -> torch.Tensor:
    """Row p of the buffer = row ``source_P[p]`` of ``x_TD``; padding rows (index T) read zeros."""
    source_TD = F.pad(x_TD, (0, 0, 0, 1)) if padded else x_TD  # row T: zeros for padding rows
    return source_TD.index_select(0, source_P)


class _Dispatch(torch.autograd.Function):
    """Buffer rows gathered from the tokens; backward sums each token's K slot gradients.

    Autograd's own backward of ``x[source]`` is an accumulating scatter (``index_add``: slow on
    CPU, atomic and non-deterministic on GPU); knowing each token feeds exactly its K slots
    makes it one gather and a sum over K.
    """

    @staticmethod
    def forward(ctx, x_TD, plan):  # noqa: D102 (autograd protocol)
        ctx.save_for_backward(plan.row_S, plan.mask_TK)
        ctx.sizes = (plan.num_tokens, plan.top_k, plan.rows)
        return _token_rows(x_TD, plan.source_P, plan.padded)  # (P, D)

    @staticmethod
    def backward(ctx, grad_PD):  # noqa: D102
        row_S, mask_TK = ctx.saved_tensors
        num_tokens, top_k, rows = ctx.sizes
        hidden = grad_PD.shape[-1]
        if rows == 0:  # every slot off
            return grad_PD.new_zeros(num_tokens, hidden), None
        if mask_TK is None:  # every slot kept: each token's K rows summed in one pass (fp32 accumulation)
            return F.embedding_bag(row_S.view(num_tokens, top_k), grad_PD, mode="sum"), None
        grad_TKD = grad_PD.index_select(0, row_S).view(num_tokens, top_k, hidden)
        grad_TKD.masked_fill_(~mask_TK.unsqueeze(-1), 0.0)  # off slots read row 0, not theirs
        return grad_TKD.sum(dim=1), None


def _row_dots(a_PD: torch.Tensor, b_PD: torch.Tensor) -> torch.Tensor:
    """(P,) dot products of matching rows (``linalg.vecdot``; in bf16 the result is rounded once,
    as the batched product of the gathered combine rounded it).

    Against a multiply and an fp32 sum (``python benchmarks/moe_layer.py --tokens 4096 --experts
    64 --top-k 8 --moe-intermediate 128 --ablations``, ``grouped`` fwd+bwd ms, this / ``summed
    dots``, two runs): bf16 67.2 / 75.2 and 58.4 / 60.4; fp32 110.5 / 108.0 and 120.0 / 120.3.
    """
    return torch.linalg.vecdot(a_PD, b_PD)


class _WeightedSum(torch.autograd.Function):
    """Each token's K buffer rows times its gate weights, summed: (P, D) -> (T, D), every slot kept.

    Forward is one ``embedding_bag`` over the buffer: the rows are read, weighted and summed in
    one pass with fp32 accumulation, without the (T, K, D) copy of the slots. Backward: a buffer
    row's gradient is its token's output gradient times the row's weight (one gather from the
    (T, D) gradient; padding rows read a zero row and have weight 0), and a weight's gradient is
    its row's dot product with that same gathered gradient (:func:`_row_dots`).
    """

    @staticmethod
    def forward(ctx, y_PD, weights_TK, plan):  # noqa: D102
        w_TK = weights_TK.to(y_PD.dtype)  # embedding_bag wants one dtype (as HF rounds them under autocast)
        ctx.save_for_backward(y_PD, w_TK, plan.row_S, plan.source_P)
        ctx.padded, ctx.weights_dtype = plan.padded, weights_TK.dtype
        return F.embedding_bag(plan.row_S.view(w_TK.shape), y_PD, mode="sum", per_sample_weights=w_TK)

    @staticmethod
    def backward(ctx, grad_TD):  # noqa: D102
        y_PD, w_TK, row_S, source_P = ctx.saved_tensors
        grad_PD = _token_rows(grad_TD, source_P, ctx.padded)  # (P, D): the gradient of each row's token
        grad_w_TK = None
        if ctx.needs_input_grad[1]:
            grad_w_TK = _row_dots(y_PD, grad_PD).index_select(0, row_S).view(w_TK.shape).to(ctx.weights_dtype)
        w_P = w_TK.new_zeros(y_PD.shape[0]).index_copy_(0, row_S, w_TK.reshape(-1))  # padding rows: 0
        return grad_PD.mul_(w_P.unsqueeze(1)), grad_w_TK, None


class _GatherSlots(torch.autograd.Function):
    """Each token-slot's buffer row, token-major (T, K, D); off slots are zeros. Backward puts
    the kept slots' gradients back (a gather without padding, else a scatter into zeros)."""

    @staticmethod
    def forward(ctx, y_PD, plan):  # noqa: D102
        ctx.save_for_backward(plan.row_S, plan.order_S, plan.mask_TK)
        ctx.sizes = (plan.rows, plan.num_kept, plan.padded)
        hidden = y_PD.shape[-1]
        if y_PD.shape[0] == 0:  # every slot off: they read one zero row
            y_PD = F.pad(y_PD, (0, 0, 0, 1))
        y_TKD = y_PD.index_select(0, plan.row_S).view(plan.num_tokens, plan.top_k, hidden)
        if plan.mask_TK is not None:  # off slots read row 0: make them zeros
            y_TKD.masked_fill_(~plan.mask_TK.unsqueeze(-1), 0.0)
        return y_TKD

    @staticmethod
    def backward(ctx, grad_TKD):  # noqa: D102
        row_S, order_S, mask_TK = ctx.saved_tensors
        rows, num_kept, padded = ctx.sizes
        grad_SD = grad_TKD.reshape(-1, grad_TKD.shape[-1])
        if not padded:  # buffer row p is sorted position p: one gather of the kept slots
            return grad_SD.index_select(0, order_S[:num_kept]), None
        grad_PD = grad_SD.new_zeros(rows, grad_SD.shape[-1])
        if mask_TK is None:
            return grad_PD.index_copy_(0, row_S, grad_SD), None
        kept_S = order_S[:num_kept]  # off slots all point at row 0: copy the kept ones only
        return grad_PD.index_copy_(0, row_S.index_select(0, kept_S), grad_SD.index_select(0, kept_S)), None


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The expert buffer: (T, D) -> (P, D), block e = expert e's slots then zero rows."""
    return _Dispatch.apply(x_TD, plan)


def combine(y_PD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Each token's weighted sum of its K slots' expert outputs: (P, D) -> (T, D), in ``y_PD``'s dtype.

    With every slot kept (dropless routing) it is one ``embedding_bag`` (:class:`_WeightedSum`);
    plans with off slots take :func:`gather_bmm_combine`. ``python benchmarks/moe_layer.py
    --tokens 2048 --fresh-routing --ablations`` (fwd+bwd ms of the layer, this / ``gathered
    combine``, which also restores the dispatch's gather-and-sum backward): 8 experts top-2 bf16
    25.0 / 28.5 (grouped) and 28.4 / 30.7 (batched), fp32 48.5 / 48.6; 64 experts top-8 bf16
    62.1 / 64.3 and 48.0 / 51.1, fp32 75.3 / 77.2 and 89.2 / 91.0. The gathered form had in turn
    beaten an fp32 multiply, sum and cast over the (T·K, D) rows (``fp32 combine``: 64 experts
    top-8 bf16 65.1 / 75.0 grouped, 59.8 / 66.9 batched). Under autocast the routing weights
    enter rounded to the compute dtype, as in HF's Qwen3-MoE.
    """
    if plan.mask_TK is None and plan.rows:
        return _WeightedSum.apply(y_PD, plan.weights_TK, plan)
    return gather_bmm_combine(y_PD, plan)


def gather_bmm_combine(y_PD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """:func:`combine` as the slots' rows gathered into (T, K, D) and one batched product per token:
    the path for plans with off slots (they read as zeros, :func:`gather_slots`)."""
    y_TKD = gather_slots(y_PD, plan)
    w_T1K = plan.weights_TK.to(y_PD.dtype).unsqueeze(1)  # (T, 1, K); off slots have weight 0
    return torch.bmm(w_T1K, y_TKD).squeeze(1)  # (T, D)


def gather_slots(y_PD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The slots' rows of the buffer, token-major (T, K, D), unweighted (what :func:`combine` sums)."""
    return _GatherSlots.apply(y_PD, plan)
