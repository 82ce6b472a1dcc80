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
- ``grouped``: dispatch the token-slots into a buffer of per-expert row blocks (one gather,
  ``expert_dispatch.py``), two ``torch._grouped_mm`` calls over the blocks, and combine (one
  gather and a batched weighted sum). On CPU in bf16 the blocks are padded with zero rows to
  multiples of 64 (:func:`row_multiple`).
- ``batched``: the same, with every block padded to the busiest expert's count, so the buffer is
  an (E, C_max, D) batch for ``torch.bmm``; padding rows are zeros, so they add nothing forward
  and receive no gradient.
- ``auto`` (default): :func:`resolve_backend` — ``batched`` on CPU in bf16 with many experts
  at balanced load, else ``grouped`` where ``torch._grouped_mm`` exists, else
  ``batched`` (numbers in docs/moe.md).

All compute in the autocast dtype when autocast is on (``_grouped_mm`` is not on autocast's
op list, so the cast is explicit here); the weighted combine is a batched product that
accumulates in fp32 inside the GEMM (:func:`~Ava.layers.expert_dispatch.combine`).
"""

from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .expert_dispatch import combine, dispatch, plan_dispatch
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


def row_multiple(x_TD: torch.Tensor) -> int:
    """Rows each expert's block is padded up to a multiple of, for the backends' GEMMs (1 = none).

    On CPU in bf16 the GEMMs run on oneDNN kernels built per shape, and routing changes every
    step, so exact per-expert row counts meant new shapes every step. Padding the row counts to
    multiples of 64 keeps the set of shapes small. ``python benchmarks/moe_layer.py --dtypes bf16
    --tokens 2048 --fresh-routing --ablations`` (fwd+bwd ms, padded / exact rows): grouped 38.0 /
    73.6 and batched 38.6 / 67.6 at 8 experts top-2; with one input reused (no new shapes) 33.1 /
    34.9 and 33.5 / 35.9, so the cost was the shapes. fp32 (MKL) and GPUs do not need it.
    """
    return 64 if x_TD.device.type == "cpu" and x_TD.dtype == torch.bfloat16 else 1


def _grouped_matmul(
    x_PM: torch.Tensor, w_EMN: torch.Tensor, offsets_E: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """Row block e of ``x_PM`` times ``w_EMN[e]``; (P, M) x (E, M, N) -> (P, N)."""
    if _grouped_mm_aligned(x_PM, *w_EMN.shape[1:]):
        return torch._grouped_mm(x_PM, w_EMN, offs=offsets_E)
    # Builds without the kernel, or rows it rejects: split on the host (one sync) and loop.
    blocks = x_PM.split(counts_E.tolist())
    return torch.cat([blk @ w_EMN[e] for e, blk in enumerate(blocks)])


def _grouped_mm_aligned(x: torch.Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` exists and takes rows of these widths in ``x``'s dtype: it
    (and its backward's 2-D × 2-D form) requires 16-byte aligned row strides."""
    item = x.element_size()
    return hasattr(torch, "_grouped_mm") and all((w * item) % 16 == 0 for w in (x.shape[-1], *widths))


