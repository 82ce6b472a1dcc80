"""FP8 training (``precision.fp8: {enabled, recipe, experts, emulate}``) and the precision transforms
the parallelism seam applies to a model before it trains (:func:`apply_precision_transforms`).

Two ways to run the same recipes:

* **FP8 GEMMs** (``emulate: false``; CUDA with compute capability ≥ 8.9 and ``torchao``):
  torchao's ``convert_to_float8_training`` swaps the attention and dense-MLP ``nn.Linear`` s for
  ``Float8Linear`` (dimensions that are not multiples of 16 stay high precision), and with
  ``experts: true`` torchao's FP8 grouped-GEMM training op (``Float8TrainingOpConfig``, rowwise
  scales, bf16 output; needs ``precision.dtype: bf16``) takes the experts' 3-D weights through
  ``torch._grouped_mm``. Anything else refuses in one line.
* **Emulation** (``emulate: true``; any device): each converted GEMM quantizes its operands to FP8
  with the recipe's scales and dequantizes them again, then multiplies in fp32 (what an FP8 GEMM
  with fp32 accumulation computes), so FP8 numerics can be studied on a CPU. It is several times
  slower than the plain GEMM. The log says the run is emulated.

Recipes (as torchao's ``Float8LinearConfig.from_recipe_name``):

* ``tensorwise``: one scale ``448 / amax`` per tensor; inputs and weights in e4m3, the output
  gradient in e5m2.
* ``rowwise``: one scale per row along each GEMM's inner (contraction) dimension, rounded down to
  a power of 2; e4m3 everywhere. The backward GEMMs quantize along their own inner dimension
  (tokens for the weight gradient).

Emulated linears follow this exactly. Emulated experts quantize the weights (per expert and row
along the inner dimension for ``rowwise``, one scale per expert for ``tensorwise``; straight-through
to the fp32 master weights), the input rows (per token) and the gradient of the experts' output;
the SwiGLU activation between the two expert GEMMs and the weight-gradient re-quantization are
not emulated there.

What stays in high precision in every mode: embeddings, routers, norms and ``lm_head``
(:data:`FP8_HIGH_PRECISION`). Converted modules keep their parameters and names
(a class swap), so checkpoints hold the plain fp32 weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config.training_sections import FP8Config, PrecisionConfig
from ..errors import AvaConfigError
from ..layers.expert_kernels import compute_dtype
from ..layers.experts import Experts, routed_experts
from ..layers.routing import RouterOutput
from ..layers.token_dispatcher import LocalDispatcher
from .qat import apply_qat, straight_through

__all__ = [
    "FP8_HIGH_PRECISION",
    "FP8_MAX",
    "FP8EmulatedExperts",
    "FP8EmulatedLinear",
    "FP8Report",
    "apply_fp8",
    "apply_precision_transforms",
    "fp8_quantize_dequantize",
    "fp8_scale",
    "fp8_unsupported_reason",
    "fp8_linears",
]

logger = logging.getLogger(__name__)

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = {E4M3: torch.finfo(E4M3).max, E5M2: torch.finfo(E5M2).max}  # 448, 57344
_EPS = 1e-12  # torchao's floor on amax

FP8_HIGH_PRECISION = ("embed_tokens", "lm_head", "routers (mlp.gate)", "norms")
"""What FP8 training leaves in high precision (torchao's convention: not the first and last layers)."""


def fp8_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules FP8 training converts: every one but ``lm_head`` (routers are
    their own module type, embeddings and norms hold no ``nn.Linear``)."""
    return {name: mod for name, mod in model.named_modules()
            if type(mod) is nn.Linear and name.rsplit(".", 1)[-1] != "lm_head"}


def grad_dtype(recipe: str) -> torch.dtype:
    """The FP8 format of gradients under ``recipe`` (e5m2 tensorwise, e4m3 rowwise)."""
    return E5M2 if recipe == "tensorwise" else E4M3


def fp8_scale(x: torch.Tensor, dtype: torch.dtype, recipe: str, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """The multiplier that maps ``x`` onto ``dtype``'s range: ``max(dtype) / amax`` (fp32).

    Args:
        x: the tensor to quantize.
        dtype: ``torch.float8_e4m3fn`` or ``torch.float8_e5m2``.
        recipe: ``tensorwise`` (``amax`` over all of ``x``, or over ``dim`` when given, e.g. one
            scale per expert) or ``rowwise`` (``amax`` along ``dim``, the GEMM's inner dimension;
            the scale rounded down to a power of 2).
        dim: the dimension(s) reduced (kept as size 1); None with ``tensorwise`` = all.

    Returns:
        The scale, broadcastable against ``x``.
    """
    x = x.float().abs()
    amax = x.amax() if dim is None else x.amax(dim=dim, keepdim=True)
    scale = FP8_MAX[dtype] / amax.clamp(min=_EPS)
    if recipe == "rowwise":
        scale = torch.exp2(torch.floor(torch.log2(scale)))
    return scale


def fp8_quantize_dequantize(x: torch.Tensor, dtype: torch.dtype, recipe: str,
                            dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """``x`` cast to FP8 with the recipe's scale (saturating) and back, in fp32.

    Args: as :func:`fp8_scale`.

    Returns:
        ``(clamp(x · s, ±max)).to(dtype) / s`` in fp32, same shape as ``x``.
    """
    scale = fp8_scale(x, dtype, recipe, dim)
    limit = FP8_MAX[dtype]
    q = (x.float() * scale).clamp(-limit, limit).to(dtype)
    return q.float() / scale


def _rowwise_dim(recipe: str, dim: int) -> int | None:
    return dim if recipe == "rowwise" else None


class _FP8EmulatedMatmul(torch.autograd.Function):
    """``x @ w.T`` with each of the three GEMMs on FP8-quantized operands (recipe scales), fp32 math."""

    @staticmethod
    def forward(ctx, x_NK, w_MK, recipe, out_dtype):  # noqa: D102
        ctx.save_for_backward(x_NK, w_MK)
        ctx.recipe, ctx.out_dtype = recipe, out_dtype
        xq = fp8_quantize_dequantize(x_NK, E4M3, recipe, _rowwise_dim(recipe, -1))
        wq = fp8_quantize_dequantize(w_MK, E4M3, recipe, _rowwise_dim(recipe, -1))
        return (xq @ wq.t()).to(out_dtype)

    @staticmethod
    def backward(ctx, g_NM):  # noqa: D102
        x_NK, w_MK = ctx.saved_tensors
        recipe = ctx.recipe
        gdt = grad_dtype(recipe)
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:  # g @ w: inner dimension M
            g = fp8_quantize_dequantize(g_NM, gdt, recipe, _rowwise_dim(recipe, -1))
            w = fp8_quantize_dequantize(w_MK, E4M3, recipe, _rowwise_dim(recipe, 0))
            grad_x = (g @ w).to(ctx.out_dtype).to(x_NK.dtype)  # the GEMM's output dtype, as torchao
        if ctx.needs_input_grad[1]:  # g.T @ x: inner dimension N (tokens)
            g = fp8_quantize_dequantize(g_NM, gdt, recipe, _rowwise_dim(recipe, 0))
            x = fp8_quantize_dequantize(x_NK, E4M3, recipe, _rowwise_dim(recipe, 0))
            grad_w = (g.t() @ x).to(ctx.out_dtype).to(w_MK.dtype)
        return grad_x, grad_w, None, None


def _autocast_dtype(x: torch.Tensor) -> torch.dtype:
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class FP8EmulatedLinear(nn.Linear):
    """An ``nn.Linear`` running its forward and backward GEMMs on FP8-emulated operands
    (``fp8_recipe``); same parameters and names as the ``nn.Linear`` it was."""

    fp8_recipe: str = "tensorwise"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        out_dtype = _autocast_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            y = _FP8EmulatedMatmul.apply(x.reshape(-1, x.shape[-1]), self.weight, self.fp8_recipe, out_dtype)
            y = y.reshape(*x.shape[:-1], self.out_features)
            if self.bias is not None:
                y = y + self.bias.to(out_dtype)
        return y


class _FP8Activation(torch.autograd.Function):
    """Forward: ``x`` through e4m3 (per row for ``rowwise``); backward: its gradient through the
    recipe's gradient format (likewise per row)."""

    @staticmethod
    def forward(ctx, x, recipe, quantize_forward):  # noqa: D102
        ctx.recipe = recipe
        if not quantize_forward:
            return x.view_as(x)
        return fp8_quantize_dequantize(x, E4M3, recipe, _rowwise_dim(recipe, -1)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        recipe = ctx.recipe
        return fp8_quantize_dequantize(grad, grad_dtype(recipe), recipe, _rowwise_dim(recipe, -1)).to(grad.dtype), \
            None, None


class FP8EmulatedExperts(Experts):
    """:class:`~Ava.layers.experts.Experts` whose kernels read FP8-emulated weights and input rows
    and whose output gradient is FP8-emulated (``fp8_recipe``)."""

    fp8_recipe: str = "tensorwise"

    def fp8_weight(self, w_EOI: torch.Tensor) -> torch.Tensor:
        """``w`` quantized→dequantized per expert (tensorwise) or per expert row along the inner
        dimension (rowwise); straight-through to the master weight."""
        recipe = self.fp8_recipe
        dim = -1 if recipe == "rowwise" else (1, 2)
        return straight_through(w_EOI, lambda t: fp8_quantize_dequantize(t, E4M3, recipe, dim).to(t.dtype))

    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, routing: RouterOutput) -> torch.Tensor:  # noqa: D102
        dtype = compute_dtype(x_TD)
        x_TD = _FP8Activation.apply(x_TD.to(dtype), self.fp8_recipe, True)
        gate_up, down = self.fp8_weight(self.gate_up_proj), self.fp8_weight(self.down_proj)
        choice = self.kernels(x_TD.device.type, dtype)
        if isinstance(self.dispatcher, LocalDispatcher) and choice.decode is not None \
                and choice.decode.applies(routing):
            y_TD = choice.decode.fn(x_TD, routing, gate_up, down)
        else:
            y_TD = routed_experts(x_TD, routing, gate_up, down, choice.select(routing), self.dispatcher)
        return _FP8Activation.apply(y_TD, self.fp8_recipe, False)


@dataclass
class FP8Report:
    """What :func:`apply_fp8` did: the mode, the converted modules and those kept in high precision."""

    emulated: bool
    recipe: str
    linears: list[str] = field(default_factory=list)
    experts: list[str] = field(default_factory=list)
    high_precision: list[str] = field(default_factory=list)

    def describe(self, device: torch.device) -> str:
        """The one log line."""
        how = (f"EMULATED on {device.type} (quantize→dequantize with {self.recipe} scales, GEMMs in fp32: "
               "for FP8 numerics, not speed)" if self.emulated else f"FP8 GEMMs through torchao ({self.recipe})")
        return (f"precision.fp8: {how}; in FP8: {len(self.linears)} linears, {len(self.experts)} expert modules; "
                f"high precision: {', '.join(self.high_precision)}")


def fp8_unsupported_reason(device: torch.device) -> str | None:
    """Why real FP8 GEMMs cannot run on ``device`` (None when they can)."""
    if device.type != "cuda":
        return f"{device.type} has no FP8 GEMMs"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    capability = torch.cuda.get_device_capability(device)
    if capability < (8, 9):
        return f"this GPU (compute capability {capability[0]}.{capability[1]}) has no FP8 GEMMs (needs ≥ 8.9)"
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return "the torchao package is not installed (`pip install torchao==0.18.0`)"
    return None


def _high_precision(model: nn.Module, kept: list[str]) -> list[str]:
    names = [name for name in ("embed_tokens", "lm_head") if hasattr(model, name)]
    routers = sum(1 for name, _ in model.named_modules() if name.endswith("mlp.gate"))
    return names + [f"routers ({routers})", "norms"] + kept


def apply_fp8(model: nn.Module, config: FP8Config, device: torch.device, dtype: str = "bf16") -> FP8Report:
    """Convert ``model``'s GEMMs to FP8 training (in place) as ``config`` says.

    Args:
        model: the model (unwrapped), already on ``device``.
        config: ``precision.fp8``.
        device: the training device.
        dtype: ``precision.dtype`` (torchao's expert path needs bf16).

    Returns:
        What was converted and what stays in high precision.

    Raises:
        AvaConfigError: real FP8 requested where it cannot run (one line, naming ``emulate``).
    """
    linears = fp8_linears(model)
    experts = {name: mod for name, mod in model.named_modules() if type(mod) is Experts} if config.experts else {}
    if config.emulate:
        report = FP8Report(True, config.recipe, list(linears), list(experts), _high_precision(model, []))
        for mod in linears.values():
            mod.__class__ = FP8EmulatedLinear
            mod.fp8_recipe = config.recipe
        for mod in experts.values():
            mod.__class__ = FP8EmulatedExperts
            mod.fp8_recipe = config.recipe
        return report
    reason = fp8_unsupported_reason(device)
    if reason is not None:
        raise AvaConfigError(f"precision.fp8: {reason}; set precision.fp8.emulate: true to study FP8 numerics "
                             "in emulation, or precision.fp8.enabled: false")
    if experts and dtype != "bf16":
        raise AvaConfigError("precision.fp8.experts: torchao's FP8 grouped GEMM returns bf16; set precision.dtype: "
                             "bf16, or precision.fp8.experts: false")
    return _apply_torchao(model, config, linears, experts)


def _apply_torchao(model: nn.Module, config: FP8Config, linears: dict[str, nn.Linear],
                   experts: dict[str, Experts]) -> FP8Report:  # pragma: no cover - needs an FP8 GPU
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    aligned = {name for name, mod in linears.items() if mod.in_features % 16 == 0 and mod.out_features % 16 == 0}
    unaligned = sorted(set(linears) - aligned)
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name(config.recipe),
                               module_filter_fn=lambda mod, fqn: fqn in aligned)
    if experts:
        from torchao.prototype.moe_training.config import Float8TrainingOpConfig
        from torchao.quantization import quantize_

        # Wraps the 3-D weights in a tensor subclass that runs torch._grouped_mm as an FP8 rowwise
        # grouped GEMM (the grouped kernel); other expert kernels see the plain weights.
        quantize_(model, Float8TrainingOpConfig(), filter_fn=lambda mod, fqn: fqn in experts)
        for mod in experts.values():
            mod.backend = "grouped"
    kept = [f"{name} (width not a multiple of 16)" for name in unaligned]
    return FP8Report(False, config.recipe, sorted(aligned), list(experts), _high_precision(model, kept))


def apply_precision_transforms(model: nn.Module, config: PrecisionConfig, device: torch.device) -> None:
    """FP8 training or QAT on ``model`` (in place) as ``precision`` says; nothing when both are off.

    Called by :meth:`~Ava.training.parallel.Parallelism.prepare_model` after the model is on its
    device and before activation checkpointing, compile and wrapping. Applying it twice is a no-op.

    Raises:
        AvaConfigError: FP8 GEMMs requested where they cannot run.
    """
    if getattr(model, "_ava_precision_transformed", False):
        return
    if config.fp8.enabled:
        report = apply_fp8(model, config.fp8, device, config.dtype)
        logger.info(report.describe(device))
    elif config.qat is not None:
        apply_qat(model, config.qat.bits, config.qat.group_size, config.qat.start_step)
    else:
        return
    model._ava_precision_transformed = True
