"""One pre-norm decoder block (attention + dense or MoE MLP), shared by the stack and the MTP heads.

Shape suffixes: see ``Ava/__init__.py``; here B batch, T new positions, L = past + T key
positions, D hidden, G key/value heads, A head dim.

The self-attention is ``model.attention``'s kind: standard (:class:`~Ava.layers.Attention`),
mixture-of-head (:mod:`Ava.layers.mixture_of_heads`) or mixture of attention heads
(:mod:`Ava.layers.mixture_of_attention`); the routed kinds also return their router's balancing
loss, which :meth:`DecoderLayer.forward` leaves in :attr:`DecoderLayer.attention_aux_loss` for the
model to collect. A layer of the main stack may also hold a gated cross-attention block
(``model.cross_attention``, :mod:`Ava.layers.cross_attention`) between its self-attention and its
MLP; it runs only when the forward is given a non-empty context.

Two training-only switches change how the block runs, never what it computes: activation
checkpointing (recompute the block in backward instead of keeping its activations) and a
``torch.compile``d copy of the block's forward. Both apply only in a training forward (train
mode, autograd on); evaluation and cached decoding always run the plain eager forward, so they
never trigger a compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from ..config.feature_compatibility import attention_balance_coef
from ..layers import Attention, KVCache, MoEBlock, RMSNorm, SwiGLU
from ..layers.cross_attention import CrossAttention, has_context
from ..layers.mixture_of_attention import MixtureOfAttentionHeads
from ..layers.mixture_of_heads import MixtureOfHeadsAttention
from ..layers.routing import RouterOutput

LayerOutput = tuple[torch.Tensor, KVCache, RouterOutput | None]
# What _block returns: LayerOutput plus the routed attention's balancing loss (None for standard).
_BlockOutput = tuple[torch.Tensor, KVCache, RouterOutput | None, torch.Tensor | None]

ATTENTION_KINDS: dict[str, type[Attention]] = {
    "standard": Attention, "moh": MixtureOfHeadsAttention, "moa": MixtureOfAttentionHeads,
}


def attention_balance_terms(cfg: ModelConfig, per_layer: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"attention_balance": coef · mean over layers}`` of the routed attention's balancing losses.

    Args:
        cfg: the model config (``attention`` and ``moh``/``moa`` ``aux_loss_coef``).
        per_layer: the unweighted loss of each layer that ran (main stack, then MTP blocks).

    Returns:
        The term, or ``{}`` for standard attention, a zero coefficient or no layer.
    """
    coef = attention_balance_coef(cfg)
    if coef == 0 or not per_layer:
        return {}
    return {"attention_balance": coef * torch.stack(per_layer).mean()}


