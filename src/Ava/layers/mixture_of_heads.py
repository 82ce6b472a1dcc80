"""Mixture-of-head attention (MoH; Jin et al. 2024, "MoH: Multi-Head Attention as Mixture-of-Head
Attention"), ``model.attention: moh``.

Shape suffixes: see ``Ava/__init__.py``; here B batch, T query positions, D hidden, H heads, S
shared heads (the first S), R = H − S routed heads, K routed heads per token, A head dim.

Every head is computed as in :class:`~Ava.layers.attention.Attention` (same q/k/v/o projections,
GQA, RoPE, QK-norm, KV cache); before the output projection each head's output is multiplied by a
per-token weight g_h, so the heads a token does not pick contribute nothing:

    routed:  p = softmax(W_r x)  (R),  g_i = α_r · R · p_i  for the top-K of p, else 0
    shared:  g_j = α_s · S · softmax(W_s x)_j                  (only with S > 0)
    stages:  (α_s, α_r) = 2 · softmax(W_h x)                   (only with S > 0; else α_r = 1)

That is the paper's two-stage weighting times a constant per group (S, R, 2), which the output
projection absorbs: a uniform router then weights every head exactly 1, so MoH with K = R and
zero router weights *is* standard attention (``tests/layers/test_experimental_attention.py``).
The paper's top-K scores are not renormalised, and neither are these.

The head router's load-balancing loss (Switch-style, the paper's L_b) is ``R · Σ_i f_i P_i`` with
f_i the share of the B·T·K selections that picked routed head i and P_i its mean probability: 1
when uniform. The decoder layer hands it to the model, which reports ``aux_losses
['attention_balance']`` (``model.moh.aux_loss_coef`` × the mean over layers).

All heads are computed and the unpicked ones zeroed (as in the paper's implementation): the
attention FLOPs are those of standard attention, plus the router. Decoding with a KV cache is
exact: routing is per token, and every head's keys and values are cached as in standard attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import Attention, KVCache


def route_heads(logits_NR: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax top-k routing over heads, and its Switch-style load-balancing loss.

    Args:
        logits_NR: (N, R) router logits of N tokens over R heads (any float dtype; computed in fp32).
        top_k: K, heads per token.

    Returns:
        ``(probs_NR, mask_NR, balance)``: the fp32 softmax probabilities, a 0/1 fp32 mask of the
        top-K heads of each token, and ``R · Σ_i f_i·P_i`` (f_i = mask mean / K, P_i = probability
        mean; 1 when uniform) as an fp32 scalar.
    """
    probs_NR = F.softmax(logits_NR.float(), dim=-1)
    top_NK = probs_NR.topk(top_k, dim=-1).indices
    mask_NR = torch.zeros_like(probs_NR).scatter_(-1, top_NK, 1.0)
    R = probs_NR.shape[-1]
    share_R = mask_NR.mean(dim=0) / top_k  # f_i, sums to 1
    balance = R * (share_R * probs_NR.mean(dim=0)).sum()
    return probs_NR, mask_NR, balance


class MixtureOfHeadsAttention(Attention):
    """:class:`~Ava.layers.attention.Attention` whose heads are weighted per token by a router.

    Args:
        cfg: the resolved model config (``model.moh``: ``shared_heads``, ``top_k``).

    Parameters beyond :class:`Attention`'s: ``router`` (R × D, W_r) and, with shared heads,
    ``shared_router`` (S × D, W_s) and ``stage_router`` (2 × D, W_h).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        self.num_shared = cfg.moh.shared_heads
        self.num_routed = self.num_heads - self.num_shared
        self.top_k = cfg.moh.top_k
        d = cfg.hidden_size
        self.router = nn.Linear(d, self.num_routed, bias=False)
        self.shared_router = nn.Linear(d, self.num_shared, bias=False) if self.num_shared else None
        self.stage_router = nn.Linear(d, 2, bias=False) if self.num_shared else None

    def head_weights(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token head weights g (B, T, H) fp32, and the router's balancing loss (fp32 scalar)."""
        B, T, _ = x_BTD.shape
        probs_NR, mask_NR, balance = route_heads(self.router(x_BTD).flatten(0, 1), self.top_k)
        g_BTH = (probs_NR * mask_NR * self.num_routed).view(B, T, self.num_routed)
        if self.num_shared:
            shared_BTS = F.softmax(self.shared_router(x_BTD).float(), dim=-1) * self.num_shared
            stage_BT2 = 2.0 * F.softmax(self.stage_router(x_BTD).float(), dim=-1)
            g_BTH = torch.cat([stage_BT2[..., :1] * shared_BTS, stage_BT2[..., 1:] * g_BTH], dim=-1)
        return g_BTH, balance

    def forward(  # type: ignore[override]
        self,
        x_BTD: torch.Tensor,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache, torch.Tensor]:
        """As :meth:`Attention.forward`, plus the head router's balancing loss.

        Returns:
            ``(out_BTD, (k, v), balance)``: ``balance`` is the unweighted fp32 scalar of
            :func:`route_heads` over this call's B·T tokens.
        """
        B, T, _ = x_BTD.shape
        q_BTHA, k_BTGA, v_BTGA = self._heads(x_BTD, cos_BT1A, sin_BT1A)
        out_BHTA, present_kv = self._attend(q_BTHA, k_BTGA, v_BTGA, attn_mask_B1TL, past_kv)
        g_BTH, balance = self.head_weights(x_BTD)
        out_BTHA = out_BHTA.transpose(1, 2) * g_BTH.to(out_BHTA.dtype).unsqueeze(-1)
        out_flat = out_BTHA.reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H·A)
        return self.o_proj(out_flat), present_kv, balance
