"""One pre-norm decoder block (attention + dense or MoE MLP), shared by the stack and the MTP heads.

Legend: B batch, T new positions, S = past + T key positions, D hidden, G key/value heads,
K head dim.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import Attention, KVCache, MoEBlock, RMSNorm, SwiGLU
from ..layers.routing import RouterOutput


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; mlp is MoE or dense.

    Args:
        cfg: resolved model config.
        layer_idx: position in the stack (the first ``moe.first_dense_layers`` are dense; after
            them, layer i is MoE when ``(i + 1) % moe.moe_every == 0``).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = layer_idx >= cfg.moe.first_dense_layers and (layer_idx + 1) % cfg.moe.moe_every == 0
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp: nn.Module = MoEBlock(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BT1K: torch.Tensor,
        sin_BT1K: torch.Tensor,
        attn_mask_B1TS: torch.Tensor | None,
        past_kv: KVCache | None,
        token_ids_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache, RouterOutput | None]:
        """(B, T, D) -> ((B, T, D), this layer's (k, v), routing or None for a dense layer).

        ``token_ids_BT`` (B, T) are the input ids, for the hash router."""
        attn_BTD, present_kv = self.self_attn(
            self.input_layernorm(x_BTD), cos_BT1K, sin_BT1K, attn_mask_B1TS, past_kv
        )
        x_BTD = x_BTD + self._dropout(attn_BTD)
        h_BTD = self.post_attention_layernorm(x_BTD)
        routing = None
        if self.is_moe:
            moe_out = self.mlp(h_BTD, token_ids_BT)
            mlp_BTD, routing = moe_out.hidden_states, moe_out.routing
        else:
            mlp_BTD = self.mlp(h_BTD)
        return x_BTD + self._dropout(mlp_BTD), present_kv, routing

    def _dropout(self, y_BTD: torch.Tensor) -> torch.Tensor:
        """Residual dropout; without a module call when p = 0 (decoding runs ~40 ops per layer)."""
        return self.resid_dropout(y_BTD) if self.resid_dropout.p else y_BTD
