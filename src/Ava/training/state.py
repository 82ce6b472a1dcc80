"""The stateful registry: every part of training that changes over a run, under a fixed key.

A checkpoint is the registry walked once: each part's ``state_dict()`` under its key (the
``model`` part's goes to ``model.safetensors``, the rest to ``state.pt``), and a resume walks the
same registry with ``load_state_dict``. A new stateful part is one :meth:`StateRegistry.register`
call where the trainer builds it, and nothing else (torchtitan's checkpoint ``states``, PyTorch's
``torch.distributed.checkpoint.stateful.Stateful``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import AvaCheckpointError
from ..utils.checkpoint import rng_state, set_rng_state, unique_tensors
from .parallel import Parallelism

logger = logging.getLogger(__name__)

MODEL_KEY = "model"


@runtime_checkable
class Stateful(Protocol):
    """What a registered part implements (the shape of ``torch.distributed.checkpoint``'s)."""

    def state_dict(self) -> dict[str, Any]: ...  # noqa: D102

    def load_state_dict(self, state: dict[str, Any]) -> None: ...  # noqa: D102


class StateRegistry:
    """Named :class:`Stateful` parts, saved and restored in registration order.

    A part registered ``optional`` may be missing from a checkpoint (a feature switched on at
    resume starts fresh); a required one missing is an error naming the key. Entries of a
    checkpoint with no registered part (a feature switched off at resume) are ignored and
    logged.
    """

    def __init__(self) -> None:
        self._parts: dict[str, Stateful] = {}
        self._optional: set[str] = set()

    def register(self, key: str, part: Stateful, optional: bool = False) -> None:
        """Add ``part`` under ``key`` (each key once)."""
        if key in self._parts:
            raise ValueError(f"stateful part {key!r} is registered twice")
        if not isinstance(part, Stateful):
            raise TypeError(f"stateful part {key!r} ({type(part).__name__}) has no state_dict/load_state_dict")
        self._parts[key] = part
        if optional:
            self._optional.add(key)

    def __contains__(self, key: str) -> bool:
        return key in self._parts

    def __getitem__(self, key: str) -> Stateful:
        return self._parts[key]

    def keys(self) -> list[str]:
        """The registered keys, in registration (save and restore) order."""
        return list(self._parts)

    def items(self) -> Iterator[tuple[str, Stateful]]:
        """``(key, part)`` in registration order."""
        return iter(self._parts.items())

    def state_dict(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """``{key: part.state_dict()}`` of every part not in ``exclude``."""
        return {key: part.state_dict() for key, part in self._parts.items() if key not in exclude}

    def load_state_dict(self, state: dict[str, Any], only: tuple[str, ...] | None = None,
                        source: str = "the checkpoint") -> None:
        """Restore every part (or those in ``only``) from ``state``.

        Raises:
            AvaCheckpointError: a required part is missing from ``state``.
        """
        keys = [k for k in self._parts if only is None or k in only]
        missing = [k for k in keys if k not in state and k not in self._optional]
        if missing:
            raise AvaCheckpointError(f"{source} has no state for {', '.join(missing)}; it was written by "
                                     "another version of Ava or is damaged: resume from another checkpoint")
        for key in keys:
            if state.get(key) is not None:
                self._parts[key].load_state_dict(state[key])
        if only is None:
            unused = sorted(set(state) - set(self._parts) - {"version", "step"})
            if unused:
                logger.info("%s holds state for parts this run does not use (%s); ignored", source, ", ".join(unused))


# --------------------------------------------------------------------------------------------
# small parts owned by the trainer
# --------------------------------------------------------------------------------------------


@dataclass
class TrainProgress:
    """Counters of the whole run, across resumed segments: optimizer steps, tokens, validation
    losses, training wall time (seconds, up to the last save)."""

    step: int = 0
    tokens: int = 0
    best_val: float | None = None
    last_val: float | None = None
    wall_time_s: float = 0.0

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.step, self.tokens = int(state["step"]), int(state["tokens"])
        self.best_val, self.last_val = state.get("best_val"), state.get("last_val")
        self.wall_time_s = float(state.get("wall_time_s", 0.0))  # absent before it was counted


class RNGState:
    """Python, NumPy and torch (CPU, CUDA) generators (:func:`~Ava.utils.checkpoint.rng_state`)."""

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        set_rng_state(state)


class ModelWeights:
    """The model's weights and buffers, tied tensors once (written to ``model.safetensors``),
    taken and loaded through the parallelism seam (full or sharded state dicts)."""

    def __init__(self, model: torch.nn.Module, parallel: Parallelism) -> None:
        self.model = model
        self.parallel = parallel

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return unique_tensors(self.parallel.model_state_dict(self.model))

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.parallel.load_model_state_dict(self.model, state)


class BalancingSchedule:
    """Where the model stands in ``model.moe.coef_schedules`` (the optimizer step they follow)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"step": int(getattr(self.model, "_balancing_step", 0))}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: D102
        self.model.set_balancing_step(state["step"])
