"""Causal grouped-query self-attention with optional QK-norm and a KV cache.

Shape suffixes: see ``Ava/__init__.py``; here B batch, T query positions, L key positions (past
+ T), D hidden, H query heads, G key/value heads (H % G == 0), A head dim (H·A need not equal D).
A projection's flat output is written ``# (B, T, H·A)`` in a comment.

Attention runs through ``F.scaled_dot_product_attention`` with ``enable_gqa=True``: on torch
2.13 CPU it matches ``repeat_interleave`` of k/v exactly at no extra cost and never materialises
the repeated k/v, which matters for long caches. On CPU in bf16 training, short sequences run the
flash forward in bf16 and its backward in fp32 (:func:`use_fp32_flash_backward`), which is faster
there. Measurements: ``docs/performance.md``, "Attention, norms, rotary and the fused head".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from ..config import ModelConfig
from .norm import RMSNorm
from .rotary import apply_rotary, norm_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, G, L, A)

# CPU bf16 training: the flash backward in fp32 while query length × head dim is at most this.
FP32_BACKWARD_MAX_TA = 16384


def use_fp32_flash_backward(q_BHTA: torch.Tensor, masked: bool, dropout_p: float) -> bool:
    """Whether :func:`attention` runs the CPU flash backward in fp32 for these bf16 queries.

    ATen's CPU flash attention forward in bf16 is fast, but its bf16 backward is slow for short
    sequences and narrow heads; up to T·A = :data:`FP32_BACKWARD_MAX_TA` the fp32 backward kernel
    is faster (``docs/performance.md``, "Attention, norms, rotary and the fused head"). Only the
    unmasked, dropout-free training call on CPU in bf16, in eager mode (inductor makes its own
    kernels); everything else is plain SDPA.
    """
    return (q_BHTA.device.type == "cpu" and q_BHTA.dtype == torch.bfloat16 and not masked and dropout_p == 0.0
            and torch.is_grad_enabled() and q_BHTA.requires_grad and not torch.compiler.is_compiling()
            and q_BHTA.shape[-2] * q_BHTA.shape[-1] <= FP32_BACKWARD_MAX_TA)


class _FlashAttentionFP32Backward(torch.autograd.Function):
    """CPU flash attention: the bf16 forward kernel, the backward kernel in fp32.

    The backward upcasts its inputs (bf16 → fp32 is exact, so it recomputes the forward's
    probabilities from the same q, k and the saved fp32 log-sum-exp) and rounds the gradients
    to bf16 once at the end: as accurate as the bf16 kernel or more (``tests/layers/
    test_attention.py``), and faster where :func:`use_fp32_flash_backward` says so.
    """

    @staticmethod
    def forward(ctx, q_BHTA, k_BGLA, v_BGLA, is_causal):
        out_BHTA, lse_BHT = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BHTA, k_BGLA, v_BGLA, 0.0, is_causal)
        ctx.save_for_backward(q_BHTA, k_BGLA, v_BGLA, out_BHTA, lse_BHT)
        ctx.is_causal = is_causal
        return out_BHTA

    @staticmethod
    def backward(ctx, grad_BHTA):
        q_BHTA, k_BGLA, v_BGLA, out_BHTA, lse_BHT = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_BHTA.float(), q_BHTA.float(), k_BGLA.float(), v_BGLA.float(), out_BHTA.float(), lse_BHT,
            0.0, ctx.is_causal)
        return (*(g.to(torch.bfloat16) for g in grads), None)


def attention(q_BHTA: torch.Tensor, k_BGLA: torch.Tensor, v_BGLA: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with grouped k/v heads, and on CPU in bf16 training the
    fp32 flash backward where it is faster (:func:`use_fp32_flash_backward`). (B, H, T, A)."""
    if use_fp32_flash_backward(q_BHTA, attn_mask is not None, dropout_p):
        return _FlashAttentionFP32Backward.apply(q_BHTA, k_BGLA, v_BGLA, is_causal)
    return F.scaled_dot_product_attention(q_BHTA, k_BGLA, v_BGLA, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, enable_gqa=k_BGLA.shape[1] != q_BHTA.shape[1])


