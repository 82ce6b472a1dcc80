"""Quantization-aware training (``precision.qat: {bits, group_size, start_step}``).

From optimizer step ``start_step`` on, the forward reads every weight that ``ava quantize``
quantizes (attention, dense-MLP and output linears, the token embedding, the routed experts' 3-D
weights: :func:`~Ava.layers.quantized.quantization_targets`) fake-quantized with the scheme
``ava quantize`` applies (:func:`~Ava.layers.quantized.fake_quantize`: INT8 symmetric per output
row, INT4 asymmetric in groups of ``group_size`` along the input dimension), and the gradient
passes straight through the rounding (straight-through estimator) to the full-precision master
weights, which learn to sit where rounding costs little. Routers and norms stay in full precision,
as ``ava quantize`` leaves them.

The hook is the module's class: a target ``nn.Linear`` becomes a :class:`FakeQuantLinear`, an
``nn.Embedding`` a :class:`FakeQuantEmbedding`, an :class:`~Ava.layers.experts.Experts` a
:class:`FakeQuantExperts` (subclasses that override ``forward`` only). Parameters, their names and
``state_dict`` are unchanged, so checkpoints hold the plain (unquantized) weights that resume,
``ava quantize`` and export read; a model without ``precision.qat`` is not touched at all.

The step reaches the modules through :func:`set_qat_step`, which the trainer calls before each
optimizer step. Ava's own fake quantization is used rather than torchao's QAT: torchao's covers
``nn.Linear`` only, not the 3-D expert weights, and matching ``ava quantize``'s scheme exactly is
what makes the training useful.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AvaConfigError
from ..layers.expert_kernels import compute_dtype
from ..layers.experts import Experts, routed_experts
from ..layers.quantized import check_group_size, fake_quantize, quantization_targets
from ..layers.routing import RouterOutput
from ..layers.token_dispatcher import LocalDispatcher

__all__ = [
    "QAT_FULL_PRECISION",
    "FakeQuantEmbedding",
    "FakeQuantExperts",
    "FakeQuantLinear",
    "apply_qat",
    "qat_modules",
    "set_qat_step",
    "straight_through",
]

logger = logging.getLogger(__name__)

QAT_FULL_PRECISION = "routers (mlp.gate), norms"
"""What QAT leaves in full precision (what ``ava quantize`` leaves)."""


class _StraightThrough(torch.autograd.Function):
    """``fn(x)`` in the forward, the identity in the backward (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fn):  # noqa: D102
        return fn(x)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        return grad, None


def straight_through(x: torch.Tensor, fn) -> torch.Tensor:
    """``fn(x)`` whose gradient w.r.t. ``x`` is passed through unchanged (for rounding functions)."""
    return _StraightThrough.apply(x, fn)


class _QATState:
    """Mixin state of a fake-quantized module: the scheme and whether it is on at this step."""

    qat_bits: int = 8
    qat_group_size: int | None = None
    qat_start_step: int = 0
    qat_active: bool = False

    def qat_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` fake-quantized (straight-through gradient) while active; ``w`` itself otherwise."""
        if not self.qat_active:
            return w
        return fake_quantize(w, self.qat_bits, self.qat_group_size)


class FakeQuantLinear(nn.Linear, _QATState):
    """An ``nn.Linear`` whose forward uses its fake-quantized weight (same parameters and names)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.linear(x, self.qat_weight(self.weight), self.bias)


class FakeQuantEmbedding(nn.Embedding, _QATState):
    """An ``nn.Embedding`` that looks rows up in its fake-quantized table (same parameters and names)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return F.embedding(ids, self.qat_weight(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class FakeQuantExperts(Experts, _QATState):
    """:class:`~Ava.layers.experts.Experts` whose kernels read fake-quantized 3-D weights."""

    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:  # noqa: D102
        gate_up, down = self.qat_weight(self.gate_up_proj), self.qat_weight(self.down_proj)
        choice = self.kernels(x_TD.device.type, compute_dtype(x_TD))
        if isinstance(self.dispatcher, LocalDispatcher) and choice.decode is not None \
                and choice.decode.applies(routing):
            return choice.decode.fn(x_TD, routing, gate_up, down)
        return routed_experts(x_TD, routing, gate_up, down, choice.select(routing), self.dispatcher)


_QAT_CLASSES = {nn.Linear: FakeQuantLinear, nn.Embedding: FakeQuantEmbedding, Experts: FakeQuantExperts}


def apply_qat(model: nn.Module, bits: int, group_size: int | None, start_step: int) -> list[str]:
    """Make ``model``'s quantization targets read fake-quantized weights (in place).

    Args:
        model: the model (unwrapped).
        bits: 8 (per output row) or 4 (groups of ``group_size``, default 32).
        group_size: int4 weights per scale along the input dimension.
        start_step: optimizer step from which fake quantization is on (:func:`set_qat_step`).

    Returns:
        The names of the converted modules.

    Raises:
        AvaConfigError: an int4 group size that does not divide a target's input width.
    """
    if bits == 4:
        group_size = group_size or 32
        bad = check_group_size(model, group_size)
        if bad:
            raise AvaConfigError(f"precision.qat.group_size: {group_size} does not divide the input width of "
                                 f"{', '.join(bad[:3])}; use a group size that does (32, 64 or 128)")
    converted = []
    for name in quantization_targets(model):
        mod = model.get_submodule(name)
        cls = _QAT_CLASSES.get(type(mod))
        if cls is None:
            continue
        mod.__class__ = cls
        mod.qat_bits, mod.qat_group_size, mod.qat_start_step = bits, group_size, start_step
        mod.qat_active = start_step == 0
        converted.append(name)
    scheme = f"int4 in groups of {group_size}" if bits == 4 else "int8 per output row"
    logger.info("precision.qat: %s fake-quantized weights (straight-through gradients) in %d modules from step %d; "
                "full precision: %s", scheme, len(converted), start_step, QAT_FULL_PRECISION)
    return converted


def qat_modules(model: nn.Module) -> list[nn.Module]:
    """The fake-quantized modules of ``model`` (empty without ``precision.qat``)."""
    return [mod for mod in model.modules() if isinstance(mod, _QATState)]


def set_qat_step(model: nn.Module, step: int) -> None:
    """Tell the fake-quantized modules the optimizer step about to run (on from their ``start_step``);
    nothing to do for a model without QAT."""
    for mod in model.modules():
        if isinstance(mod, _QATState):
            mod.qat_active = step >= mod.qat_start_step
