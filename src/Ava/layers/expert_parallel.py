"""Expert parallelism: each rank of an expert-parallel group holds and runs E/N of the experts.

Shapes (legend in ``Ava/__init__.py``): E experts (global), D hidden, I expert intermediate width,
F = 2I. E/N local experts per rank has no letter of its own; tensors say it in a comment.

The model is built and initialised whole on every rank (so its weights equal the single-process
model's), then :func:`shard_experts` cuts every :class:`~Ava.layers.experts.Experts` down to its
rank's contiguous slice of experts and gives it an
:class:`~Ava.layers.token_dispatcher.AllToAllDispatcher`. Build the optimizer after sharding.

Gradients: the router, attention and every other replicated parameter get rank-local gradients
and reduce over the whole world as usual. An expert slice's gradient already sums the
contributions of the tokens that every rank of the expert-parallel group sent it (the all-to-all's
backward brings them home), so it reduces over the data-parallel group only:
:func:`expert_parameter_names` says which parameters those are. Checkpoints:
:func:`gather_expert_state` rebuilds the full (E, ...) tensors for a consolidated file, and
:func:`shard_expert_state` cuts a consolidated state dict down to a rank's slices for loading.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .experts import Experts
from .token_dispatcher import AllToAllDispatcher

__all__ = ["expert_parameter_names", "gather_expert_state", "shard_expert_state", "shard_experts"]

_EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def shard_experts(module: nn.Module, group: dist.ProcessGroup) -> None:
    """Keep only this rank's experts in every :class:`Experts` of ``module``, in place.

    Rank i of the N-rank ``group`` keeps experts ``[i·E/N, (i+1)·E/N)``: ``gate_up_proj`` and
    ``down_proj`` become new parameters holding a copy of that slice of the (already initialised)
    full weights, same dtype, device and ``requires_grad``. Each module records ``ep_rank``,
    ``ep_size`` and ``num_local_experts``, keeps ``num_experts`` = E, gets an
    :class:`AllToAllDispatcher` over ``group`` and forgets its resolved kernels (the registry is
    keyed by the local count).

    Args:
        module: any module containing :class:`Experts` (a model, a block, an Experts itself).
        group: the expert-parallel process group.

    Raises:
        ValueError: an Experts' E is not divisible by N, or it is already sharded.
    """
    for experts in [m for m in module.modules() if isinstance(m, Experts)]:
        if experts.ep_size != 1 or isinstance(experts.dispatcher, AllToAllDispatcher):
            raise ValueError(f"experts already sharded (ep rank {experts.ep_rank} of {experts.ep_size})")
        dispatcher = AllToAllDispatcher(group, experts.num_experts)  # raises when E % N != 0
        local = dispatcher.num_local_experts
        start = dispatcher.ep_rank * local
        for name in _EXPERT_WEIGHTS:
            full = getattr(experts, name)  # (E, ...)
            if full.shape[0] != experts.num_experts:
                raise ValueError(f"{name} holds {full.shape[0]} experts, the module says {experts.num_experts}")
            shard = nn.Parameter(full.detach()[start:start + local].clone(), requires_grad=full.requires_grad)
            setattr(experts, name, shard)  # (E/N, ...)
        experts.ep_rank, experts.ep_size, experts.num_local_experts = dispatcher.ep_rank, dispatcher.ep_size, local
        experts.dispatcher = dispatcher
        experts._kernels = {}


def _sharded_experts(module: nn.Module) -> list[Experts]:
    return [m for m in module.modules() if isinstance(m, Experts) and isinstance(m.dispatcher, AllToAllDispatcher)]


def expert_parameter_names(module: nn.Module) -> set[str]:
    """The fully-qualified names of the sharded expert parameters, as ``module.named_parameters()`` gives them.

    Their gradients reduce over the data-parallel group only (see the module doc); a checkpoint
    holds them as slices (:func:`gather_expert_state` to consolidate).

    Args:
        module: a module after :func:`shard_experts`.

    Returns:
        The names (empty when nothing was sharded).
    """
    sharded = {id(getattr(m, name)) for m in _sharded_experts(module) for name in _EXPERT_WEIGHTS}
    return {name for name, param in module.named_parameters() if id(param) in sharded}


def _slices(module: nn.Module) -> dict[str, Experts]:
    """Name of each sharded expert parameter -> the Experts holding it."""
    owners = {id(getattr(m, name)): m for m in _sharded_experts(module) for name in _EXPERT_WEIGHTS}
    return {name: owners[id(param)] for name, param in module.named_parameters() if id(param) in owners}


@torch.no_grad()
def gather_expert_state(
    state_dict: dict[str, torch.Tensor], module: nn.Module, group: dist.ProcessGroup | None = None
) -> dict[str, torch.Tensor]:
    """The state dict with every sharded expert slice replaced by the full (E, ...) tensor.

    A collective (``all_gather_into_tensor`` per expert parameter): every rank of the
    expert-parallel group must call it, with the same keys. Other entries pass through unchanged.

    Args:
        state_dict: ``module``'s state dict (keys as ``named_parameters`` gives them); sharded
            entries hold this rank's (E/N, ...) slice.
        module: the sharded module (says which keys are slices and over which group).
        group: the expert-parallel group; None = each Experts' own dispatcher group.

    Returns:
        A new dict: the full tensors (experts in global order) under the same keys.
    """
    out = dict(state_dict)
    for name, experts in sorted(_slices(module).items()):
        if name not in state_dict:
            continue
        shard = state_dict[name].detach().contiguous()  # (E/N, ...)
        ep_group = group if group is not None else experts.dispatcher.group
        full = shard.new_empty((shard.shape[0] * dist.get_world_size(ep_group), *shard.shape[1:]))
        dist.all_gather_into_tensor(full, shard, group=ep_group)  # rank order = expert order
        out[name] = full
    return out


def shard_expert_state(state_dict: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """A consolidated state dict cut down to this rank's expert slices (to load into a sharded module).

    Args:
        state_dict: full (E, ...) expert tensors under the keys ``named_parameters`` gives.
        module: the sharded module.

    Returns:
        A new dict whose expert entries are this rank's (E/N, ...) slices (views); others unchanged.
    """
    out = dict(state_dict)
    for name, experts in _slices(module).items():
        if name in state_dict:
            if state_dict[name].shape[0] != experts.num_experts:
                raise ValueError(f"{name} holds {state_dict[name].shape[0]} experts, expected all {experts.num_experts}")
            start = experts.ep_rank * experts.num_local_experts
            out[name] = state_dict[name][start:start + experts.num_local_experts]
    return out
