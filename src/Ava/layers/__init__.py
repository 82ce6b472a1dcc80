"""Building blocks of the decoder: norms, RoPE, attention, dense and MoE MLPs, routing, experts.

Layers import only ``torch`` and ``config/``; the model in ``models/`` assembles them.
"""

from .attention import Attention, KVCache, build_attention_mask
from .expert_dispatch import DispatchPlan, combine, dispatch, plan_dispatch
from .experts import (
    EXPERT_BACKENDS,
    Experts,
    experts_batched,
    experts_grouped,
    experts_loop,
    resolve_backend,
)
from .mlp import SwiGLU
from .moe import MoEBlock, MoEOutput
from .norm import RMSNorm
from .rotary import RotaryEmbedding, apply_rotary
from .routing import (
    ROUTERS,
    Router,
    RouterOutput,
    TopKRouter,
    apply_capacity,
    expert_capacity,
    group_limited_mask,
    hash_experts,
    route_expert_choice,
    route_hash,
    route_sigmoid,
    route_topk,
    select_topk,
)

__all__ = [
    "EXPERT_BACKENDS", "ROUTERS", "Attention", "DispatchPlan", "Experts", "KVCache", "MoEBlock",
    "MoEOutput", "RMSNorm", "RotaryEmbedding", "Router", "RouterOutput", "SwiGLU", "TopKRouter",
    "apply_capacity", "apply_rotary", "build_attention_mask", "combine", "dispatch",
    "expert_capacity", "experts_batched", "experts_grouped", "experts_loop",
    "group_limited_mask", "hash_experts", "plan_dispatch", "resolve_backend", "route_expert_choice", "route_hash",
    "route_sigmoid", "route_topk", "select_topk",
]
