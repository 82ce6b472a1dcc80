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

``precision.param_dtype: bf16`` (with ``dtype: bf16``) stores the model's weights in bf16 and
keeps fp32 master copies in the optimizer (:class:`MasterWeights`): the forward and backward
read bf16 weights directly (no per-step weight casts, half the weight memory), the gradients
(bf16, accumulated over the micro-batches in bf16) are copied into fp32 before clipping, and the
optimizer updates the fp32 masters, which are then rounded into the model. The masters are
checkpointed (``state.pt``, key ``master_weights``), so resume is exact.
"""

from __future__ import annotations

import contextlib
import math

import torch

from ..config.training_sections import PrecisionConfig

AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


PARAM_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}


def cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Store every floating parameter of ``model`` in ``dtype`` (buffers such as the aux-free
    expert bias and RoPE tables stay as they are)."""
    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)


class MasterWeights:
    """fp32 master copies of an optimizer's (low-precision) parameters.

    The optimizer's parameter groups are rewired to the masters, so its state is fp32 too.

    Args:
        optimizer: built over the model's parameters, before its first step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]] = []
        masters: dict[int, torch.nn.Parameter] = {}
        for group in optimizer.param_groups:
            rewired = []
            for param in group["params"]:
                master = masters.get(id(param))
                if master is None:
                    master = masters[id(param)] = torch.nn.Parameter(param.detach().float().clone())
                    self.pairs.append((param, master))
                rewired.append(master)
            group["params"] = rewired

    @torch.no_grad()
    def grads_to_master(self) -> None:
        """The model's gradients, in fp32, on the masters (None where the model has none)."""
        for param, master in self.pairs:
            master.grad = None if param.grad is None else param.grad.float()

    @torch.no_grad()
    def master_to_model(self) -> None:
        """Round the updated masters into the model's weights."""
        for param, master in self.pairs:
            param.copy_(master)

    def zero_model_grads(self) -> None:
        """Drop the model's (low-precision) gradients."""
        for param, _ in self.pairs:
            param.grad = None

    def grad_params(self) -> list[torch.nn.Parameter]:
        """The masters that have a gradient (what clipping scales)."""
        return [master for _, master in self.pairs if master.grad is not None]

    def state_dict(self) -> dict:
        """The fp32 masters, in the optimizer's parameter order."""
        return {"masters": [master.detach() for _, master in self.pairs]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (and the model's weights from it)."""
        masters = state["masters"]
        if len(masters) != len(self.pairs):
            raise ValueError(f"{len(masters)} saved master weights for {len(self.pairs)} parameters")
        for (param, master), saved in zip(self.pairs, masters):
            master.copy_(saved)
            param.copy_(saved)


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
        self.param_dtype = PARAM_DTYPES[config.param_dtype]
        self.master: MasterWeights | None = None  # precision.param_dtype bf16: set by attach()

    def attach(self, optimizer: torch.optim.Optimizer) -> MasterWeights | None:
        """With low-precision weights: fp32 master copies for ``optimizer`` (returned, to be checkpointed)."""
        if self.param_dtype is not None:
            self.master = MasterWeights(optimizer)
        return self.master

    def grad_params(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """The parameters whose gradients clipping scales: the fp32 masters, or the model's own."""
        if self.master is not None:
            return self.master.grad_params()
        return [p for p in model.parameters() if p.grad is not None]

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop every gradient (the masters' and the model's)."""
        optimizer.zero_grad(set_to_none=True)
        if self.master is not None:
            self.master.zero_model_grads()

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's ``torch.autocast`` (a no-op context in fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale (fp16), for ``backward``; unchanged otherwise."""
        return self.scaler.scale(loss) if self.scaling else loss

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: the fp32 copies of the gradients (low-precision weights), or the
        gradients divided by the loss scale in place (fp16; records overflow)."""
        if self.master is not None:
            self.master.grads_to_master()
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
        if self.master is not None:
            self.master.master_to_model()

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
