"""Optimizer construction: parameter groups and the five optimizers of ``optimizer.name``.

Groups (each a dict with a ``name`` for logging and an ``lr_mult`` the LR is built from):

- ``no_decay``: norms, biases and embeddings. Decaying them hurts and is not what the papers did.
- ``decay``: hidden weight matrices (attention projections, dense MLPs).
- ``head``: the output head (decayed; kept apart so Muon leaves it to AdamW).
- ``router``: router weights ``mlp.gate`` (LR × ``optimizer.router_lr_mult``).
- ``expert``: 3-D routed expert weights (LR × ``optimizer.expert_lr_mult``).

``no_decay`` comes first, so ``param_groups[0]["lr"]`` is always the schedule's LR (what the
trainer logs). Every optimizer keeps its state in tensors and plain numbers, so
``optimizer.state_dict()`` survives ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import logging

import torch

from ..config import OptimizerConfig
from .lion import Lion
from .muon import MuonWithAdamW
from .sophia import SophiaG

logger = logging.getLogger(__name__)

#: published (β1, β2) per optimizer, used when ``optimizer.betas`` is null
DEFAULT_BETAS: dict[str, tuple[float, float]] = {
    "adamw": (0.9, 0.95), "muon": (0.9, 0.95), "lion": (0.9, 0.99), "sophia": (0.965, 0.99),
    "adafactor": (0.9, 0.95),
}


def _kind(name: str, param: torch.Tensor, embeddings: set[int]) -> str:
    """Which group a named parameter belongs to."""
    if param.ndim < 2 or id(param) in embeddings:
        return "no_decay"
    if name.endswith("mlp.gate.weight"):
        return "router"
    if ".mlp.experts." in name or param.ndim == 3:
        return "expert"
    if name.endswith("lm_head.weight"):
        return "head"
    return "decay"


def parameter_groups(model: torch.nn.Module, config: OptimizerConfig, learning_rate: float) -> list[dict]:
    """Split trainable parameters into the groups described in the module docstring.

    Args:
        model: the model (tied weights appear once).
        config: optimizer section (weight decay, LR multipliers, Muon's scope).
        learning_rate: peak learning rate; each group's ``lr`` is this times its ``lr_mult``.

    Returns:
        Param-group dicts with keys ``name, params, weight_decay, lr, lr_mult`` (and ``use_muon``
        when ``config.name == "muon"``); empty groups are dropped.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    buckets: dict[str, list[torch.Tensor]] = {k: [] for k in ("no_decay", "decay", "head", "router", "expert")}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets[_kind(name, param, embeddings)].append(param)
    muon = config.name == "muon"
    lr_mult = {"no_decay": 1.0, "decay": config.muon_lr_mult if muon else 1.0, "head": 1.0,
               "router": config.router_lr_mult, "expert": config.expert_lr_mult}
    if muon and config.muon_experts == "per_expert":
        lr_mult["expert"] *= config.muon_lr_mult
    groups = []
    for name, params in buckets.items():
        if not params:
            continue
        group = {"name": name, "params": params, "lr_mult": lr_mult[name],
                 "lr": learning_rate * lr_mult[name],
                 "weight_decay": 0.0 if name == "no_decay" else config.weight_decay}
        if muon:
            group["use_muon"] = name == "decay" or (name == "expert" and config.muon_experts == "per_expert")
        groups.append(group)
    return groups


def build_optimizer(
    model: torch.nn.Module, config: OptimizerConfig, learning_rate: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer named in ``config`` over :func:`parameter_groups` of ``model``.

    AdamW uses the fused kernel where torch has one for the device (CUDA and CPU in torch ≥ 2.4),
    which avoids one pass over the parameters per step.

    Args:
        model: the model.
        config: optimizer section.
        learning_rate: peak learning rate (the scheduler multiplies each group's ``lr``).
        device: where the parameters live.

    Returns:
        One ``torch.optim.Optimizer``; Sophia's also has ``update_hessian(scale)``.
    """
    groups = parameter_groups(model, config, learning_rate)
    betas = config.betas or DEFAULT_BETAS[config.name]
    if config.name == "adamw":
        fused = device.type in {"cuda", "cpu"}
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, eps=config.eps, fused=fused)
    if config.name == "lion":
        return Lion(groups, lr=learning_rate, betas=betas, weight_decay=config.weight_decay)
    if config.name == "sophia":
        return SophiaG(groups, lr=learning_rate, betas=betas, rho=config.sophia_rho,
                       weight_decay=config.weight_decay, eps=config.eps)
    if config.name == "adafactor":
        # torch's Adafactor: factored row/column second moments for ≥ 2-D tensors (per expert
        # for [E, out, in]), β2 schedule 1 − t^−0.8, update clipping d = 1, relative step size
        # lr·max(ε2, RMS(θ)), so its lr is a cap on the relative step (1e-2 is its default).
        return torch.optim.Adafactor(groups, lr=learning_rate, weight_decay=config.weight_decay,
                                     foreach=device.type == "cuda")
    if config.name == "muon":
        return MuonWithAdamW(groups, lr=learning_rate, betas=betas, eps=config.eps,
                             weight_decay=config.weight_decay, momentum=config.muon_momentum,
                             ns_steps=config.muon_ns_steps)
    raise ValueError(f"unknown optimizer {config.name!r}")  # unreachable: the schema limits names


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (momenta, second moments, Hessian estimates).

    Args:
        optimizer: any torch optimizer.

    Returns:
        Total ``numel × element_size`` of every tensor in ``optimizer.state``.
    """
    return sum(
        value.numel() * value.element_size()
        for state in optimizer.state.values() for value in state.values()
        if isinstance(value, torch.Tensor)
    )
