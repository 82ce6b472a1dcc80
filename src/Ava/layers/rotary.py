"""Rotary position embeddings (RoPE, Su et al. 2021), rotate-half convention of HF Llama/Qwen3.

Shape suffixes: see ``Ava/__init__.py``; here B batch, T positions, H heads (query or key/value
heads alike), A head dim (even; A/2 rotary frequencies).
"""

from __future__ import annotations

import torch
from torch import nn

from .norm import rms_norm_backward


class RotaryEmbedding(nn.Module):
    """A cos/sin table for positions ``0..max_positions-1``, looked up by position ids.

    The table is a non-persistent buffer: it is derived from the config, so it never enters a
    checkpoint and follows the module across ``.to(device)``.

    Args:
        head_dim: A, the per-head width (even).
        max_positions: the number of positions in the table (the model's ``max_seq_len``).
        theta: base frequency.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float = 10000.0) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.theta = theta
        self.register_buffer("cos_TA", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin_TA", torch.empty(max_positions, head_dim), persistent=False)
        if self.cos_TA.device.type != "meta":
            self.reset_table()

    @torch.no_grad()
    def reset_table(self) -> None:
        """(Re)compute the cos/sin tables in place, on their device (after building on the meta
        device and materialising, they hold garbage until this runs)."""
        head_dim, device = self.head_dim, self.cos_TA.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (A/2,)
        pos_T = torch.arange(self.max_positions, dtype=torch.float64)
        angles = torch.outer(pos_T, inv_freq)  # (T, A/2)
        angles_TA = torch.cat([angles, angles], dim=-1)  # rotate-half pairs i with i + A/2
        self.cos_TA.copy_(angles_TA.cos().float().to(device))
        self.sin_TA.copy_(angles_TA.sin().float().to(device))

    def forward(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Look up the table.

        Args:
            position_ids_BT: (B, T) long, each < ``max_positions`` (an index error otherwise).

        Returns:
            ``(cos_BT1A, sin_BT1A)``, both fp32 (B, T, 1, A): the head axis is 1 so the tables
            broadcast over any number of heads (made once per forward, used by every layer).
        """
        return self.cos_TA[position_ids_BT].unsqueeze(2), self.sin_TA[position_ids_BT].unsqueeze(2)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(
    x_BTHA: torch.Tensor, cos_BT1A: torch.Tensor, sin_BT1A: torch.Tensor
) -> torch.Tensor:
    """Rotate queries or keys by their positions.

    Args:
        x_BTHA: (B, T, H, A) queries or keys.
        cos_BT1A, sin_BT1A: (B, T, 1, A) from :class:`RotaryEmbedding`.

    Returns:
        (B, T, H, A) in the dtype of ``x_BTHA``.
    """
    if cos_BT1A.dtype != x_BTHA.dtype:
        cos_BT1A, sin_BT1A = cos_BT1A.to(x_BTHA.dtype), sin_BT1A.to(x_BTHA.dtype)
    return x_BTHA * cos_BT1A + _rotate_half(x_BTHA) * sin_BT1A


def _rotate_into(out: torch.Tensor, x: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """``out += sign · rotate_half(x) · sin`` in place, half by half (no rotated copy of ``x``)."""
    half = x.shape[-1] // 2
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-sign)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:], value=sign)
    return out


def _wide(x: torch.Tensor) -> torch.Tensor:
    """``x`` in fp32 if it is narrower (bf16, fp16), else as it is (fp32; fp64 for gradcheck)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


class _NormRotary(torch.autograd.Function):
    """Per-head RMSNorm in fp32, then RoPE, then the cast to the input's dtype, as one function.

    Autograd over the module-by-module path (bf16 queries under autocast: a cast to fp32, the
    norm's decomposition, a cast back to bf16 and up again for the fp32 gain, RoPE's mul, neg,
    cat, mul and add, the final cast) keeps and walks about 15 tensors the size of q per step
    each way. Here forward is a cast, ATen's fused norm, one multiply and two half-width
    multiply-adds and a cast; backward is the transposed rotation (the same three ops) and the
    norm's backward (:func:`~Ava.layers.norm.rms_norm_backward`). The normalised queries are not
    rounded to the input dtype before the gain (the module path rounds them): the product is
    taken in fp32 and rounded once, at the end. Faster in fp32 and bf16 (``docs/performance.md``,
    "Attention, norms, rotary and the fused head").
    """

    @staticmethod
    def forward(ctx, x_BTHA, weight_A, eps, cos_BT1A, sin_BT1A):  # noqa: D102
        x32 = _wide(x_BTHA)
        y, rstd = torch.ops.aten._fused_rms_norm(x32, [x32.shape[-1]], weight_A, eps)
        out = _rotate_into(y * cos_BT1A, y, sin_BT1A, 1.0)
        ctx.save_for_backward(x_BTHA, weight_A, rstd, cos_BT1A, sin_BT1A)
        return out.to(x_BTHA.dtype)

    @staticmethod
    def backward(ctx, grad_BTHA):  # noqa: D102
        x_BTHA, weight_A, rstd, cos_BT1A, sin_BT1A = ctx.saved_tensors
        g32 = _wide(grad_BTHA)
        grad_y = _rotate_into(g32 * cos_BT1A, g32, sin_BT1A, -1.0)  # rotate_halfᵀ = −rotate_half
        grad_x, grad_w = rms_norm_backward(grad_y, _wide(x_BTHA), weight_A, rstd, *ctx.needs_input_grad[:2])
        return (grad_x.to(x_BTHA.dtype) if grad_x is not None else None), grad_w, None, None, None


def norm_rotary(x_BTHA: torch.Tensor, weight_A: torch.Tensor, eps: float,
                cos_BT1A: torch.Tensor, sin_BT1A: torch.Tensor) -> torch.Tensor:
    """``apply_rotary(RMSNorm(x), cos, sin)`` in ``x``'s dtype, with the norm and the rotation in
    fp32, as one autograd function (:class:`_NormRotary`) for training.

    Args:
        x_BTHA: (B, T, H, A) queries or keys (fp32, or bf16 / fp16 under autocast).
        weight_A: (A,) fp32 gain of the per-head QK-norm.
        eps: the norm's epsilon.
        cos_BT1A, sin_BT1A: (B, T, 1, A) fp32 from :class:`RotaryEmbedding`.

    Returns:
        (B, T, H, A) in the dtype of ``x_BTHA``.
    """
    return _NormRotary.apply(x_BTHA, weight_A, eps, cos_BT1A, sin_BT1A)
