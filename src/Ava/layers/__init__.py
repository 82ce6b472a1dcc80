"""Building blocks of the decoder: norms, RoPE, attention, dense and MoE MLPs, routing, experts.

Layers import only ``torch`` and ``config/``; the model in ``models/`` assembles them.
"""

from .attention import Attention, KVCache, build_attention_mask
from .expert_kernels import ExpertKernel, grouped_kernel, loop_kernel
from .experts import Experts, describe_auto, resolve_backend, routed_experts
from .kernels import KERNELS, KernelChoice, kernel_for, resolve_kernels
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
from .token_dispatcher import BufferLayout, DispatchPlan, LocalDispatcher, TokenDispatcher

__all__ = [
    "KERNELS", "ROUTERS", "Attention", "BufferLayout", "DispatchPlan", "ExpertKernel", "Experts", "KVCache",
    "KernelChoice", "LocalDispatcher", "MoEBlock", "MoEOutput", "RMSNorm", "RotaryEmbedding", "Router",
    "RouterOutput", "SwiGLU", "TokenDispatcher", "TopKRouter",
    "apply_capacity", "apply_rotary", "build_attention_mask", "describe_auto",
    "expert_capacity", "group_limited_mask", "grouped_kernel", "hash_experts", "kernel_for", "loop_kernel",
    "resolve_backend", "resolve_kernels", "route_expert_choice", "route_hash",
    "route_sigmoid", "route_topk", "routed_experts", "select_topk",
]
