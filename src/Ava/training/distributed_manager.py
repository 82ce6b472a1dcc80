"""Training on many processes: the process group, the device mesh and the DDP / FSDP2 / expert-parallel model.

:class:`DistributedParallelism` is the :class:`~Ava.training.parallel.Parallelism` of a run that
``torchrun`` started with more than one process. Everything is PyTorch's own: the process group
(NCCL on CUDA, Gloo on CPU, with ``distributed.timeout_s`` on every collective), ``DeviceMesh``,
``DistributedDataParallel``, FSDP2's ``fully_shard`` and ``torch.distributed.checkpoint``'s
state-dict API.

Ranks and meshes. Every rank reads different rows of each global batch (``dp_size`` = world
size). With ``distributed.expert_parallel: N`` the ranks also form a ``(world / N) × N`` mesh
``("dp", "ep")``: the N ranks of an ``ep`` group each hold ``num_experts / N`` routed experts
(:func:`~Ava.layers.expert_parallel.shard_experts`) and exchange token rows by all-to-all; the
ranks of a ``dp`` group hold the same experts. The expert weights' gradients are summed over the
``dp`` group only; every other parameter is replicated (DDP) or sharded (FSDP2) over all ranks.

Gradient scale. Each rank's loss is the mean over its own rows, and DDP / FSDP2 average the
gradients over the W ranks: the gradient of the mean of the W rank losses, which is the
single-process gradient of the same global batch. An expert's gradient on its owner already sums
the contributions of its ``ep`` group's ranks (the all-to-all's backward); summing over the
``dp`` group and dividing by W gives the same mean.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.nn.parallel import DistributedDataParallel

from ..config import EnhancedTrainingConfig
from ..errors import AvaCheckpointError, AvaConfigError, AvaPeerError
from ..layers.expert_parallel import expert_parameter_names, gather_expert_state, shard_experts
from .parallel import Parallelism, ReduceOp, SingleProcess, T, resolve_device

logger = logging.getLogger(__name__)

# Parameters + gradients + AdamW's two moments, fp32: what ``strategy: auto`` counts per parameter.
TRAINING_BYTES_PER_PARAMETER = 16
_OPS = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def launched_world_size() -> int:
    """Processes of this job as ``torchrun`` (or any launcher setting ``WORLD_SIZE``) says; 1 otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