class DecoderLayer(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``; mlp is MoE or dense.

    Args:
        cfg: resolved model config.
        layer_idx: position in the stack (the first ``moe.first_dense_layers`` are dense; after
            them, layer i is MoE when ``(i + 1) % moe.moe_every == 0``).

    Attributes:
        activation_checkpointing: in a training forward, run the block under
            ``torch.utils.checkpoint`` (non-reentrant): only its inputs are kept, the rest is
            recomputed in backward, with the RNG state of the forward (dropout and noisy
            routing draw the same numbers).
        attention_aux_loss: the unweighted balancing loss of a routed self-attention (``moh`` /
            ``moa``) from the latest forward, None for standard attention; the model takes it
            right after calling the layer (:meth:`take_attention_aux_loss`).
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.is_moe = layer_idx >= cfg.moe.first_dense_layers and (layer_idx + 1) % cfg.moe.moe_every == 0
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.self_attn = ATTENTION_KINDS[cfg.attention](cfg)
        self.routed_attention = cfg.attention != "standard"
        every = cfg.cross_attention.every
        # Main stack only: the MTP blocks (layer_idx ≥ num_layers) are never given a context.
        in_stack = layer_idx < cfg.num_layers
        self.cross_attn = CrossAttention(cfg) if every and in_stack and (layer_idx + 1) % every == 0 else None
        self.attention_aux_loss: torch.Tensor | None = None
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp: nn.Module = MoEBlock(cfg) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.activation_checkpointing = False
        # torch.compile of the unbound block, called with self: a deepcopy of the layer then still
        # runs its own weights. Not a submodule, so parameter names and checkpoints are unchanged.
        self._compiled_block: Callable[..., LayerOutput] | None = None

    def compile_for_training(self, enabled: bool = True) -> None:
        """Run training forwards through ``torch.compile(block)`` (or stop doing so).

        Compilation happens lazily, at the first training forward. Every layer compiles the same
        code, so dynamo reuses the graphs across layers of the same kind (parameters are graph
        inputs); the routed experts (:class:`~Ava.layers.experts.Experts`, data-dependent shapes
        and host reads) are excluded with ``torch.compiler.disable`` and run eager between two
        graphs.

        Args:
            enabled: compile (True) or go back to the eager block (False).
        """
        self._compiled_block = torch.compile(DecoderLayer._block) if enabled else None

    def __getstate__(self) -> dict:
        # A compiled function does not pickle (torch.save of the whole model, copy.deepcopy): it
        # travels as a flag and is rebuilt on load (and compiles again at the first training step).
        state = dict(super().__getstate__())
        state["_compiled_block"] = state["_compiled_block"] is not None
        state["attention_aux_loss"] = None  # a tensor of the latest forward's graph (no deepcopy)
        return state

    def __setstate__(self, state: dict) -> None:
        compiled = state.pop("_compiled_block", False)
        super().__setstate__(state)
        self.compile_for_training(bool(compiled))

    def forward(
        self,
        x_BTD: torch.Tensor,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None,
        past_kv: KVCache | None,
        token_ids_BT: torch.Tensor | None = None,
        context_BSC: torch.Tensor | None = None,
        context_mask_BS: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
    ) -> LayerOutput:
        """(B, T, D) -> ((B, T, D), this layer's (k, v), routing or None for a dense layer).

        ``token_ids_BT`` (B, T) are the input ids, for the hash router. ``context_BSC`` (B, S, C)
        and ``context_mask_BS`` (B, S) feed the cross-attention block, if the layer has one (None
        or S = 0: the block is skipped). ``token_mask_BT`` (B, T) bool marks the real tokens
        (False = padding) for the MoE router's statistics; None = all real. A training forward
        (train mode, autograd on) goes through the compiled block and/or activation checkpointing
        when they are switched on; everything else runs :meth:`_block` directly. A routed
        self-attention's balancing loss is left in :attr:`attention_aux_loss`."""
        args = (x_BTD, cos_BT1A, sin_BT1A, attn_mask_B1TL, past_kv, token_ids_BT, context_BSC, context_mask_BS,
                token_mask_BT)
        if not (self.training and torch.is_grad_enabled()):
            out = self._block(*args)
        else:
            block = self._block
            if self._compiled_block is not None and past_kv is None:
                block = functools.partial(self._compiled_block, self)
            if self.activation_checkpointing:
                out = checkpoint(block, *args, use_reentrant=False)
            else:
                out = block(*args)
        x_BTD, present_kv, routing, self.attention_aux_loss = out
        return x_BTD, present_kv, routing

    def take_attention_aux_loss(self) -> torch.Tensor | None:
        """The routed attention's balancing loss of the latest forward (None for standard
        attention), cleared so that no graph outlives the step and no value is read twice."""
        aux, self.attention_aux_loss = self.attention_aux_loss, None
        return aux

    def _block(
        self,
        x_BTD: torch.Tensor,
        cos_BT1A: torch.Tensor,
        sin_BT1A: torch.Tensor,
        attn_mask_B1TL: torch.Tensor | None,
        past_kv: KVCache | None,
        token_ids_BT: torch.Tensor | None,
        context_BSC: torch.Tensor | None = None,
        context_mask_BS: torch.Tensor | None = None,
        token_mask_BT: torch.Tensor | None = None,
    ) -> _BlockOutput:
        """The block itself (see :meth:`forward`); free of side effects, so it may run twice.
        Returns :data:`LayerOutput` plus the routed attention's balancing loss (or None)."""
        attn_aux = None
        if self.routed_attention:
            attn_BTD, present_kv, attn_aux = self.self_attn(
                self.input_layernorm(x_BTD), cos_BT1A, sin_BT1A, attn_mask_B1TL, past_kv
            )
        else:
            attn_BTD, present_kv = self.self_attn(
                self.input_layernorm(x_BTD), cos_BT1A, sin_BT1A, attn_mask_B1TL, past_kv
            )
        x_BTD = x_BTD + self._dropout(attn_BTD)
        if self.cross_attn is not None and has_context(context_BSC):
            x_BTD = x_BTD + self._dropout(self.cross_attn(x_BTD, context_BSC, context_mask_BS))
        h_BTD = self.post_attention_layernorm(x_BTD)
        routing = None
        if self.is_moe:
            moe_out = self.mlp(h_BTD, token_ids_BT, token_mask_BT)
            mlp_BTD, routing = moe_out.hidden_states, moe_out.routing
        else:
            mlp_BTD = self.mlp(h_BTD)
        return x_BTD + self._dropout(mlp_BTD), present_kv, routing, attn_aux

    def _dropout(self, y_BTD: torch.Tensor) -> torch.Tensor:
        """Residual dropout; without a module call when p = 0 (decoding runs ~40 ops per layer)."""
        return self.resid_dropout(y_BTD) if self.resid_dropout.p else y_BTD
