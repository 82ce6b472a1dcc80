"""Multi-token prediction heads (DeepSeek-V3 §2.2).

Shape suffixes: see ``Ava/__init__.py``; here B batch, T positions, D hidden, V vocabulary, M
prediction depths (``model.mtp.num_heads``); j = 1..M is one depth.

Module j keeps the full causal chain of V3: at position i it combines the previous depth's hidden
state h^{j-1}_i (h^0 = the main stack's last hidden state, before its final norm) with the
embedding of token i + j, runs one decoder block, and predicts token i + j + 1 through the
model's *shared* output head (the embedding is shared too)::

    h'_i  = eh_proj([enorm(Emb(t_{i+j})); hnorm(h^{j-1}_i)])      # (B, T, 2D) -> (B, T, D)
    h^j   = block(h')                                            # causal, same RoPE positions
    logits^j_i = lm_head(norm(h^j_i))                            # predicts t_{i+j+1}

Sequences keep length T at every depth (so ``mtp_logits[j-1]`` is (B, T, V), aligned with the
inputs like the main logits); the last j positions have no token i + j and are fed a copy of the
last token. Causality makes them harmless: no earlier position attends to them, and their
targets are ignored by the loss. The concatenation order [embedding; hidden] and the names
``enorm``, ``hnorm``, ``eh_proj`` follow DeepSeek-V3's checkpoints; V3's ``shared_head.norm`` is
``norm`` here, and the block is ``block`` (V3 stores its tensors at the module's top level).

The block is a :class:`DecoderLayer` with layer index ``num_layers + j - 1``: its MLP is dense or
MoE by the same ``model.moe.first_dense_layers`` / ``moe_every`` rule as if it were the next layer
of the stack (so MoE with the defaults, as in V3). Its routing joins the model's balancing terms,
router statistics and aux-free bias updates after the main layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..layers import KVCache, RMSNorm
from ..layers.routing import RouterOutput
from .decoder_layer import DecoderLayer


@dataclass(frozen=True)
class MTPOutput:
    """What the MTP heads return.

    Attributes:
        logits: one (B, T, V) tensor per depth j = 1..M; position i predicts token i + j + 1.
            Empty when the heads ran without the output head (fused training loss).
        normed_hidden: one (B, T, D) tensor per depth, ``norm(h^j)``: what the shared output head
            turns into ``logits`` (the fused loss takes these instead).
        routings: (layer index, routing) of each MoE block among the heads (index num_layers + j - 1).
    """

    logits: list[torch.Tensor]
    normed_hidden: list[torch.Tensor]
    routings: list[tuple[int, RouterOutput]]


class MTPModule(nn.Module):
    """One prediction depth: norms, projection, decoder block and output norm.

    Args:
        cfg: the model config.
        depth: j, 1-based.
    """

    def __init__(self, cfg: ModelConfig, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = DecoderLayer(cfg, cfg.num_layers + depth - 1)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(
        self,
        h_BTD: torch.Tensor,
        emb_BTD: torch.Tensor,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None,
        token_ids_BT: torch.Tensor,
        token_mask_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        """Next depth's hidden state.

        Args:
            h_BTD: (B, T, D) previous depth's hidden state h^{j-1} (un-normalised).
            emb_BTD: (B, T, D) embeddings of the tokens j positions ahead.
            cos_BT1A, sin_BT1A: RoPE tables of the positions (as in the main stack).
            attn_mask_B1TL: the main stack's attention mask, or None (causal).
            token_ids_BT: (B, T) the ids behind ``emb_BTD`` (for the hash router).
            token_mask_BT: (B, T) bool, the positions whose routing statistics count (the
                main stack's real tokens); None = all.

        Returns:
            ``(h^j (B, T, D), routing or None for a dense block)``.
        """
        x_BTD, _, routing = self._combine_and_run(h_BTD, emb_BTD, cos_BT1A, sin_BT1A, attn_mask_B1TL, None,
                                                  token_ids_BT, token_mask_BT)
        return x_BTD, routing

    def _combine_and_run(
        self, h_BTD: torch.Tensor, emb_BTD: torch.Tensor, cos_BT1A: torch.Tensor, sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None, past_kv: KVCache | None, token_ids_BT: torch.Tensor,
        token_mask_BT: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, KVCache, RouterOutput | None]:
        """eh_proj([enorm(emb); hnorm(h)]) through the block: ``(h^j, (k, v), routing)``."""
        x_BT2D = torch.cat([self.enorm(emb_BTD), self.hnorm(h_BTD)], dim=-1)  # (B, T, 2D)
        x_BTD = self.eh_proj(x_BT2D)  # (B, T, D)
        return self.block(x_BTD, cos_BT1A, sin_BT1A, attn_mask_B1TL, past_kv, token_ids_BT,
                          token_mask_BT=token_mask_BT)

    def forward_cached(
        self,
        h_BTD: torch.Tensor,
        emb_BTD: torch.Tensor,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None,
        past_kv: KVCache | None,
        token_ids_BT: torch.Tensor,
    ) -> tuple[torch.Tensor, KVCache]:
        """:meth:`forward` on T new positions that attend to this block's cached earlier ones.

        Used to draft tokens for speculative decoding (:mod:`Ava.generation.speculative`): the
        block attends over the sequence, so running it on the last positions only is exact
        when ``past_kv`` holds the keys/values of every earlier position.

        Args:
            h_BTD, emb_BTD, token_ids_BT: as in :meth:`forward`, for the new positions only.
            cos_BT1A, sin_BT1A: RoPE tables of the new positions (their absolute positions).
            attn_mask_B1TL: :func:`~Ava.layers.attention.build_attention_mask` for T new
                positions after ``past_kv`` (None for one position, or with no past).
            past_kv: this block's ``(k, v)`` of the earlier positions, each (B, G, past, A),
                or None.

        Returns:
            ``(h^j (B, T, D), (k, v) of past and new positions, each (B, G, L, A), L = past + T)``.
        """
        x_BTD, present_kv, _ = self._combine_and_run(h_BTD, emb_BTD, cos_BT1A, sin_BT1A, attn_mask_B1TL, past_kv,
                                                     token_ids_BT)
        return x_BTD, present_kv


class MultiTokenPrediction(nn.ModuleList):
    """The M sequential MTP modules, ``mtp.{j-1}`` for depth j.

    Args:
        cfg: the model config (``cfg.mtp.num_heads`` ≥ 1 modules).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(MTPModule(cfg, depth) for depth in range(1, cfg.mtp.num_heads + 1))

    def forward(
        self,
        hidden_BTD: torch.Tensor,
        input_ids_BT: torch.Tensor,
        embed_tokens: nn.Embedding,
        lm_head: nn.Linear | None,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None,
        token_mask_BT: torch.Tensor | None = None,
    ) -> MTPOutput:
        """Run every depth and the shared head.

        Args:
            hidden_BTD: (B, T, D) the main stack's last hidden state, before its final norm.
            input_ids_BT: (B, T) the input ids.
            embed_tokens: the model's (shared) input embedding.
            lm_head: the model's (shared) output head; None = return only ``normed_hidden``
                (the fused loss applies the head itself).
            cos_BT1A, sin_BT1A: the main stack's RoPE tables.
            attn_mask_B1TL: the main stack's attention mask, or None.
            token_mask_BT: (B, T) bool, the main stack's real tokens: position i of every depth
                counts in the routing statistics when position i is real; None = all.

        Returns:
            :class:`MTPOutput`.
        """
        T = input_ids_BT.shape[1]
        emb_BTD = embed_tokens(input_ids_BT)  # (B, T, D)
        h_BTD = hidden_BTD
        logits: list[torch.Tensor] = []
        normed: list[torch.Tensor] = []
        routings: list[tuple[int, RouterOutput]] = []
        for module in self:
            j = min(module.depth, T)
            # Tokens j positions ahead; the last j positions (no such token) repeat the last one.
            ids_BT = torch.cat([input_ids_BT[:, j:], input_ids_BT[:, -1:].expand(-1, j)], dim=1)  # (B, T)
            ahead_BTD = torch.cat([emb_BTD[:, j:], emb_BTD[:, -1:].expand(-1, j, -1)], dim=1)  # (B, T, D)
            h_BTD, routing = module(h_BTD, ahead_BTD, cos_BT1A, sin_BT1A, attn_mask_B1TL, ids_BT, token_mask_BT)
            normed.append(module.norm(h_BTD))  # (B, T, D)
            if lm_head is not None:
                logits.append(lm_head(normed[-1]))  # (B, T, V)
            if routing is not None:
                routings.append((module.block.layer_idx, routing))
        return MTPOutput(logits=logits, normed_hidden=normed, routings=routings)