class DistributedParallelism(Parallelism):
    """More than one process: DDP or FSDP2 over all ranks, optionally expert-parallel.

    Joins the default process group (or uses the one already initialised, as tests do) and
    builds the meshes. ``wrap`` then shards the experts (``expert_parallel > 1``) and wraps the
    model.

    Args:
        config: the resolved training config (``distributed``, ``run.device``, ``model.num_experts``).

    Raises:
        AvaConfigError: a setting that cannot work on this job (named with its key).
    """

    def __init__(self, config: EnhancedTrainingConfig) -> None:
        settings = config.distributed
        device = resolve_device(config.run.device)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        backend = settings.backend if settings.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if backend == "nccl" and device.type != "cuda":
            raise AvaConfigError("distributed.backend: nccl needs CUDA devices; use gloo (or auto) on CPU")
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            dist.init_process_group(backend, timeout=timedelta(seconds=settings.timeout_s),
                                    device_id=device if device.type == "cuda" else None)
        super().__init__(device)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.dp_size = self.world_size
        self.ep_size = ep = settings.expert_parallel
        self.requested = settings.strategy
        self._precision = config.precision.dtype
        self.strategy = settings.strategy
        num_experts = config.model.num_experts
        if self.world_size % ep or num_experts % ep:
            raise AvaConfigError(
                f"distributed.expert_parallel: {ep} must divide both the number of processes ({self.world_size}) "
                f"and model.num_experts ({num_experts}); pick a common divisor"
            )
        for key, value, why in (
            ("gradient.surgery.method", config.gradient.surgery.method, "its per-term backward passes"),
            ("optimizer.name", config.optimizer.name if config.optimizer.name == "sophia" else "none",
             "its Hessian refresh's extra backward"),
        ):
            if value != "none":
                raise AvaConfigError(f"{key}: {value} does not run on several processes yet ({why} bypass the "
                                     "gradient all-reduce); train it on one process or turn it off")
        self.world_mesh = DeviceMesh.from_group(dist.group.WORLD, device.type, mesh_dim_names=("world",))
        self.ep_mesh: DeviceMesh | None = None
        if ep > 1:
            self.ep_mesh = init_device_mesh(device.type, (self.world_size // ep, ep), mesh_dim_names=("dp", "ep"))
        self._expert_names: set[str] = set()  # sharded expert parameters (FQNs of the unwrapped model)
        self._expert_params: list[nn.Parameter] = []

    def describe(self) -> str:
        experts = f", {self.ep_size}-way expert parallel" if self.ep_size > 1 else ""
        return f"{self.strategy} over {self.world_size} processes ({dist.get_backend()}{experts})"

    # -- the model ---------------------------------------------------------------------------

    def resolve_strategy(self, num_parameters: int) -> str:
        """``ddp`` or ``fsdp2`` for a model of ``num_parameters`` (``strategy: auto`` decides by size)."""
        if self.requested in ("ddp", "fsdp2"):
            return self.requested
        return auto_strategy(num_parameters, self.device, self.world_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Shard the experts (expert parallelism), then DDP or FSDP2 over all ranks.

        Returns:
            The DDP wrapper, or ``model`` itself turned into an FSDP2 module.
        """
        if self.ep_mesh is not None:
            shard_experts(model, self.ep_mesh["ep"].get_group())
            self._expert_names = expert_parameter_names(model)
            self._expert_params = [p for n, p in model.named_parameters() if n in self._expert_names]
        # auto: what one rank would hold under DDP (its own experts only, under expert parallelism)
        self.strategy = self.resolve_strategy(sum(p.numel() for p in model.parameters()))
        if self._precision == "fp16" and (self.strategy == "fsdp2" or self.ep_size > 1):
            # GradScaler's overflow check reads this rank's gradients only: with sharded gradients
            # the ranks could disagree on the loss scale.
            raise AvaConfigError(
                f"precision.dtype: fp16 runs on one process or under ddp, not {self.strategy}"
                f"{' with expert parallelism' if self.ep_size > 1 else ''}; use bf16 (no loss scaling needed) "
                "or distributed.strategy: ddp with distributed.expert_parallel: 1"
            )
        if self.strategy == "fsdp2":
            ignored = set(self._expert_params)
            for block in model.decoder_layers() if hasattr(model, "decoder_layers") else []:
                fully_shard(block, mesh=self.world_mesh, ignored_params=ignored)
            fully_shard(model, mesh=self.world_mesh, ignored_params=ignored)
            return model
        if self._expert_names:
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(self._expert_names))
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Buffers (router biases) get identical updates on every rank from all-reduced loads; the
        # health checker compares the replicas instead of broadcasting them every step.
        return DistributedDataParallel(model, device_ids=device_ids, forward_sync_buffers=False)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model under DDP's wrapper (FSDP2 wraps in place)."""
        return model.module if isinstance(model, DistributedDataParallel) else model

    def gradient_sync(self, model: nn.Module, enabled: bool) -> Any:
        """Context for one micro-batch's backward: gradients are reduced only on the last one."""
        if isinstance(model, DistributedDataParallel) and not enabled:
            return model.no_sync()
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(enabled)
        return super().gradient_sync(model, enabled)

    def finish_gradients(self, model: nn.Module) -> None:
        """Sum the sharded experts' gradients over their ``dp`` group (one all-reduce of them all,
        flattened) and divide by the world size."""
        if not self._expert_params:
            return
        for param in self._expert_params:
            if param.grad is None:  # no row reached these experts anywhere in the group: still reduce
                param.grad = torch.zeros_like(param)
        grads = [param.grad for param in self._expert_params]
        if self.world_size // self.ep_size > 1:
            flat = _flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.ep_mesh["dp"].get_group())
            for grad, summed in zip(grads, _unflatten_dense_tensors(flat, grads)):
                grad.copy_(summed)
        torch._foreach_div_(grads, float(self.world_size))

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the global gradient norm (over every rank's shards and experts); returns the norm before."""
        expert_ids = {id(p) for p in self._expert_params}
        shared = [p.grad for p in params if id(p) not in expert_ids and p.grad is not None]
        norm_sq = _full(torch.nn.utils.get_total_norm(shared)).float().square() if shared else None
        experts = [p.grad for p in params if id(p) in expert_ids and p.grad is not None]
        if experts:  # each ep rank holds other experts: add their squares over the ep group
            expert_sq = torch.nn.utils.get_total_norm(experts).float().square()
            dist.all_reduce(expert_sq, group=self.ep_mesh["ep"].get_group())
            norm_sq = expert_sq if norm_sq is None else norm_sq + expert_sq
        total = norm_sq.sqrt() if norm_sq is not None else torch.zeros((), device=self.device)
        if max_norm != float("inf"):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # -- collectives -------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=_OPS[op])
        return out / self.world_size if op == "mean" else out

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return parts

    def broadcast_object(self, value: Any) -> Any:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_objects(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def barrier(self) -> None:
        dist.barrier()

    def on_main(self, fn: Callable[[], T], share: bool = False) -> T | None:
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except BaseException as err:  # noqa: BLE001 (the other ranks must hear of it, then it is re-raised)
                error = err
        shared, failure = self.broadcast_object((result if share and error is None else None,
                                                 None if error is None else str(error)))
        if error is not None:
            raise error
        if failure is not None:
            raise AvaPeerError(f"rank 0 failed: {failure}")
        return result if self.is_main else shared

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def sharded_checkpoints(self) -> bool:
        return True

    def sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """FSDP2 shards as DTensors, replicated tensors plain (DCP writes them once), and the
        experts' slices as the DTensors they are, so any world size can load them."""
        state = super().sharded_state(model, optimizer)
        if self._expert_names:
            state["model"] = {k: self._as_dtensor(v) if k in self._expert_names else v
                              for k, v in state["model"].items()}
            state["optimizer"]["state"] = {
                k: ({n: self._as_dtensor(t) if t.dim() > 0 else t for n, t in v.items()}
                    if k in self._expert_names else v)
                for k, v in state["optimizer"]["state"].items()
            }
        return state

    def load_sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           state: dict[str, Any]) -> None:
        if self._expert_names:
            state = dict(state)
            state["model"] = {k: v.to_local() if isinstance(v, DTensor) and k in self._expert_names else v
                              for k, v in state["model"].items()}
            if "optimizer" in state:
                state["optimizer"] = dict(state["optimizer"])
                state["optimizer"]["state"] = {
                    k: ({n: t.to_local() if isinstance(t, DTensor) else t for n, t in v.items()}
                        if k in self._expert_names else v)
                    for k, v in state["optimizer"]["state"].items()
                }
        super().load_sharded_state(model, optimizer, state)

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load full weights (a one-process checkpoint resumed on several ranks: DDP only).

        Raises:
            AvaCheckpointError: FSDP2 or expert parallelism, whose optimizer state a one-process
                checkpoint cannot fill.
        """
        if self.strategy == "fsdp2" or self._expert_names:
            raise AvaCheckpointError(
                f"this checkpoint was written by one process; it resumes on {self.world_size} ranks under "
                f"distributed.strategy: ddp without expert_parallel (now {self.strategy}, expert_parallel "
                f"{self.ep_size}), or on one process"
            )
        super().load_model_state_dict(model, state)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The full weights on every rank (FSDP2 shards and expert slices gathered), on the CPU."""
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                    broadcast_from_rank0=False))
        if self._expert_names:
            full = gather_expert_state(full, self.unwrap(model), self.ep_mesh["ep"].get_group())
        return full

    def _as_dtensor(self, local: torch.Tensor) -> DTensor:
        """An expert slice as the DTensor it is: sharded on dim 0 over ``ep``, the same on every ``dp`` rank."""
        return DTensor.from_local(local, self.ep_mesh, [Replicate(), Shard(0)], run_check=False)

    def close(self) -> None:
        """Leave the process group cleanly (a barrier first, so no rank tears down mid-collective)."""
        if self._owns_group and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def auto_strategy(num_parameters: int, device: torch.device, world_size: int) -> str:
    """``distributed.strategy: auto`` on several processes: ``fsdp2`` when one rank's model with
    AdamW state (:data:`TRAINING_BYTES_PER_PARAMETER` per parameter) would not fit its memory
    (its GPU, or its share of this machine's RAM), else ``ddp``. The memory estimate uses it too."""
    need = num_parameters * TRAINING_BYTES_PER_PARAMETER
    return "fsdp2" if need > _device_bytes(device, world_size) else "ddp"


def _device_bytes(device: torch.device, world_size: int) -> int:
    """Memory one rank may use: its GPU's, or this machine's RAM shared by the local ranks."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local, 1)


def build_parallelism(config: EnhancedTrainingConfig) -> Parallelism:
    """The :class:`Parallelism` of ``config.distributed`` for this process.

    One process (no ``torchrun``, or ``WORLD_SIZE=1``) is :class:`SingleProcess` whatever the
    strategy; more than one is :class:`~Ava.training.distributed_manager.DistributedParallelism`.

    Args:
        config: the resolved training config.

    Raises:
        AvaConfigError: ``strategy: none`` (or expert parallelism) that does not fit the launch.
    """
    settings = config.distributed
    world_size = launched_world_size()
    if world_size == 1:
        if settings.expert_parallel > 1:
            raise AvaConfigError(
                f"distributed.expert_parallel: {settings.expert_parallel} needs as many processes; launch with "
                f"`ava train CONFIG --nproc {settings.expert_parallel}` (torchrun) or set it to 1"
            )
        return SingleProcess(resolve_device(config.run.device))
    if settings.strategy == "none":
        raise AvaConfigError(
            f"distributed.strategy: none, but {world_size} processes were launched; use auto, ddp or fsdp2, "
            "or launch one process"
        )
    return DistributedParallelism(config)
