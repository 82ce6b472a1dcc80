"""The token dispatcher: routed token-slots into a per-expert row buffer, and back.

Shapes (legend in ``Ava/__init__.py``): T tokens, D hidden, E experts, K experts per token, S = T·K
token-slots (slot ``t·K + k`` is token t's k-th choice), U kept slots, R rows of the expert buffer.

A MoE layer runs ``dispatch → kernel → combine`` (:mod:`~Ava.layers.experts`). The dispatcher
owns where rows live; the kernel (:mod:`~Ava.layers.expert_kernels`) only sees a buffer of
per-expert row blocks and the block sizes, so a new dispatcher (all-to-all for expert
parallelism) needs no change to any kernel. :class:`LocalDispatcher` is the single-process one;
:class:`AllToAllDispatcher` sends each slot's row to the rank that owns its expert (expert
parallelism, :mod:`~Ava.layers.expert_parallel`).

The buffer holds one block of rows per expert, in expert order; block e starts with expert e's
slots (in token order) and ends with zero rows up to the block's size. The kernel asks for the
layout (:class:`BufferLayout`): exact (R = U), rounded to a multiple (GEMM shapes repeat from
step to step), or uniform / fixed (every block the same size: an (E, C, D) batch).

Dispatch is one gather (padding rows read an appended zero row) and combine one weighted
``embedding_bag`` (each token's K rows summed in one pass, fp32 accumulation); each backward is
one gather too, as two-pass dispatches and autograd's accumulating scatters cost measurably more
(``docs/performance.md``, "Expert kernels and dispatch: the measurements behind the choices").

Slots the router left off (``routing.mask_TK``: capacity dropping, expert-choice) get no buffer
row: :func:`combine` (such plans take :func:`gather_bmm_combine`) reads them as zeros (their
weight is 0 too), and :func:`dispatch`'s backward gives them zero gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F

from .routing import RouterOutput


@dataclass(frozen=True)
class BufferLayout:
    """The row blocks a kernel needs; the dispatcher builds the buffer to match.

    Attributes:
        multiple: round every expert's block up to a multiple of this many rows (1 = exact).
        uniform: give every block the busiest expert's count rounded up to ``multiple`` (at least
            ``multiple`` rows): an (E, C, D) batch with C = R // E.
        cap: give every block exactly this many rows (overrides ``multiple``); must be at least
            the busiest expert's count.
    """

    multiple: int = 1
    uniform: bool = False
    cap: int | None = None


EXACT = BufferLayout()


@dataclass(frozen=True)
class DispatchPlan:
    """Where every token-slot's row lives in the expert buffer (what :func:`combine` needs).

    Attributes:
        row_S: (S,) long, buffer row of each token-major slot (off slots: 0, see the module doc).
        source_R: (R,) long, token of each buffer row; T on padding rows (they read a zero row).
        order_S: (S,) long, token-major slot of each slot sorted by expert (off slots last); with
            the exact layout and no off slots, the inverse of ``row_S``.
        counts_E: (E,) long, rows in each expert's block (padding included).
        weights_TK: (T, K) fp32 gate weights (0 on off slots).
        mask_TK: (T, K) bool, False on off slots; None = every slot is computed.
        num_tokens: T.
        top_k: K.
        num_kept: U, the slots computed (T·K when dropless).
        rows: R.
        padded: whether any block has padding rows (the buffer is not just the sorted slots).
    """

    row_S: torch.Tensor
    source_R: torch.Tensor
    order_S: torch.Tensor
    counts_E: torch.Tensor
    weights_TK: torch.Tensor
    mask_TK: torch.Tensor | None
    num_tokens: int
    top_k: int
    num_kept: int
    rows: int
    padded: bool


@dataclass(frozen=True)
class AllToAllPlan:
    """What :meth:`AllToAllDispatcher.combine` needs to bring the expert outputs home.

    Attributes:
        source: the stage-1 plan over this rank's tokens (exact layout: the kept slots sorted by
            global expert, so rank j's experts are one contiguous run of rows).
        local: the stage-2 plan over the received rows (one slot each, weight 1), in the kernel's
            layout over the local experts.
        send_splits: rows this rank sent to each rank of the group.
        recv_splits: rows this rank received from each rank of the group.
    """

    source: DispatchPlan
    local: DispatchPlan
    send_splits: list[int]
    recv_splits: list[int]


class TokenDispatcher(Protocol):
    """Moves token-slots to expert row blocks and back; kernels never see how."""

    def dispatch(
        self, x_TD: torch.Tensor, routing: RouterOutput, layout: BufferLayout = EXACT
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan | AllToAllPlan]:
        """(T, D) tokens -> ((R, D) expert rows, (E,) rows per block of the experts this process
        runs (all E locally, E/N under expert parallelism), the plan)."""
        ...

    def combine(self, y_RD: torch.Tensor, plan: DispatchPlan | AllToAllPlan) -> torch.Tensor:
        """(R, D) expert outputs -> (T, D) each token's gate-weighted sum of its slots."""
        ...


