"""Expert kernels: every expert's SwiGLU over a buffer of per-expert row blocks.

Shapes (legend in ``Ava/__init__.py``): R rows of the expert buffer, D hidden, E experts,
I expert intermediate width, F = 2I (fused gate|up).

A kernel is ``kernel(rows_RD, counts_E, gate_up_proj_EFD, down_proj_EDI) -> y_RD``: block e of
``rows_RD`` (``counts_E[e]`` rows, in expert order) goes through expert e, and row r of the
result is row r's output. Kernels never see tokens, routing or gate weights: the token
dispatcher (:mod:`~Ava.layers.token_dispatcher`) builds the rows and combines the outputs, so a
kernel works unchanged under any dispatcher. Padding rows are zeros and stay zeros (SwiGLU(0) = 0
without biases), so they add nothing and get no gradient.

The reference kernels live here: ``loop`` (one plain SwiGLU per block; obviously right) and
``grouped`` (``torch._grouped_mm``, the kernel made for this on GPUs and the fp32 choice on CPU).
Device-specific fast paths register beside them in :mod:`~Ava.layers.kernels`.

Layout (HF transformers 5.23 Qwen3-MoE): ``gate_up_proj [E, 2I, D]`` (rows ``:I`` are the gate,
``I:`` the up projection) and ``down_proj [E, D, I]``. The rows arrive in the compute dtype
(autocast's, when on); the weights are cast to it here, since ``_grouped_mm`` is not on
autocast's op list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .token_dispatcher import EXACT, BufferLayout

KernelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertKernel:
    """A kernel and the buffer layout it needs (resolved per device and dtype by the registry).

    Attributes:
        name: what logs and ``model.moe.backend`` call it (``loop``, ``grouped``, ``batched``).
        fn: ``fn(rows_RD, counts_E, gate_up_proj_EFD, down_proj_EDI) -> y_RD``.
        layout: the row blocks ``fn`` needs; the dispatcher builds them.
    """

    name: str
    fn: KernelFn
    layout: BufferLayout = EXACT

    def __call__(self, rows_RD: torch.Tensor, counts_E: torch.Tensor, gate_up_proj_EFD: torch.Tensor,
                 down_proj_EDI: torch.Tensor) -> torch.Tensor:
        """Run ``fn``; (R, D) -> (R, D)."""
        return self.fn(rows_RD, counts_E, gate_up_proj_EFD, down_proj_EDI)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls should run in: autocast's when it is on for ``x``'s device."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# --------------------------------------------------------------------------------------------
# loop: the reference
# --------------------------------------------------------------------------------------------


def loop_kernel(
    rows_RD: torch.Tensor, counts_E: torch.Tensor, gate_up_proj_EFD: torch.Tensor, down_proj_EDI: torch.Tensor
) -> torch.Tensor:
    """Reference kernel: one plain SwiGLU per expert block, in a Python loop.

    Args:
        rows_RD: (R, D) expert buffer, blocks in expert order, in the compute dtype.
        counts_E: (E,) rows per block (read on the host: one sync).
        gate_up_proj_EFD: (E, 2I, D) expert gate/up weights.
        down_proj_EDI: (E, D, I) expert down weights.

    Returns:
        (R, D) expert outputs, in the rows' dtype.
    """
    dtype = rows_RD.dtype
    inter = down_proj_EDI.shape[-1]
    outputs = []
    for e, block_ND in enumerate(rows_RD.split(counts_E.tolist())):  # N = rows of expert e
        h_NF = block_ND @ gate_up_proj_EFD[e].to(dtype).t()  # (N, 2I)
        act_NI = F.silu(h_NF[:, :inter]) * h_NF[:, inter:]  # (N, I)
        outputs.append(act_NI @ down_proj_EDI[e].to(dtype).t())  # (N, D)
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------
# grouped: two grouped GEMMs over the blocks
# --------------------------------------------------------------------------------------------


def grouped_mm_aligned(x: torch.Tensor, *widths: int) -> bool:
    """Whether ``torch._grouped_mm`` exists and takes rows of these widths in ``x``'s dtype: it
    (and its backward's 2-D × 2-D form) requires 16-byte aligned row strides."""
    item = x.element_size()
    return hasattr(torch, "_grouped_mm") and all((w * item) % 16 == 0 for w in (x.shape[-1], *widths))


def grouped_matmul(
    x_RM: torch.Tensor, w_EMN: torch.Tensor, offsets_E: torch.Tensor, counts_E: torch.Tensor
) -> torch.Tensor:
    """Row block e of ``x_RM`` times ``w_EMN[e]``: (R, M) x (E, M, N) -> (R, N).

    M and N are the two widths of the product (D and 2I, or I and D).
    """
    if grouped_mm_aligned(x_RM, *w_EMN.shape[1:]):
        return torch._grouped_mm(x_RM, w_EMN, offs=offsets_E)
    # Builds without the kernel, or rows it rejects: split on the host (one sync) and loop.
    blocks = x_RM.split(counts_E.tolist())
    return torch.cat([blk @ w_EMN[e] for e, blk in enumerate(blocks)])


def swiglu_halves_backward(grad_NI: torch.Tensor, h_NF: torch.Tensor, silu_NI: torch.Tensor) -> torch.Tensor:
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

    Slicing ``h`` under autograd would give each half's gradient as a zero-filled (R, 2I) tensor
    and add the two; here backward writes both halves into one tensor. ``silu(gate)`` is kept for
    backward, as autograd keeps it for ``F.silu(g) * u``: recomputing it saved (R, I) of memory
    but measured slower (``docs/performance.md``, "Expert kernels and dispatch: the measurements
    behind the choices").
    """

    @staticmethod
    def forward(ctx, h_RF):  # noqa: D102
        inter = h_RF.shape[-1] // 2
        silu_RI = F.silu(h_RF[:, :inter])
        ctx.save_for_backward(h_RF, silu_RI)
        return silu_RI * h_RF[:, inter:]

    @staticmethod
    def backward(ctx, grad_RI):  # noqa: D102
        h_RF, silu_RI = ctx.saved_tensors
        return swiglu_halves_backward(grad_RI, h_RF, silu_RI)


def grouped_kernel(
    rows_RD: torch.Tensor, counts_E: torch.Tensor, gate_up_proj_EFD: torch.Tensor, down_proj_EDI: torch.Tensor
) -> torch.Tensor:
    """Grouped kernel: the fused gate/up GEMM and the down GEMM as one ``torch._grouped_mm`` each.

    Same contract as :func:`loop_kernel`. The weights are passed as transposed views (no copy);
    ``_grouped_mm`` accepts them.
    """
    dtype = rows_RD.dtype
    offsets_E = torch.cumsum(counts_E, dim=0).to(torch.int32)  # end row of each block (``offs``)
    w_gate_up_EDF = gate_up_proj_EFD.to(dtype).transpose(1, 2)  # (E, D, 2I) view
    h_RF = grouped_matmul(rows_RD, w_gate_up_EDF, offsets_E, counts_E)  # (R, 2I): gate | up
    act_RI = _SwiGLUHalves.apply(h_RF)  # (R, I)
    w_down_EID = down_proj_EDI.to(dtype).transpose(1, 2)  # (E, I, D) view
    return grouped_matmul(act_RI, w_down_EID, offsets_E, counts_E)  # (R, D)
