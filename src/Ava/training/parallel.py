"""The parallelism seam: how training is spread over processes and devices.

Everything that depends on how many processes train, and where, goes through a
:class:`Parallelism`: the device, building and wrapping the model (seed → build → ``init_weights``
→ precision transforms → activation checkpointing → compile → wrap, in that one place, like torchtitan's
``parallelize_fn``), the collectives the metrics need, which rows of a global batch this rank
reads, and how checkpoints take the model's state. The trainer, the metrics, the checkpoints and
the data feed talk to it, never to ``torch.distributed``.

``distributed.strategy: none`` (:class:`SingleProcess`) is the identity: one process, the
collectives return their input, a rank reads every row. It is the reference that other
strategies (DDP, FSDP2, expert parallelism) are compared against.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..config import EnhancedTrainingConfig
from ..errors import AvaCheckpointError
from ..optimization.fp8_training import apply_precision_transforms
from .precision import cast_parameters

if TYPE_CHECKING:
    from ..models import EnhancedMoEModel

logger = logging.getLogger(__name__)

ReduceOp = Literal["sum", "mean", "max", "min"]
T = TypeVar("T")


def resolve_device(name: str) -> torch.device:
    """``run.device``: ``auto`` → CUDA when available, else CPU; anything else as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Parallelism:
    """One process's view of a (possibly) parallel run. This base class is the single process.

    Attributes:
        rank: this process's index among the ``world_size`` processes.
        world_size: number of training processes.
        dp_size: data-parallel degree (processes reading different rows).
        ep_size: expert-parallel degree (processes holding different experts).
        device: where this process computes.
    """

    strategy = "none"

    def __init__(self, device: torch.device) -> None:
        self.rank = 0
        self.world_size = 1
        self.dp_size = 1
        self.ep_size = 1
        self.device = device

    # -- identity ----------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run folder, logs and checkpoints (rank 0)."""
        return self.rank == 0

    def describe(self) -> str:
        """How the run is spread, for the log."""
        return "one process"

    # -- the model ---------------------------------------------------------------------------

    def build_model(self, config: EnhancedTrainingConfig) -> "EnhancedMoEModel":
        """A new model for ``config``, initialised from ``run.seed`` and prepared to train.

        Construction draws no random numbers that matter: :meth:`prepare_model` then
        initialises every weight from ``run.seed`` alone, so this path and a model built by the
        user (the Quick Start's ``EnhancedMoEModel(config.model)``) start from the same weights.

        Args:
            config: the resolved training config.

        Returns:
            The model on :attr:`device`, with the execution settings of ``performance``.
        """
        from ..models import EnhancedMoEModel

        model = EnhancedMoEModel(config.model)
        return self.prepare_model(model, config)

    def prepare_model(self, model: nn.Module, config: EnhancedTrainingConfig) -> nn.Module:
        """Initialise (unless its weights were loaded), place and set up ``model`` for training.

        A model whose weights came from :meth:`~Ava.models.EnhancedMoEModel.from_pretrained`,
        ``load_state_dict`` or a checkpoint is never re-initialised; a freshly constructed one
        gets :meth:`~Ava.models.EnhancedMoEModel.init_weights` with ``run.seed``.

        Args:
            model: the model to train.
            config: the resolved training config (``run.seed``, ``precision``: FP8 or QAT
                transforms, ``performance``).

        Returns:
            The same model (a wrapper, for strategies that wrap), on :attr:`device`.
        """
        init = getattr(model, "init_weights", None)
        if init is not None and not getattr(model, "weights_loaded", False) \
                and getattr(model, "init_seed", None) != config.run.seed:
            init(config.run.seed)
        model.to(self.device)
        if config.precision.param_dtype == "bf16":  # bf16 weights; the optimizer keeps fp32 masters (precision.py)
            cast_parameters(model, torch.bfloat16)
        # precision.fp8 / precision.qat: class swaps of the GEMM modules (same parameters and names).
        apply_precision_transforms(model, config.precision, self.device)
        perf = config.performance
        if hasattr(model, "set_activation_checkpointing"):
            model.set_activation_checkpointing(perf.activation_checkpointing)
        if hasattr(model, "compile_layers"):
            model.compile_layers(perf.compile)
            if perf.compile:
                logger.info("performance.compile: torch.compile of the decoder layers (routed experts stay "
                            "eager); the first training step is slow while it compiles")
        return self.wrap(model)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model as the strategy trains it (DDP/FSDP2 wrappers); the identity here."""
        return model

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model inside :meth:`wrap`'s wrapper (its methods, its config); the identity here."""
        return model

    # -- the step ----------------------------------------------------------------------------

    def gradient_sync(self, model: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's backward; ``enabled`` on the step's last micro-batch only,
        so gradients are reduced over the ranks once per step. Nothing to reduce here."""
        return contextlib.nullcontext()

    def finish_gradients(self, model: nn.Module) -> None:
        """After the step's last backward: reduce what the wrapper does not (sharded experts); nothing here."""

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Clip the gradient norm over every rank's parameters to ``max_norm`` (``inf``: measure only).

        Returns:
            The total norm before clipping (a 0-d tensor on the device).
        """
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    # -- collectives -------------------------------------------------------------------------

    def all_reduce(self, tensor: torch.Tensor, op: ReduceOp = "sum") -> torch.Tensor:
        """``tensor`` reduced over the data-parallel ranks (a new tensor); the input itself here."""
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` of every data-parallel rank, in rank order; ``[tensor]`` here."""
        return [tensor]

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (a picklable object) on every rank; ``value`` here."""
        return value

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` in rank order; ``[value]`` here."""
        return [value]

    def barrier(self) -> None:
        """Wait for every rank; nothing to wait for here."""

    def on_main(self, fn: Callable[[], T], share: bool = False) -> T | None:
        """Run ``fn`` on rank 0 while the other ranks wait (run folder, tokenizer, corpus cache).

        Args:
            fn: the work only rank 0 does.
            share: also hand rank 0's result (picklable) to the other ranks; else they get None.

        Raises:
            AvaPeerError: on the other ranks, when ``fn`` failed on rank 0 (which raises its own error).
        """
        return fn()

    # -- data --------------------------------------------------------------------------------

    def shard(self, global_indices: list[int]) -> list[int]:
        """This rank's rows of a global batch (the sample indices every rank draws alike).

        Rank r of R reads rows ``r, r + R, …``, so the global batch, and with it the data order
        and the optimization, do not depend on the number of ranks. One process reads them all.
        """
        if self.dp_size == 1:
            return global_indices
        return global_indices[self.rank::self.dp_size]

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def sharded_checkpoints(self) -> bool:
        """Whether checkpoints are written by every rank with ``torch.distributed.checkpoint``
        (``sharded/``) rather than as one ``model.safetensors`` by this process."""
        return False

    def state_dict_options(self) -> StateDictOptions:
        """How checkpoints take model and optimizer state: full (unsharded) tensors here;
        sharded strategies return options for ``torch.distributed.checkpoint``."""
        return StateDictOptions(full_state_dict=True)

    def sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``{"model", "optimizer"}`` as ``torch.distributed.checkpoint`` saves and loads them
        (``sharded/`` checkpoints; here: to read one that a distributed run wrote, in one process)."""
        options = StateDictOptions(full_state_dict=False)
        return {"model": get_model_state_dict(model, options=options),
                "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}

    def load_sharded_state(self, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                           state: dict[str, Any]) -> None:
        """Apply what :meth:`sharded_state` gave after ``torch.distributed.checkpoint`` filled it in."""
        options = StateDictOptions(full_state_dict=False)
        set_model_state_dict(model, state["model"], options=options)
        if optimizer is not None and "optimizer" in state:
            set_optimizer_state_dict(model, optimizer, state["optimizer"], options=options)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The model's weights and buffers as checkpoints store them (:meth:`state_dict_options`),
        through PyTorch's ``get_model_state_dict`` (which unwraps DDP/FSDP2 modules)."""
        return get_model_state_dict(model, options=self.state_dict_options())

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load weights saved by :meth:`model_state_dict`; a name left out must be a tie of a
        loaded one (checkpoints store tied tensors once).

        Raises:
            AvaCheckpointError: names missing (untied) or unexpected, a few of each named.
        """
        missing, unexpected = model.load_state_dict(state, strict=False)
        full = model.state_dict()
        loaded = {full[k].data_ptr() for k in state if k in full}
        untied = [k for k in missing if full[k].data_ptr() not in loaded]
        if untied or unexpected:
            raise AvaCheckpointError(f"the weights do not match the model: missing {untied[:5]}, unexpected "
                                     f"{list(unexpected)[:5]}; resume with the run's own config")

    def close(self) -> None:
        """Release process groups; nothing to release here."""


class SingleProcess(Parallelism):
    """``distributed.strategy: none``: one process on one device; every method is the identity."""