class LocalDispatcher:
    """The single-process dispatcher: every expert is local, the buffer is one gather away."""

    def dispatch(
        self, x_TD: torch.Tensor, routing: RouterOutput, layout: BufferLayout = EXACT
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """Gather the routed slots into the expert buffer.

        Args:
            x_TD: (T, D) hidden states, already in the kernel's compute dtype.
            routing: the router's decision.
            layout: the row blocks the kernel needs.

        Returns:
            (R, D) buffer rows, (E,) long rows per block (padding included), and the plan
            :meth:`combine` reads.
        """
        plan = plan_dispatch(routing, layout)
        return dispatch(x_TD, plan), plan.counts_E, plan

    def combine(self, y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
        """Each token's weighted sum of its K slots' rows: (R, D) -> (T, D), in ``y_RD``'s dtype."""
        return combine(y_RD, plan)

    def __repr__(self) -> str:
        return "LocalDispatcher()"


class AllToAllDispatcher:
    """Expert parallelism: each slot's row goes to the rank that owns its expert, and back.

    The N ranks of ``group`` split the E experts in contiguous runs: rank i owns experts
    ``[i·E/N, (i+1)·E/N)`` (E/N = E_l local experts). :meth:`dispatch` is two stages around one
    all-to-all:

    1. :func:`plan_dispatch` over this rank's routing with the exact layout sorts the kept slots by
       global expert, so the rows for rank j are one contiguous run (off slots are not sent);
       :func:`dispatch` gathers them.
    2. The (N, E_l) per-expert counts go through an all-to-all (rank i learns how many rows of
       each of its experts every rank sends); one host read of the split sizes follows (uneven
       splits need them on the host). The rows move with
       ``torch.distributed._functional_collectives.all_to_all_single_autograd``, whose backward is
       the reverse all-to-all.
    3. The received rows, ordered by source rank then local expert, are one slot each of a
       synthetic K = 1 routing over the E_l local experts; :func:`plan_dispatch` with the kernel's
       layout and :func:`dispatch` arrange them into local-expert blocks (padding included).

    :meth:`combine` undoes stage 3 (:func:`gather_slots`: a pure gather, no weights), sends the
    rows back with the reverse all-to-all, and runs the stage-1 :func:`combine` with the gate
    weights. Every move is a gather or a collective, so values and gradients are those of
    :class:`LocalDispatcher` up to the order of the expert-weight gradient's sum over ranks.

    Every rank of the group must call :meth:`dispatch` and :meth:`combine` (and backward) the same
    number of times in the same order; a rank with no tokens or no kept slots still takes part.

    Args:
        group: the expert-parallel process group (N ranks).
        num_experts: E, the global expert count; divisible by N.

    Raises:
        ValueError: E is not divisible by N.
    """

    def __init__(self, group: dist.ProcessGroup, num_experts: int) -> None:
        self.group = group
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size:
            raise ValueError(
                f"expert parallelism needs num_experts divisible by the expert-parallel size: "
                f"{num_experts} experts over {self.ep_size} ranks"
            )
        self.num_experts = num_experts
        self.num_local_experts = num_experts // self.ep_size

    def dispatch(
        self, x_TD: torch.Tensor, routing: RouterOutput, layout: BufferLayout = EXACT
    ) -> tuple[torch.Tensor, torch.Tensor, AllToAllPlan]:
        """Send the routed slots to their experts' ranks and arrange the received rows.

        Args:
            x_TD: (T, D) hidden states, already in the kernel's compute dtype.
            routing: the router's decision over this rank's tokens, E = the global expert count.
            layout: the row blocks the kernel needs (over the local experts).

        Returns:
            (R, D) rows of the local experts' blocks, (E_l,) long rows per local block (padding
            included), and the plan :meth:`combine` reads.
        """
        num_ranks, local = self.ep_size, self.num_local_experts
        if routing.tokens_per_expert_E.shape[0] != self.num_experts:
            raise ValueError(f"routing over {routing.tokens_per_expert_E.shape[0]} experts, "
                             f"dispatcher built for {self.num_experts}")
        source = plan_dispatch(routing, EXACT)  # kept slots sorted by global expert
        sent_UD = dispatch(x_TD, source)  # (U, D)
        counts_NL = source.counts_E.view(num_ranks, local)  # row j: my slots for rank j's experts
        # Row j of the result: rank j's slots for each of my experts.
        recv_counts_NL = funcol.wait_tensor(funcol.all_to_all_single(counts_NL, None, None, self.group))
        splits = torch.cat([counts_NL.sum(dim=1), recv_counts_NL.sum(dim=1)]).tolist()  # the host read
        send_splits, recv_splits = splits[:num_ranks], splits[num_ranks:]
        received = funcol.all_to_all_single_autograd(sent_UD, recv_splits, send_splits, self.group)
        received_MD = funcol.wait_tensor(received)  # M = received rows, by source rank then local expert
        num_received = sum(recv_splits)
        expert_M = torch.repeat_interleave(
            torch.arange(local, device=x_TD.device).repeat(num_ranks), recv_counts_NL.reshape(-1),
            output_size=num_received,
        )
        ones_M1 = torch.ones(num_received, 1, dtype=torch.float32, device=x_TD.device)
        empty_M0 = ones_M1.new_empty(num_received, 0)  # logits/probs: plan_dispatch never reads them
        received_routing = RouterOutput(
            indices_TK=expert_M.unsqueeze(1), weights_TK=ones_M1, logits_TE=empty_M0, probs_TE=empty_M0,
            tokens_per_expert_E=recv_counts_NL.sum(dim=0),
        )
        local_plan = plan_dispatch(received_routing, layout)
        rows_RD = dispatch(received_MD, local_plan)
        plan = AllToAllPlan(source=source, local=local_plan, send_splits=send_splits, recv_splits=recv_splits)
        return rows_RD, local_plan.counts_E, plan

    def combine(self, y_RD: torch.Tensor, plan: AllToAllPlan) -> torch.Tensor:
        """Bring the expert outputs home and sum each token's slots: (R, D) -> (T, D), in ``y_RD``'s dtype.

        Args:
            y_RD: (R, D) the kernel's outputs over the local blocks of :meth:`dispatch`.
            plan: :meth:`dispatch`'s plan.

        Returns:
            (T, D) each of this rank's tokens' gate-weighted sum over its kept slots.
        """
        y_MD = gather_slots(y_RD, plan.local).flatten(0, 1)  # (M, D): received order (K = 1)
        back = funcol.all_to_all_single_autograd(y_MD, plan.send_splits, plan.recv_splits, self.group)
        y_UD = funcol.wait_tensor(back)  # (U, D): my kept slots sorted by global expert
        return combine(y_UD, plan.source)

    def __deepcopy__(self, memo: dict) -> AllToAllDispatcher:
        """A copy over the same group (a process group is a handle: it cannot be copied, and a copied
        model, e.g. an EMA or a reference model, runs over the same ranks)."""
        return AllToAllDispatcher(self.group, self.num_experts)

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(ep_rank={self.ep_rank}, ep_size={self.ep_size}, "
                f"experts={self.num_experts}, local_experts={self.num_local_experts})")


def plan_dispatch(routing: RouterOutput, layout: BufferLayout = EXACT) -> DispatchPlan:
    """The buffer layout of a routing decision.

    Args:
        routing: the router's decision.
        layout: exact, rounded, uniform or fixed blocks (:class:`BufferLayout`); a ``cap`` below
            the busiest expert's count raises ValueError.

    Returns:
        The :class:`DispatchPlan`. Host reads (one sync each, free on CPU): the kept count with
        off slots; the buffer size with rounded blocks, the busiest count with ``uniform``, or
        the check of ``cap``.
    """
    multiple, cap = layout.multiple, layout.cap
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
    kept_U = order_S[:num_kept]
    if layout.uniform:
        busiest = int(counts_E.max()) if num_experts and num_kept else 0  # host read
        cap = max(-(-busiest // multiple) * multiple, multiple)
    elif cap is not None and num_experts and int(counts_E.max()) > cap:  # host read
        raise ValueError(f"cap {cap} is below the busiest expert's {int(counts_E.max())} slots")
    if cap is None and multiple == 1:
        blocks_E, rows, padded = counts_E, num_kept, False
        buffer_row_U = torch.arange(num_kept, device=device)  # sorted position = buffer row
    else:
        if cap is not None:
            blocks_E = torch.full_like(counts_E, cap)
        else:
            blocks_E = (counts_E + multiple - 1) // multiple * multiple
        ends_E = torch.cumsum(blocks_E, dim=0)
        rows = num_experts * cap if cap is not None else (int(ends_E[-1]) if num_experts else 0)  # host read
        padded = rows != num_kept
        expert_U = torch.repeat_interleave(torch.arange(num_experts, device=device), counts_E, output_size=num_kept)
        within_U = torch.arange(num_kept, device=device) - (torch.cumsum(counts_E, dim=0) - counts_E)[expert_U]
        buffer_row_U = (ends_E - blocks_E)[expert_U] + within_U  # (U,)
    row_S = torch.zeros(num_slots, dtype=torch.long, device=device).index_copy_(0, kept_U, buffer_row_U)
    token_U = kept_U // top_k
    if padded:
        source_R = torch.full((rows,), num_tokens, dtype=torch.long, device=device)  # padding rows read row T
        source_R.index_copy_(0, buffer_row_U, token_U)
    else:
        source_R = token_U
    return DispatchPlan(
        row_S=row_S, source_R=source_R, order_S=order_S, counts_E=blocks_E, weights_TK=routing.weights_TK,
        mask_TK=routing.mask_TK, num_tokens=num_tokens, top_k=top_k, num_kept=num_kept, rows=rows, padded=padded,
    )


def _token_rows(x_TD: torch.Tensor, source_R: torch.Tensor, padded: bool) -> torch.Tensor:
    """Row r of the buffer = row ``source_R[r]`` of ``x_TD``; padding rows (index T) read zeros."""
    source_TD = F.pad(x_TD, (0, 0, 0, 1)) if padded else x_TD  # row T: zeros for padding rows
    return source_TD.index_select(0, source_R)


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
        return _token_rows(x_TD, plan.source_R, plan.padded)  # (R, D)

    @staticmethod
    def backward(ctx, grad_RD):  # noqa: D102
        row_S, mask_TK = ctx.saved_tensors
        num_tokens, top_k, rows = ctx.sizes
        hidden = grad_RD.shape[-1]
        if rows == 0:  # every slot off
            return grad_RD.new_zeros(num_tokens, hidden), None
        if mask_TK is None:  # every slot kept: each token's K rows summed in one pass (fp32 accumulation)
            return F.embedding_bag(row_S.view(num_tokens, top_k), grad_RD, mode="sum"), None
        grad_TKD = grad_RD.index_select(0, row_S).view(num_tokens, top_k, hidden)
        grad_TKD.masked_fill_(~mask_TK.unsqueeze(-1), 0.0)  # off slots read row 0, not theirs
        return grad_TKD.sum(dim=1), None


def _row_dots(a_RD: torch.Tensor, b_RD: torch.Tensor) -> torch.Tensor:
    """(R,) dot products of matching rows; in bf16 the result is rounded once, as the batched
    product of the gathered combine rounded it."""
    return torch.linalg.vecdot(a_RD, b_RD)


class _WeightedSum(torch.autograd.Function):
    """Each token's K buffer rows times its gate weights, summed: (R, D) -> (T, D), every slot kept.

    Forward is one ``embedding_bag`` over the buffer: the rows are read, weighted and summed in
    one pass with fp32 accumulation, without the (T, K, D) copy of the slots. Backward: a buffer
    row's gradient is its token's output gradient times the row's weight (one gather from the
    (T, D) gradient; padding rows read a zero row and have weight 0), and a weight's gradient is
    its row's dot product with that same gathered gradient (:func:`_row_dots`).
    """

    @staticmethod
    def forward(ctx, y_RD, weights_TK, plan):  # noqa: D102
        w_TK = weights_TK.to(y_RD.dtype)  # embedding_bag wants one dtype (as HF rounds them under autocast)
        ctx.save_for_backward(y_RD, w_TK, plan.row_S, plan.source_R)
        ctx.padded, ctx.weights_dtype = plan.padded, weights_TK.dtype
        return F.embedding_bag(plan.row_S.view(w_TK.shape), y_RD, mode="sum", per_sample_weights=w_TK)

    @staticmethod
    def backward(ctx, grad_TD):  # noqa: D102
        y_RD, w_TK, row_S, source_R = ctx.saved_tensors
        grad_RD = _token_rows(grad_TD, source_R, ctx.padded)  # (R, D): the gradient of each row's token
        grad_w_TK = None
        if ctx.needs_input_grad[1]:
            grad_w_TK = _row_dots(y_RD, grad_RD).index_select(0, row_S).view(w_TK.shape).to(ctx.weights_dtype)
        w_R = w_TK.new_zeros(y_RD.shape[0]).index_copy_(0, row_S, w_TK.reshape(-1))  # padding rows: 0
        return grad_RD.mul_(w_R.unsqueeze(1)), grad_w_TK, None


class _GatherSlots(torch.autograd.Function):
    """Each token-slot's buffer row, token-major (T, K, D); off slots are zeros. Backward puts
    the kept slots' gradients back (a gather without padding, else a scatter into zeros)."""

    @staticmethod
    def forward(ctx, y_RD, plan):  # noqa: D102
        ctx.save_for_backward(plan.row_S, plan.order_S, plan.mask_TK)
        ctx.sizes = (plan.rows, plan.num_kept, plan.padded)
        hidden = y_RD.shape[-1]
        if y_RD.shape[0] == 0:  # every slot off: they read one zero row
            y_RD = F.pad(y_RD, (0, 0, 0, 1))
        y_TKD = y_RD.index_select(0, plan.row_S).view(plan.num_tokens, plan.top_k, hidden)
        if plan.mask_TK is not None:  # off slots read row 0: make them zeros
            y_TKD.masked_fill_(~plan.mask_TK.unsqueeze(-1), 0.0)
        return y_TKD

    @staticmethod
    def backward(ctx, grad_TKD):  # noqa: D102
        row_S, order_S, mask_TK = ctx.saved_tensors
        rows, num_kept, padded = ctx.sizes
        grad_SD = grad_TKD.reshape(-1, grad_TKD.shape[-1])
        if not padded:  # buffer row r is sorted position r: one gather of the kept slots
            return grad_SD.index_select(0, order_S[:num_kept]), None
        grad_RD = grad_SD.new_zeros(rows, grad_SD.shape[-1])
        if mask_TK is None:
            return grad_RD.index_copy_(0, row_S, grad_SD), None
        kept_U = order_S[:num_kept]  # off slots all point at row 0: copy the kept ones only
        return grad_RD.index_copy_(0, row_S.index_select(0, kept_U), grad_SD.index_select(0, kept_U)), None


def dispatch(x_TD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The expert buffer: (T, D) -> (R, D), block e = expert e's slots then zero rows."""
    return _Dispatch.apply(x_TD, plan)


def combine(y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """Each token's weighted sum of its K slots' expert outputs: (R, D) -> (T, D), in ``y_RD``'s dtype.

    With every slot kept (dropless routing) it is one ``embedding_bag`` (:class:`_WeightedSum`),
    which measured faster than a gathered (T, K, D) product or an fp32 multiply-and-sum
    (``docs/performance.md``, "Expert kernels and dispatch: the measurements behind the choices");
    plans with off slots take :func:`gather_bmm_combine`. Under autocast the routing weights enter
    rounded to the compute dtype, as in HF's Qwen3-MoE.
    """
    if plan.mask_TK is None and plan.rows:
        return _WeightedSum.apply(y_RD, plan.weights_TK, plan)
    return gather_bmm_combine(y_RD, plan)


def gather_bmm_combine(y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """:func:`combine` as the slots' rows gathered into (T, K, D) and one batched product per token:
    the path for plans with off slots (they read as zeros, :func:`gather_slots`)."""
    y_TKD = gather_slots(y_RD, plan)
    w_T1K = plan.weights_TK.to(y_RD.dtype).unsqueeze(1)  # (T, 1, K); off slots have weight 0
    return torch.bmm(w_T1K, y_TKD).squeeze(1)  # (T, D)


def gather_slots(y_RD: torch.Tensor, plan: DispatchPlan) -> torch.Tensor:
    """The slots' rows of the buffer, token-major (T, K, D), unweighted (what :func:`combine` sums)."""
    return _GatherSlots.apply(y_RD, plan)
