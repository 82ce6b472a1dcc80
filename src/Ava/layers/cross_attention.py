"""Gated cross-attention from the token stream to an external context sequence
(``model.cross_attention``).

Shape suffixes: see ``Ava/__init__.py``; here B batch, T token positions, S context positions,
D hidden, C context width (``model.cross_attention.context_size``), H heads, A head dim.

A decoder layer with a block (layer i with ``(i+1) % every == 0``) adds, after its self-attention,

    x ← x + tanh(gate) · o_proj(Attn(q_proj(norm(x)), k_proj(ctx), v_proj(ctx)))

with ``gate`` a scalar initialised to 0 (Flamingo's tanh gate), so a fresh block leaves the
model's function unchanged and learns how much of the context to let in. The attention is not
causal and has no RoPE: every token sees every valid context vector (``context_mask``). A row
without any valid context vector gets exactly 0 from the block, and the decoder layer skips the
block entirely when the context is None or empty (S = 0): the residual stream is then bitwise
the one without cross-attention. The context could be the hidden states retrieved from a replay
memory, or any (B, S, C) sequence of vectors; its keys and values are recomputed at every call
(decoding with a KV cache passes the same context at every step).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import attention
from .norm import RMSNorm


def check_context(context_BSC: torch.Tensor | None, context_mask_BS: torch.Tensor | None, batch_size: int,
                  cfg: ModelConfig) -> None:
    """Raise ``ValueError`` (one line) when a context does not fit the model or the batch.

    Args:
        context_BSC: (B, S, C) or None.
        context_mask_BS: (B, S) 1/True = a real context vector, or None (all real).
        batch_size: B of the input ids.
        cfg: the model config (``cross_attention``).
    """
    if context_BSC is None:
        if context_mask_BS is not None:
            raise ValueError("context_mask given without context; pass context too, or neither")
        return
    if cfg.cross_attention.every == 0 or cfg.cross_attention.every > cfg.num_layers:
        raise ValueError("context given but the model has no cross-attention block; set "
                         "model.cross_attention.every: N (or pass context=None)")
    width = cfg.cross_attention.context_size
    if context_BSC.dim() != 3 or context_BSC.shape[0] != batch_size or context_BSC.shape[2] != width:
        raise ValueError(f"context has shape {tuple(context_BSC.shape)}, expected (batch, positions, "
                         f"context_size) = ({batch_size}, S, {width})")
    if context_mask_BS is not None and tuple(context_mask_BS.shape) != tuple(context_BSC.shape[:2]):
        raise ValueError(f"context_mask has shape {tuple(context_mask_BS.shape)}, expected (batch, positions) = "
                         f"{tuple(context_BSC.shape[:2])}")


def has_context(context_BSC: torch.Tensor | None) -> bool:
    """Whether a cross-attention block runs for this context (not None and S > 0)."""
    return context_BSC is not None and context_BSC.shape[1] > 0


class CrossAttention(nn.Module):
    """Pre-norm, tanh-gated multi-head cross-attention to a context sequence.

    Args:
        cfg: the resolved model config (``num_heads``, ``head_dim``, ``hidden_size``, ``qk_norm``,
            ``dropout``, ``cross_attention.context_size``).

    Parameters: ``norm`` (D), ``q_proj`` (H·A × D), ``k_proj``/``v_proj`` (H·A × C), ``o_proj``
    (D × H·A), per-head ``q_norm``/``k_norm`` (A) with ``model.qk_norm``, and ``gate`` (scalar, 0 at
    init).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.dropout = cfg.num_heads, cfg.head_dim, cfg.dropout
        d, c, width = cfg.hidden_size, cfg.cross_attention.context_size, cfg.num_heads * cfg.head_dim
        self.norm = RMSNorm(d, cfg.norm_eps)
        self.q_proj = nn.Linear(d, width, bias=False)
        self.k_proj = nn.Linear(c, width, bias=False)
        self.v_proj = nn.Linear(c, width, bias=False)
        self.o_proj = nn.Linear(width, d, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.gate = nn.Parameter(torch.zeros(()))

    def forward(self, x_BTD: torch.Tensor, context_BSC: torch.Tensor,
                context_mask_BS: torch.Tensor | None = None) -> torch.Tensor:
        """The gated update to add to the residual stream, (B, T, D).

        Args:
            x_BTD: (B, T, D) the residual stream (normalised inside).
            context_BSC: (B, S, C) context vectors, S ≥ 1.
            context_mask_BS: (B, S) 1/True = attend to this vector; None = all. A row with no
                valid vector gets a zero update.
        """
        B, T, _ = x_BTD.shape
        S, H, A = context_BSC.shape[1], self.num_heads, self.head_dim
        q_BTHA = self.q_proj(self.norm(x_BTD)).view(B, T, H, A)
        context_BSC = context_BSC.to(q_BTHA.dtype)
        k_BSHA = self.k_proj(context_BSC).view(B, S, H, A)
        v_BSHA = self.v_proj(context_BSC).view(B, S, H, A)
        if self.q_norm is not None:
            q_BTHA, k_BSHA = self.q_norm(q_BTHA), self.k_norm(k_BSHA)
        dtype = v_BSHA.dtype  # the norms return their gain's dtype (fp32); SDPA wants one dtype
        mask_B11S = valid_B111 = None
        if context_mask_BS is not None:
            valid_BS = context_mask_BS.bool()
            valid_B111 = valid_BS.any(dim=1).view(B, 1, 1, 1)
            # A row with no valid key would give NaN: let it see every key, then zero its output.
            mask_B11S = (valid_BS | ~valid_B111.view(B, 1))[:, None, None, :]
        out_BHTA = attention(q_BTHA.to(dtype).transpose(1, 2), k_BSHA.to(dtype).transpose(1, 2),
                             v_BSHA.transpose(1, 2), attn_mask=mask_B11S,
                             dropout_p=self.dropout if self.training else 0.0)
        if valid_B111 is not None:
            out_BHTA = out_BHTA * valid_B111.to(out_BHTA.dtype)
        out_BTD = self.o_proj(out_BHTA.transpose(1, 2).reshape(B, T, H * A))
        return torch.tanh(self.gate).to(out_BTD.dtype) * out_BTD
