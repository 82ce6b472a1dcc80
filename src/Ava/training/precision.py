"""``precision.dtype``: the forward's autocast dtype and, for fp16, dynamic loss scaling.

* ``fp32``: no autocast.
* ``bf16``: ``torch.autocast(dtype=bfloat16)``; fp32 master weights; no scaling (bf16 has fp32's
  exponent range).
* ``fp16``: ``torch.autocast(dtype=float16)`` with dynamic loss scaling (``torch.amp.GradScaler``):
  the loss is multiplied by the scale before backward, the gradients are unscaled before
  clipping (so ``grad_clip`` and the logged ``grad_norm`` mean what they mean in fp32), a step
  whose gradients overflow is skipped and the scale halved, and after
  ``precision.loss_scale_growth_interval`` good steps in a row the scale doubles. The scaler's
  state is checkpointed (``state.pt``, key ``loss_scaler``), so a resumed run continues with the
  same scale.

Routers and losses compute in fp32 under every setting (they leave autocast themselves).
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..config.training_sections import PrecisionConfig

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class MixedPrecision:
    """The autocast context and (fp16) the loss scaler of one training run.

    Args:
        config: the ``precision`` section.
        device: the training device (the scaler lives there).
    """

    def __init__(self, config: PrecisionConfig, device: torch.device) -> None:
        self.device = device
        self.dtype = AUTOCAST_DTYPES[config.dtype]
        self.scaling = config.dtype == "fp16"
        self.scaler = torch.amp.GradScaler(
            device.type, init_scale=config.loss_scale_init, growth_interval=config.loss_scale_growth_interval,
            enabled=self.scaling,
        )

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's ``torch.autocast`` (a no-op context in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale (fp16), for ``backward``; unchanged otherwise."""
        return self.scaler.scale(loss) if self.scaling else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the loss scale in place (before clipping); records overflow."""
        if self.scaling:
            self.scaler.unscale_(optimizer)

    def overflowed(self, loss: float, grad_norm: float) -> bool:
        """A finite loss with non-finite gradients: an fp16 overflow, which the scaler handles (skip
        the step, halve the scale) rather than the gradient health check (a non-finite loss is
        the health check's)."""
        return self.scaling and math.isfinite(loss) and not math.isfinite(grad_norm)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()`` (through the scaler in fp16, which skips a step that overflowed)."""
        if self.scaling:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        """After every step that unscaled: halve the scale after an overflow, grow it after
        ``loss_scale_growth_interval`` clean steps."""
        if self.scaling:
            self.scaler.update()

    @property
    def loss_scale(self) -> float | None:
        """The current loss scale (None when not scaling)."""
        return float(self.scaler.get_scale()) if self.scaling else None

    def state_dict(self) -> dict:
        """The scaler's state (scale, growth tracker, factors)."""
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""
        if state:
            self.scaler.load_state_dict(state)
