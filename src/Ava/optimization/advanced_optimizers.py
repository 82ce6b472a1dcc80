"""Optimizer construction with parameter groups.

Weight decay applies to weight matrices only: norms, biases and embeddings are excluded (decaying
them hurts and is not what the papers did). Expert tensors are 3-D and do get decay.
"""

from __future__ import annotations

import logging

import torch

from ..config import OptimizerConfig

logger = logging.getLogger(__name__)


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group.

    Args:
        model: the model.
        weight_decay: decay of the decayed group.

    Returns:
        Two param-group dicts (empty groups are dropped), each with a ``name`` for logging.
    """
    embeddings = {
        id(module.weight) for module in model.modules() if isinstance(module, torch.nn.Embedding)
    }
    decay, no_decay = [], []
    for param in model.parameters():  # tied weights appear once
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: torch.nn.Module, config: OptimizerConfig, learning_rate: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer named in ``config`` over :func:`parameter_groups` of ``model``.

    AdamW uses the fused kernel where torch has one for the device (CUDA and CPU in torch ≥ 2.4),
    which avoids one pass over the parameters per step.
    """
    groups = parameter_groups(model, config.weight_decay)
    if config.name == "adamw":
        fused = device.type in {"cuda", "cpu"}
        return torch.optim.AdamW(
            groups, lr=learning_rate, betas=config.betas, eps=config.eps, fused=fused
        )
    raise ValueError(f"unknown optimizer {config.name!r}")  # unreachable: the schema limits names
