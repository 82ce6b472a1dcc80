"""Causal grouped-query self-attention with optional QK-norm and a KV cache.

Legend: B batch, T query positions, S key positions (past + T), D hidden, H query heads,
G key/value heads (H % G == 0), K head dim (H·K need not equal D), F a projection's flat width
(H·K for queries, G·K for keys).

Attention runs through ``F.scaled_dot_product_attention`` with ``enable_gqa=True``: on torch
2.13 CPU this matches ``repeat_interleave`` of k/v exactly and is as fast or faster (measured:
4×256 tokens, 8 q / 2 kv heads, fwd+bwd 8 ms vs 10 ms), and it never materialises the repeated
k/v, which matters for long caches. On CPU in bf16 training, short sequences run the flash
forward in bf16 and its backward in fp32 (:func:`use_fp32_flash_backward`), which is faster there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..config import ModelConfig
from .norm import RMSNorm
from .rotary import apply_rotary, norm_rotary

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (B, G, S, K)

# Optimizer steps taken in this process (any optimizer): part of the key under which decoding
# keeps copies of weights, because fused optimizers (AdamW(fused=True)) update parameters in
# place without bumping their ``_version``.
_optimizer_steps = 0


def _count_optimizer_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


# CPU bf16 training: the flash backward in fp32 while query length × head dim is at most this.
FP32_BACKWARD_MAX_TK = 16384


def use_fp32_flash_backward(q_BHTK: torch.Tensor, masked: bool, dropout_p: float) -> bool:
    """Whether :func:`attention` runs the CPU flash backward in fp32 for these bf16 queries.

    ATen's CPU flash attention forward in bf16 is fast, but its bf16 backward is slow for short
    sequences and narrow heads. ``python benchmarks/attention.py`` (2-core CPU, forward + backward
    of one layer, 2,048 tokens, H·K = 512, time with the bf16 backward ÷ with the fp32 one, same
    run): T 128: 4.19 / 2.93 / 1.55 at K 32 / 64 / 128; T 256: 1.80 / 1.41 / 1.13; T 512: 1.39 /
    1.09 / 0.73; T 1024: 1.16 / 0.82 / 0.68. The fp32 backward is taken while T·K ≤
    :data:`FP32_BACKWARD_MAX_TK` (the 1.1× cells at 32,768 read 0.7–1.0× in another run). Only
    the unmasked, dropout-free training call on CPU in bf16, in eager mode (inductor makes its
    own kernels); everything else is plain SDPA.
    """
    return (q_BHTK.device.type == "cpu" and q_BHTK.dtype == torch.bfloat16 and not masked and dropout_p == 0.0
            and torch.is_grad_enabled() and q_BHTK.requires_grad and not torch.compiler.is_compiling()
            and q_BHTK.shape[-2] * q_BHTK.shape[-1] <= FP32_BACKWARD_MAX_TK)


class _FlashAttentionFP32Backward(torch.autograd.Function):
    """CPU flash attention: the bf16 forward kernel, the backward kernel in fp32.

    The backward upcasts its inputs (bf16 → fp32 is exact, so it recomputes the forward's
    probabilities from the same q, k and the saved fp32 log-sum-exp) and rounds the gradients
    to bf16 once at the end: as accurate as the bf16 kernel or more (``tests/layers/
    test_attention.py``), and faster where :func:`use_fp32_flash_backward` says so.
    """

    @staticmethod
    def forward(ctx, q_BHTK, k_BGSK, v_BGSK, is_causal):
        out_BHTK, lse_BHT = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_BHTK, k_BGSK, v_BGSK, 0.0, is_causal)
        ctx.save_for_backward(q_BHTK, k_BGSK, v_BGSK, out_BHTK, lse_BHT)
        ctx.is_causal = is_causal
        return out_BHTK

    @staticmethod
    def backward(ctx, grad_BHTK):
        q_BHTK, k_BGSK, v_BGSK, out_BHTK, lse_BHT = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_BHTK.float(), q_BHTK.float(), k_BGSK.float(), v_BGSK.float(), out_BHTK.float(), lse_BHT,
            0.0, ctx.is_causal)
        return (*(g.to(torch.bfloat16) for g in grads), None)


def attention(q_BHTK: torch.Tensor, k_BGSK: torch.Tensor, v_BGSK: torch.Tensor,
              attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with grouped k/v heads, and on CPU in bf16 training the
    fp32 flash backward where it is faster (:func:`use_fp32_flash_backward`). (B, H, T, K)."""
    if use_fp32_flash_backward(q_BHTK, attn_mask is not None, dropout_p):
        return _FlashAttentionFP32Backward.apply(q_BHTK, k_BGSK, v_BGSK, is_causal)
    return F.scaled_dot_product_attention(q_BHTK, k_BGSK, v_BGSK, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, enable_gqa=k_BGSK.shape[1] != q_BHTK.shape[1])


