"""Mixture of attention heads (MoA; Zhang et al. 2022, "Mixture of Attention Heads: Selecting
Attention Heads Per Token"), ``model.attention: moa``.

Shape suffixes: see ``Ava/__init__.py``; here B batch, T query positions, D hidden, E head
experts, K experts per token, A head dim.

A pool of E attention-head experts, each with its own query projection W_q^e (D → A) and output
projection W_o^e (A → D); one key and one value projection (D → A) are shared by all of them, as
in the paper. A softmax router picks the top-K experts of each token and renormalises their
probabilities w to sum to 1:

    y_t = Σ_{e ∈ top-K(t)} w_{t,e} · W_o^e · Attn(W_q^e x_t, K, V)

The parameters are named as in :class:`~Ava.layers.attention.Attention` with E query heads and one
key/value head (``q_proj`` E·A × D, ``k_proj``/``v_proj`` A × D, ``o_proj`` D × E·A), plus
``router`` (E × D). Only the K picked heads of each token attend (the queries are gathered into K
slots, all over the one shared key/value head); the K outputs are scattered back into their
experts' places of the E·A-wide ``o_proj`` input, zeros elsewhere. The KV cache is that of one
key/value head ((B, 1, L, A) per layer), so decoding is exact and cheap.

The router's load-balancing loss is the Switch-style ``E · Σ_e f_e P_e`` (1 when uniform), reported
like MoH's as ``aux_losses['attention_balance']`` (``model.moa.aux_loss_coef``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from .attention import Attention, KVCache
from .mixture_of_heads import route_heads


class MixtureOfAttentionHeads(Attention):
    """Top-K of E attention-head experts per token over one shared key/value head.

    Args:
        cfg: the resolved model config (``model.moa``: ``num_experts``, ``top_k``; ``head_dim``,
            ``qk_norm``, ``dropout`` as for :class:`Attention`).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        # The experts are the query heads of an Attention with E heads and one key/value head.
        super().__init__(cfg.model_copy(update={"num_heads": cfg.moa.num_experts, "num_kv_heads": 1}))
        self.num_experts = cfg.moa.num_experts
        self.top_k = cfg.moa.top_k
        self.router = nn.Linear(cfg.hidden_size, self.num_experts, bias=False)

    def forward(  # type: ignore[override]
        self,
        x_BTD: torch.Tensor,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """As :meth:`Attention.forward` (cache (B, 1, L, A)), plus the router's balancing loss.

        Returns:
            ``(out_BTD, (k, v), balance)``: ``balance`` is the unweighted fp32 scalar of
            :func:`~Ava.layers.mixture_of_heads.route_heads` over this call's B·T tokens.
        """
        B, T, _ = x_BTD.shape
        E, K, A = self.num_experts, self.top_k, self.head_dim
        q_BTEA, k_BT1A, v_BT1A = self._heads(x_BTD, cos_BT1A, sin_BT1A)
        probs_NE, mask_NE, balance = route_heads(self.router(x_BTD).flatten(0, 1), K)
        top_p_NK, top_NK = (probs_NE * mask_NE).topk(K, dim=-1)  # the picked experts, best first
        w_BTK = (top_p_NK / top_p_NK.sum(dim=-1, keepdim=True)).view(B, T, K)
        index_BTKA = top_NK.view(B, T, K, 1).expand(B, T, K, A)
        q_BTKA = q_BTEA.gather(2, index_BTKA)  # each token's K picked query heads
        out_BKTA, present_kv = self._attend(q_BTKA, k_BT1A, v_BT1A, attn_mask_B1TL, past_kv)
        out_BTKA = out_BKTA.transpose(1, 2) * w_BTK.to(out_BKTA.dtype).unsqueeze(-1)
        out_BTEA = out_BTKA.new_zeros(B, T, E, A).scatter(2, index_BTKA, out_BTKA)  # expert e's slot
        return self.o_proj(out_BTEA.reshape(B, T, E * A)), present_kv, balance