def _grouped_swiglu_blocks(
    x_PD: torch.Tensor,
    offsets_E: torch.Tensor,
    counts_E: torch.Tensor,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """SwiGLU of row block e (ending at ``offsets_E[e]``) with expert e's weights: (P, D) -> (P, D).

    Zero rows (padding) stay zero: SwiGLU(0) = 0 without biases, and they get no gradient. The
    weights are passed as transposed views (no copy); ``_grouped_mm`` accepts them.
    """
    dtype = x_PD.dtype
    w_gate_up_EDF = gate_up_proj_EID.to(dtype).transpose(1, 2)  # (E, D, 2I) view
    h_PF = _grouped_matmul(x_PD, w_gate_up_EDF, offsets_E, counts_E)  # (P, 2I): gate | up
    act_PI = _SwiGLUHalves.apply(h_PF)  # (P, I)
    w_down_EID = down_proj_EDI.to(dtype).transpose(1, 2)  # (E, I, D) view
    return _grouped_matmul(act_PI, w_down_EID, offsets_E, counts_E)  # (P, D)


def _swiglu_halves_backward(grad_NI: torch.Tensor, h_NF: torch.Tensor, silu_NI: torch.Tensor) -> torch.Tensor:
    """Gradient of ``silu(h[..., :I]) * h[..., I:]`` w.r.t. ``h`` (``silu_NI`` = ``silu(h[..., :I])``),
    written into one new (…, 2I) tensor."""
    inter = grad_NI.shape[-1]
    gate_NI, up_NI = h_NF[..., :inter], h_NF[..., inter:]
    grad_NF = torch.empty_like(h_NF)
    torch.ops.aten.silu_backward.grad_input(grad_NI * up_NI, gate_NI, grad_input=grad_NF[..., :inter])
    torch.mul(grad_NI, silu_NI, out=grad_NF[..., inter:])
    return grad_NF


class _SwiGLUHalves(torch.autograd.Function):
    """``silu(gate) * up`` for ``h = [gate | up]`` (one GEMM over the fused gate/up weight).

    Slicing ``h`` under autograd would give each half's gradient as a zero-filled (P, 2I) tensor
    and add the two; here backward writes both halves into one tensor. ``silu(gate)`` is kept for
    backward, as autograd keeps it for ``F.silu(g) * u``: recomputing it saved (P, I) of memory
    but cost a pass over the gate (``python benchmarks/moe_layer.py --tokens 4096 --ablations``,
    ``grouped`` fwd+bwd ms kept / ``recomputed silu``: fp32 109.3 / 111.0 at 8 experts top-2,
    154.4 / 157.4 at 64 top-8; bf16 62.5 / 66.3 and 100.2 / 101.1).
    """

    @staticmethod
    def forward(ctx, h_PF):  # noqa: D102
        inter = h_PF.shape[-1] // 2
        silu_PI = F.silu(h_PF[:, :inter])
        ctx.save_for_backward(h_PF, silu_PI)
        return silu_PI * h_PF[:, inter:]

    @staticmethod
    def backward(ctx, grad_PI):  # noqa: D102
        h_PF, silu_PI = ctx.saved_tensors
        return _swiglu_halves_backward(grad_PI, h_PF, silu_PI)


def experts_grouped(
    x_TD: torch.Tensor,
    routing: RouterOutput,
    gate_up_proj_EID: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """Grouped backend: dispatch -> grouped SwiGLU -> combine. Same contract as :func:`experts_loop`.

    Expert blocks are exact, or rounded up to :func:`row_multiple` rows (CPU bf16).
    """
    x_TD = x_TD.to(_compute_dtype(x_TD))
    plan = plan_dispatch(routing, row_multiple(x_TD))
    x_PD = dispatch(x_TD, plan)  # (P, D)
    y_PD = _grouped_swiglu_blocks(x_PD, plan.offsets_E, plan.counts_E, gate_up_proj_EID, down_proj_EDI)
    return combine(y_PD, plan)  # (T, D)


# --------------------------------------------------------------------------------------------
# batched: dispatch into (E, C_max, D) -> bmm -> combine
# --------------------------------------------------------------------------------------------


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
    """Batched backend: every expert's SwiGLU as ``bmm`` over an (E, C_max, D) buffer. Same contract
    as :func:`experts_loop`.

    Every block has C_max rows, the busiest expert's count rounded up to :func:`row_multiple`
    (read on the host: one sync per layer call); the rows past an expert's count are zeros, so
    they add nothing and get no gradient.
    """
    x_TD = x_TD.to(_compute_dtype(x_TD))
    dtype, hidden = x_TD.dtype, x_TD.shape[-1]
    num_experts = gate_up_proj_EID.shape[0]
    plan = plan_dispatch(routing, row_multiple(x_TD), uniform=True)
    cap = plan.rows // num_experts
    x_ECD = dispatch(x_TD, plan).view(num_experts, cap, hidden)  # (E, C_max, D)
    swiglu = _batched_swiglu_autograd if dtype == torch.float32 else _BatchedSwiGLU.apply
    y_ECD = swiglu(x_ECD, gate_up_proj_EID.to(dtype), down_proj_EDI.to(dtype))  # (E, C_max, D)
    return combine(y_ECD.reshape(num_experts * cap, hidden), plan)  # (T, D)


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
BATCHED_MIN_EXPERTS = 33  # ... and only with more experts than 32


def resolve_backend(name: str, x_TD: torch.Tensor | None = None, routing: RouterOutput | None = None) -> str:
    """The concrete backend for ``name``.

    ``auto`` is ``grouped``, except on CPU with a bf16 compute dtype (autocast or bf16 weights),
    more than 32 experts (:data:`BATCHED_MIN_EXPERTS`) and a balanced load (busiest expert ≤
    :data:`BATCHED_MAX_SKEW` × the mean), where it is ``batched``; without ``torch._grouped_mm`` it
    is ``batched``. In fp32 ``grouped`` is 1.09–1.54× ``batched`` over whole training steps
    (``benchmarks/train_throughput.py``, docs/performance.md). In CPU bf16 (expert blocks padded
    to multiples of 64 rows, :func:`row_multiple`), one layer fwd+bwd at balanced load
    (``python benchmarks/moe_layer.py --dtypes bf16 --tokens 2048 --fresh-routing``, ms grouped /
    batched): 8 experts top-2 27.4 / 30.8, 16 top-2 45.1 / 50.5, 32 top-4 50.4 / 49.8, 32 top-8
    47.7 / 45.4, 64 top-8 52.2 / 40.1 — one ``bmm`` per projection pays off over one GEMM per
    expert only with many small experts. ``batched`` pads every expert to the busiest one, so
    under skew it loses (``--skew``: 64 top-8 at max/mean 2.1 48.2 / 62.9, at 3.3 60.4 / 125.2;
    8 top-2 at 1.43 34.0 / 48.4); hence the skew limit. On GPUs ``grouped`` is the kernel made
    for this. The choice depends only on the data of the step, so every run and rank makes the
    same one.

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
    if x_TD is not None and routing is not None:
        load_E = routing.tokens_per_expert_E
        if _batched_when_balanced(x_TD.device.type, _compute_dtype(x_TD), load_E.numel()) \
                and float(load_E.max()) <= BATCHED_MAX_SKEW * float(load_E.float().mean()):
            return "batched"
    return "grouped"


def _batched_when_balanced(device_type: str, compute_dtype: torch.dtype, num_experts: int) -> bool:
    """Whether ``auto`` runs ``batched`` at balanced load here (CPU, bf16, many experts)."""
    return device_type == "cpu" and compute_dtype == torch.bfloat16 and num_experts >= BATCHED_MIN_EXPERTS


def describe_auto(device_type: str, compute_dtype: torch.dtype, num_experts: int) -> str:
    """What :func:`resolve_backend` makes of ``auto`` for this device, dtype and expert count (for logs)."""
    if not hasattr(torch, "_grouped_mm"):
        return "batched"
    if _batched_when_balanced(device_type, compute_dtype, num_experts):
        return f"batched while the busiest expert has ≤ {BATCHED_MAX_SKEW:g}× the mean load, else grouped"
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