def build_attention_mask(
    attention_mask_BS: torch.Tensor | None, q_len: int, past_len: int, device: torch.device,
    document_ids_BT: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """The boolean mask SDPA needs, or ``None`` where a cheaper path is exact.

    ``None`` is returned in two cases: no padding mask and no past (the caller then uses
    ``is_causal=True``, the fast kernel), and no padding mask with a single new token (it may
    attend to every cached key, so no mask is needed).

    Args:
        attention_mask_BS: (B, S) with 1 = real token, 0 = padding, S = past_len + q_len; or None.
        q_len: T, new positions in this call.
        past_len: positions already in the KV cache.
        device: where the mask lives.
        document_ids_BT: (B, T) ids of the packed documents (training, no past): a token may
            attend only to earlier tokens of its own document (block-diagonal causal mask).

    Returns:
        (B, 1, T, S) bool, True = may attend; or None.
    """
    total = past_len + q_len
    if document_ids_BT is not None:
        if past_len or attention_mask_BS is not None:
            raise ValueError("document_ids (packed training rows) cannot be combined with a KV cache or padding mask")
        causal_TT = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        same_doc_BTT = document_ids_BT[:, :, None] == document_ids_BT[:, None, :]
        return (same_doc_BTT & causal_TT)[:, None]  # (B, 1, T, T)
    if attention_mask_BS is None and (past_len == 0 or q_len == 1):
        return None
    # Query i sits at absolute position past_len + i and may see keys 0..past_len + i.
    q_pos_T1 = torch.arange(past_len, total, device=device).unsqueeze(1)  # (T, 1)
    k_pos_1S = torch.arange(total, device=device).unsqueeze(0)  # (1, S)
    mask_11TS = (k_pos_1S <= q_pos_T1)[None, None]  # (1, 1, T, S)
    if attention_mask_BS is None:
        return mask_11TS
    mask_B1TS = mask_11TS & attention_mask_BS.bool()[:, None, None, :]  # (B, 1, T, S)
    # A padding query (left padding) sees no key at all; SDPA would return NaN there, which
    # would then poison batch statistics (router load, aux loss). Let such rows see every key:
    # their outputs are never used, and no real token attends to them.
    return mask_B1TS | ~mask_B1TS.any(dim=-1, keepdim=True)


class Attention(nn.Module):
    """Multi-head causal self-attention with grouped-query heads (Qwen3 naming).

    Args:
        cfg: the resolved model config (``num_heads``, ``num_kv_heads``, ``head_dim``, ``qk_norm``,
            ``qk_norm_scope``, ``dropout``).

    QK-norm is per head (``qk_norm_scope: head``, Qwen3: gains of width K on (B, T, H, K)) or over
    the whole projection (``full``, OLMoE: gains of width H·K and G·K on (B, T, H·K) before the
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
        # While decoding (see fuse_qkv_for_decoding); never parameters or buffers.
        self._decode_sources: list[torch.Tensor] = []  # non-empty = fusing for decoding
        self._decode_key: tuple | None = None  # what the copies below were made from
        self._qkv_weight: torch.Tensor | None = None  # [Wq; Wk; Wv]
        self._qk_gain: torch.Tensor | None = None  # (H + G, K): q_norm's gain per q head, k_norm's per kv head

    def fuse_qkv_for_decoding(self, enable: bool) -> None:
        """Decode with q, k, v as one matmul over concatenated weights (``enable``), or stop.

        Decoding one token runs each projection as a small matrix-vector product whose cost is
        mostly the call, so 3 linears -> 1 helps there; and since q and k then come out side by
        side, the per-head QK-norm and RoPE run once over the H + G heads instead of twice (half
        the calls; the same arithmetic, so the results are bitwise those of the plain path in
        fp32). Used only without autograd. The copies are made on first use and remade whenever
        their source changed: another tensor, dtype or device (``data_ptr``), an in-place edit
        (``_version``), or any optimizer step in the process (fused optimizers do not bump
        ``_version``). ``enable=False`` drops them; :meth:`EnhancedMoEModel.decoding` (the
        generators' scope) enables them for its duration, so they cost the q/k/v weights'
        memory once more only while decoding.
        """
        self._decode_key = self._qkv_weight = self._qk_gain = None
        # The parameters themselves, looked up once (attribute lookups through nn.Module cost
        # more than the check). Replacing a Parameter object inside the scope is not tracked;
        # assigning its .data, moving or casting the model, or editing it in place is.
        self._decode_sources = []
        if enable:
            self._decode_sources = [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight]
            if self.qk_norm_per_head:
                self._decode_sources += [self.q_norm.weight, self.k_norm.weight]

    @property
    def _fuse_for_decoding(self) -> bool:
        return bool(self._decode_sources)

    def _decode_weights(self) -> torch.Tensor:
        """The concatenated q/k/v weight (and the stacked QK-norm gains), remade when stale."""
        sources = self._decode_sources
        # A move or cast makes new tensors (a new data_ptr), so pointer + version + steps suffice.
        key = (_optimizer_steps, *[(w.data_ptr(), w._version) for w in sources])
        if key != self._decode_key:
            self._qkv_weight = torch.cat([w.detach() for w in sources[:3]])
            if self.qk_norm_per_head:
                q_gain_K, k_gain_K = sources[3].detach(), sources[4].detach()
                self._qk_gain = torch.cat([q_gain_K.expand(self.num_heads, -1), k_gain_K.expand(self.num_kv_heads, -1)])
            self._decode_key = key
        return self._qkv_weight

    def _heads(
        self, x_BTD: torch.Tensor, cos_BT1K: torch.Tensor, sin_BT1K: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (B, T, H, K), k (B, T, G, K) normalised and rotated, and v (B, T, G, K)."""
        B, T, _ = x_BTD.shape
        H, G, K = self.num_heads, self.num_kv_heads, self.head_dim
        if self._fuse_for_decoding and not torch.is_grad_enabled():
            qkv_BTF = F.linear(x_BTD, self._decode_weights())  # (B, T, (H + 2G)·K)
            v_BTGK = qkv_BTF[..., (H + G) * K:].unflatten(-1, (G, K))
            if qkv_BTF.dtype == torch.float32 and not self.qk_norm_full:
                qk_BTNK = qkv_BTF[..., :(H + G) * K].unflatten(-1, (H + G, K))  # N = H + G heads
                if self.qk_norm_per_head:  # = RMSNorm per head with q's or k's gain (fp32 path)
                    qk_BTNK = F.rms_norm(qk_BTNK, (K,), None, self.q_norm.eps) * self._qk_gain
                q_BTHK, k_BTGK = apply_rotary(qk_BTNK, cos_BT1K, sin_BT1K).split([H, G], dim=2)
                return q_BTHK, k_BTGK, v_BTGK
            q_BTF, k_BTF = qkv_BTF[..., :H * K], qkv_BTF[..., H * K:(H + G) * K]
        elif torch.is_grad_enabled() and all(type(p) is nn.Linear for p in (self.q_proj, self.k_proj, self.v_proj)):
            # Training: one GEMM over the concatenated weights (a 3·D·K-float copy per call) casts
            # and reads x once, and its backward is one GEMM instead of three products and two sums.
            # Only over plain nn.Linear: a swapped-in module (FP8, adapters) keeps its own forward.
            weight_FD = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            q_BTF, k_BTF, v_BTF = F.linear(x_BTD, weight_FD).split([H * K, G * K, G * K], dim=-1)
            v_BTGK = v_BTF.unflatten(-1, (G, K))
        else:
            q_BTF, k_BTF = self.q_proj(x_BTD), self.k_proj(x_BTD)  # (B, T, H·K), (B, T, G·K)
            v_BTGK = self.v_proj(x_BTD).view(B, T, G, K)
        if self.qk_norm_full:
            q_BTF, k_BTF = self.q_norm(q_BTF), self.k_norm(k_BTF)
        q_BTHK, k_BTGK = q_BTF.unflatten(-1, (H, K)), k_BTF.unflatten(-1, (G, K))
        if self.qk_norm_per_head and torch.is_grad_enabled() and not torch.compiler.is_compiling() \
                and self.q_norm.weight.dtype == torch.float32:
            # Training: norm, rotation and cast as one function (inductor fuses the plain path itself).
            return (norm_rotary(q_BTHK, self.q_norm.weight, self.q_norm.eps, cos_BT1K, sin_BT1K),
                    norm_rotary(k_BTGK, self.k_norm.weight, self.k_norm.eps, cos_BT1K, sin_BT1K), v_BTGK)
        if self.qk_norm_per_head:
            q_BTHK, k_BTGK = self.q_norm(q_BTHK), self.k_norm(k_BTGK)
        return apply_rotary(q_BTHK, cos_BT1K, sin_BT1K), apply_rotary(k_BTGK, cos_BT1K, sin_BT1K), v_BTGK

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BT1K: torch.Tensor,
        sin_BT1K: torch.Tensor,
        attn_mask_B1TS: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
    ) -> tuple[torch.Tensor, KVCache]:
        """Attend causally over the cached and the new positions.

        Args:
            x_BTD: (B, T, D) normalised hidden states.
            cos_BT1K, sin_BT1K: (B, T, 1, K) RoPE tables of the new positions.
            attn_mask_B1TS: from :func:`build_attention_mask`; None = plain causal (no past) or
                a single query over the whole cache.
            past_kv: (k, v) each (B, G, S_past, K) after RoPE, or None.

        Returns:
            ``(out_BTD, (k, v))`` where k and v (B, G, S, K) hold past and new positions; the
            caller keeps them only when it asked for a cache.
        """
        B, T, _ = x_BTD.shape
        q_BTHK, k_BTGK, v_BTGK = self._heads(x_BTD, cos_BT1K, sin_BT1K)
        # The norms return their gain's dtype (fp32); under autocast SDPA wants one dtype.
        dtype = v_BTGK.dtype
        q_BHTK = q_BTHK.to(dtype).transpose(1, 2)  # (B, H, T, K)
        k_BGTK = k_BTGK.to(dtype).transpose(1, 2)  # (B, G, T, K)
        v_BGTK = v_BTGK.transpose(1, 2)  # (B, G, T, K)
        if past_kv is not None:
            k_BGTK = torch.cat([past_kv[0].to(dtype), k_BGTK], dim=2)  # (B, G, S, K)
            v_BGTK = torch.cat([past_kv[1].to(dtype), v_BGTK], dim=2)  # (B, G, S, K)
        # A plain bool for SDPA: an ``if`` makes torch.compile guard on T (with T dynamic, ``T > 1``
        # passed as an argument would be a SymBool, which SDPA rejects: a graph break).
        is_causal = False if T == 1 else attn_mask_B1TS is None and past_kv is None
        out_BHTK = attention(q_BHTK, k_BGTK, v_BGTK, attn_mask=attn_mask_B1TS,
                             dropout_p=self.dropout if self.training else 0.0, is_causal=is_causal)
        out_BTD = out_BHTK.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H·K)
        return self.o_proj(out_BTD), (k_BGTK, v_BGTK)
