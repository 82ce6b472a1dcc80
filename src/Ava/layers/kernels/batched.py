"""The ``batched`` kernel: every expert's SwiGLU as ``bmm`` over a uniform (E, C, D) buffer.

Shapes (legend in ``Ava/__init__.py``): E experts, C rows per expert block, D hidden,
I expert intermediate width, F = 2I.

Every block is padded to the busiest expert's count (the dispatcher's uniform layout), so the
buffer is one batch. On CPU in bf16 one ``bmm`` per projection runs at the bf16 matmul rate,
where CPU ``_grouped_mm`` runs one small ``mm`` per expert: with many small experts at balanced
load that wins (the ``auto`` rule in :mod:`~Ava.layers.kernels.registry`). It is also the
fallback where ``torch._grouped_mm`` does not exist.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..expert_kernels import swiglu_halves_backward


def batched_swiglu_autograd(x_ECD: torch.Tensor, gate_up_EFD: torch.Tensor, down_EDI: torch.Tensor) -> torch.Tensor:
    """The batched SwiGLU as plain autograd over three ``bmm`` (the fp32 path; cf. :class:`BatchedSwiGLU`)."""
    inter = down_EDI.shape[-1]
    gate_ECI = torch.bmm(x_ECD, gate_up_EFD[:, :inter].transpose(1, 2))  # (E, C, I)
    up_ECI = torch.bmm(x_ECD, gate_up_EFD[:, inter:].transpose(1, 2))  # (E, C, I)
    return torch.bmm(F.silu(gate_ECI) * up_ECI, down_EDI.transpose(1, 2))  # (E, C, D)


class BatchedSwiGLU(torch.autograd.Function):
    """``down(silu(x·W_gateᵀ) ⊙ x·W_upᵀ)`` per expert as 2 ``bmm`` forward and 4 backward.

    Autograd over the plain expression runs 3 ``bmm`` forward and 6 backward, and the gradient
    of the gate/up weight slices is zero-filled and copied into the (E, 2I, D) weight gradient.
    Here the gate and up projections are one ``bmm`` over the fused weight, and backward builds
    the (E, C, 2I) gradient of that product in place, so the fused weight's gradient and the
    input's gradient are one ``bmm`` each; the gate's gradient is ATen's ``silu_backward``.
    Used below fp32 only, where it measured faster; in fp32 plain autograd was faster
    (``docs/performance.md``, "Expert kernels and dispatch: the measurements behind the choices").
    """

    @staticmethod
    def forward(ctx, x_ECD, gate_up_EFD, down_EDI):  # noqa: D102
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
        grad_h_ECF = swiglu_halves_backward(grad_act_ECI, h_ECF, silu_ECI)  # (E, C, 2I)
        grad_gate_up_EFD = torch.bmm(grad_h_ECF.transpose(1, 2), x_ECD)  # (E, 2I, D)
        grad_x_ECD = torch.bmm(grad_h_ECF, gate_up_EFD)  # (E, C, D)
        return grad_x_ECD, grad_gate_up_EFD, grad_down_EDI


def _batched(
    swiglu: Callable[..., torch.Tensor], rows_RD: torch.Tensor, gate_up_proj_EFD: torch.Tensor,
    down_proj_EDI: torch.Tensor,
) -> torch.Tensor:
    """The (R, D) uniform buffer as an (E, C, D) batch through ``swiglu``, back to (R, D)."""
    dtype, hidden = rows_RD.dtype, rows_RD.shape[-1]
    num_experts = gate_up_proj_EFD.shape[0]
    x_ECD = rows_RD.view(num_experts, rows_RD.shape[0] // num_experts, hidden)  # (E, C, D)
    y_ECD = swiglu(x_ECD, gate_up_proj_EFD.to(dtype), down_proj_EDI.to(dtype))  # (E, C, D)
    return y_ECD.reshape(rows_RD.shape)  # (R, D)


def batched_kernel(
    rows_RD: torch.Tensor, counts_E: torch.Tensor, gate_up_proj_EFD: torch.Tensor, down_proj_EDI: torch.Tensor
) -> torch.Tensor:
    """Batched kernel with the hand-written backward (:class:`BatchedSwiGLU`; below fp32).

    Args:
        rows_RD: (R, D) uniform buffer: E blocks of C = R / E rows, in the compute dtype.
        counts_E: (E,) rows per block (all C; unused, the shape says it).
        gate_up_proj_EFD: (E, 2I, D) expert gate/up weights.
        down_proj_EDI: (E, D, I) expert down weights.

    Returns:
        (R, D) expert outputs, in the rows' dtype.
    """
    return _batched(BatchedSwiGLU.apply, rows_RD, gate_up_proj_EFD, down_proj_EDI)


def batched_autograd_kernel(
    rows_RD: torch.Tensor, counts_E: torch.Tensor, gate_up_proj_EFD: torch.Tensor, down_proj_EDI: torch.Tensor
) -> torch.Tensor:
    """Batched kernel under plain autograd (:func:`batched_swiglu_autograd`; fp32). Same contract
    as :func:`batched_kernel`."""
    return _batched(batched_swiglu_autograd, rows_RD, gate_up_proj_EFD, down_proj_EDI)
