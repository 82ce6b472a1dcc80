"""Building blocks of the decoder: norms, RoPE, attention, dense and MoE MLPs, routing, experts.

Layers import only ``torch`` and ``config/``; the model in ``models/`` assembles them.
"""

from .attention import Attention, KVCache, build_attention_mask
from .experts import (
    EXPERT_BACKENDS,
    DispatchPlan,
    Experts,
    combine_sorted,
    dispatch_sorted,
    experts_grouped,
    experts_loop,
    grouped_swiglu,
)
from .mlp import SwiGLU
from .moe import MoEBlock, MoEOutput
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary
from .routing import RouterOutput, TopKRouter, route_topk

__all__ = [
    "EXPERT_BACKENDS", "Attention", "DispatchPlan", "Experts", "KVCache", "MoEBlock", "MoEOutput",
    "RMSNorm", "RotaryEmbedding", "RouterOutput", "SwiGLU", "TopKRouter", "apply_rotary",
    "build_attention_mask", "combine_sorted", "dispatch_sorted", "experts_grouped",
    "experts_loop", "grouped_swiglu", "route_topk",
]