def build_attention_mask(
    attention_mask_BL: torch.Tensor | None, q_len: int, past_len: int, device: torch.device,
    document_ids_BT: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The boolean mask SDPA needs, or ``None`` where a cheaper path is exact.

    ``None`` is returned in two cases: no padding mask and no past (the caller then uses
    ``is_causal=True``, the fast kernel), and no padding mask with a single new token (it may
    attend to every cached key, so no mask is needed).

    Args:
        attention_mask_BL: (B, L) with 1 = real token, 0 = padding, L = past_len + q_len; or None.
        q_len: T, new positions in this call.
        past_len: positions already in the KV cache.
        device: where the mask lives.
        document_ids_BT: (B, T) ids of the packed documents (training, no past): a token may
            attend only to earlier tokens of its own document (block-diagonal causal mask).

    Returns:
        (B, 1, T, L) bool, True = may attend; or None.
    """
    total = past_len + q_len
    if document_ids_BT is not None:
        if past_len or attention_mask_BL is not None:
            raise ValueError("document_ids (packed training rows) cannot be combined with a KV cache or padding mask")
        causal_TT = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        same_doc_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
        return (same_doc_BTT & causal_TT)[:, None]  # (B, 1, T, T)
    if attention_mask_BL is None and (past_len == 0 or q_len == 1):
        return None
    # Query i sits at absolute position past_len + i and may see keys 0..past_len + i.
    q_pos_T1 = torch.arange(past_len, total, device=device).unsqueeze(1)  # (T, 1)
    k_pos_1L = torch.arange(total, device=device).unsqueeze(0)  # (1, L)
    mask_11TL = (k_pos_1L <= q_pos_T1)[None, None]  # (1, 1, T, L)
    if attention_mask_BL is None:
        return mask_11TL
    mask_B1TL = mask_11TL & attention_mask_BL.bool()[:, None, None, :]  # (B, 1, T, L)
    # A padding query (left padding) sees no key at all; SDPA would return NaN there, which
    # would then poison batch statistics (router load, aux loss). Let such rows see every key:
    # their outputs are never used, and no real token attends to them.
    return mask_B1TL | ~mask_B1TL.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads (Qwen3 naming).

    Args:
        cfg: the resolved model config (``num_heads``, ``num_kv_heads``, ``head_dim``, ``qk_norm``,
            ``qk_norm_scope``, ``dropout``).

    QK-norm is per head (``qk_norm_scope: head``, Qwen3: gains of width A on (B, T, H, A)) or over
    the whole projection (``full``, OLMoE: gains of width H·A and G·A on (B, T, H·A) before the
    split into heads, so one statistic covers all heads of a token).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.num_kv_heads = cfg.num_kv_heads
        self.head_dim = cfg.head_dim
        self.dropout = cfg.dropout
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)
        self.qk_norm_full = cfg.qk_norm_full
        self.qk_norm_per_head = cfg.qk_norm and not self.qk_norm_full
        q_width = self.num_heads * self.head_dim if self.qk_norm_full else self.head_dim
        k_width = self.num_kv_heads * self.head_dim if self.qk_norm_full else self.head_dim
        self.q_norm = RMSNorm(q_width, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(k_width, cfg.norm_eps) if cfg.qk_norm else None
        # Only inside EnhancedMoEModel.decoding() (see fuse_qkv_for_decoding); never parameters or buffers.
        self._qkv_weight: torch.Tensor | None = None  # [Wq; Wk; Wv], ((H + 2G)·A, D)
        self._qk_gain: torch.Tensor | None = None  # (H + G, A): q_norm's gain per q head, k_norm's per kv head

    @torch.no_grad()
    def fuse_qkv_for_decoding(self, enable: bool) -> None:
        """Copy the q, k, v weights into one matrix for decoding (``enable``), or drop the copy.

        Decoding one token runs each projection as a small matrix-vector product whose cost is
        mostly the call, so 3 linears -> 1 helps there; and since q and k then come out side by
        side, the per-head QK-norm and RoPE run once over the H + G heads instead of twice (half
        the calls; the same arithmetic, so the results are bitwise those of the plain path in
        fp32). Used only without autograd.

        The copy is taken now, from the weights as they are, and never checked again:
        :meth:`EnhancedMoEModel.decoding` calls this on entering and leaving its scope, and
        inside that scope the weights are frozen (a change made there is seen only once the
        scope is left and entered again). It costs the q/k/v weights' memory once more while
        the scope is open.
        """
        self._qkv_weight = self._qk_gain = None
        if not enable or not all(isinstance(p, nn.Linear) for p in (self.q_proj, self.k_proj, self.v_proj)):
            return  # quantized projections (Ava.layers.quantized) run their own kernels
        if isinstance(self.q_proj.weight, DTensor):
            return  # sharded weights (FSDP2) exist whole only inside the forward: keep the plain path
        self._qkv_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        if self.qk_norm_per_head:
            q_gain_A, k_gain_A = self.q_norm.weight, self.k_norm.weight
            self._qk_gain = torch.cat([q_gain_A.expand(self.num_heads, -1), k_gain_A.expand(self.num_kv_heads, -1)])

    def _heads(
        self, x_BTD: torch.Tensor, cos_BT1A: torch.Tensor, sin_BT1A: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H, A), k (B, T, G, A) normalised and rotated, and v (B, T, G, A)."""
        B, T, _ = x_BTD.shape
        H, G, A = self.num_heads, self.num_kv_heads, self.head_dim
        if self._qkv_weight is not None and not torch.is_grad_enabled():
            qkv = F.linear(x_BTD, self._qkv_weight)  # (B, T, (H + 2G)·A)
            v_BTGA = qkv[..., (H + G) * A:].unflatten(-1, (G, A))
            if qkv.dtype == torch.float32 and not self.qk_norm_full:
                qk = qkv[..., :(H + G) * A].unflatten(-1, (H + G, A))  # (B, T, H + G, A)
                if self.qk_norm_per_head:  # = RMSNorm per head with q's or k's gain (fp32 path)
                    qk = F.rms_norm(qk, (A,), None, self.q_norm.eps) * self._qk_gain
                q_BTHA, k_BTGA = apply_rotary(qk, cos_BT1A, sin_BT1A).split([H, G], dim=2)
                return q_BTHA, k_BTGA, v_BTGA
            q_flat, k_flat = qkv[..., :H * A], qkv[..., H * A:(H + G) * A]  # (B, T, H·A), (B, T, G·A)
        elif torch.is_grad_enabled() and all(type(p) is nn.Linear for p in (self.q_proj, self.k_proj, self.v_proj)):
            # Training: one GEMM over the concatenated weights (a 3·D·A-float copy per call) casts
            # and reads x once, and its backward is one GEMM instead of three products and two sums.
            # Only over plain nn.Linear: a swapped-in module (FP8, adapters) keeps its own forward.
            qkv_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])  # ((H + 2G)·A, D)
            q_flat, k_flat, v_flat = F.linear(x_BTD, qkv_weight).split([H * A, G * A, G * A], dim=-1)
            v_BTGA = v_flat.unflatten(-1, (G, A))
        else:
            q_flat, k_flat = self.q_proj(x_BTD), self.k_proj(x_BTD)  # (B, T, H·A), (B, T, G·A)
            v_BTGA = self.v_proj(x_BTD).view(B, T, G, A)
        if self.qk_norm_full:
            q_flat, k_flat = self.q_norm(q_flat), self.k_norm(k_flat)
        q_BTHA, k_BTGA = q_flat.unflatten(-1, (H, A)), k_flat.unflatten(-1, (G, A))
        if self.qk_norm_per_head and torch.is_grad_enabled() and not torch.compiler.is_compiling() \
                and self.q_norm.weight.dtype == torch.float32:
            # Training: norm, rotation and cast as one function (inductor fuses the plain path itself).
            return (norm_rotary(q_BTHA, self.q_norm.weight, self.q_norm.eps, cos_BT1A, sin_BT1A),
                    norm_rotary(k_BTGA, self.k_norm.weight, self.k_norm.eps, cos_BT1A, sin_BT1A), v_BTGA)
        if self.qk_norm_per_head:
            q_BTHA, k_BTGA = self.q_norm(q_BTHA), self.k_norm(k_BTGA)
        return apply_rotary(q_BTHA, cos_BT1A, sin_BT1A), apply_rotary(k_BTGA, cos_BT1A, sin_BT1A), v_BTGA

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Attend causally over the cached and the new positions.

        Args:
            x_BTD: (B, T, D) normalised hidden states.
            cos_BT1A, sin_BT1A: (B, T, 1, A) RoPE tables of the new positions.
            attn_mask_B1TL: from :func:`build_attention_mask`; None = plain causal (no past) or
                a single query over the whole cache.
            past_kv: (k, v) each (B, G, past, A) after RoPE, or None.

        Returns:
            ``(out_BTD, (k, v))`` where k and v (B, G, L, A) hold past and new positions; the
            caller keeps them only when it asked for a cache.
        """
        B, T, _ = x_BTD.shape
        q_BTHA, k_BTGA, v_BTGA = self._heads(x_BTD, cos_BT1A, sin_BT1A)
        out_BHTA, present_kv = self._attend(q_BTHA, k_BTGA, v_BTGA, attn_mask_B1TL, past_kv)
        out_flat = out_BHTA.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H·A)
        return self.o_proj(out_flat), present_kv

    def _attend(
        self,
        q_BTHA: torch.Tensor,
        k_BTGA: torch.Tensor,
        v_BTGA: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None,
        past_kv: KVCache | None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Causal attention of the query heads over the cached and new keys/values.

        Shared by :meth:`forward` and the routed kinds (:mod:`Ava.layers.mixture_of_heads`,
        :mod:`Ava.layers.mixture_of_attention`), which mix the heads before ``o_proj``.

        Args:
            q_BTHA: (B, T, H', A) rotated queries; H' may differ from ``num_heads`` (a multiple of G).
            k_BTGA, v_BTGA: (B, T, G, A) the new positions' keys (rotated) and values.
            attn_mask_B1TL, past_kv: as in :meth:`forward`.

        Returns:
            ``(out_BHTA (B, H', T, A), (k, v) each (B, G, L, A))``.
        """
        T = q_BTHA.shape[1]
        # The norms return their gain's dtype (fp32); under autocast SDPA wants one dtype.
        dtype = v_BTGA.dtype
        q_BHTA = q_BTHA.to(dtype).transpose(1, 2)  # (B, H, T, A)
        k_BGLA = k_BTGA.to(dtype).transpose(1, 2)  # (B, G, T, A): L = T without a cache
        v_BGLA = v_BTGA.transpose(1, 2)  # (B, G, T, A)
        if past_kv is not None:
            k_BGLA = torch.cat([past_kv[0].to(dtype), k_BGLA], dim=2)  # (B, G, L, A), L = past + T
            v_BGLA = torch.cat([past_kv[1].to(dtype), v_BGLA], dim=2)  # (B, G, L, A)
        # A plain bool for SDPA: an ``if`` makes torch.compile guard on T (with T dynamic, ``T > 1``
        # passed as an argument would be a SymBool, which SDPA rejects: a graph break).
        is_causal = False if T == 1 else attn_mask_B1TL is None and past_kv is None
        out_BHTA = attention(q_BHTA, k_BGLA, v_BGLA, attn_mask=attn_mask_B1TL,
                             dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal)
        return out_BHTA, (k_BGLA, v_BGLA)
