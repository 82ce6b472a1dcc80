"""LoRA adapters on a frozen base (Hu et al. 2021), which may be quantized (QLoRA, Dettmers et al. 2023).

A target weight ``W`` (out, in) becomes ``W + (alpha / r) · B @ A`` with ``A`` (r, in) drawn like
``nn.Linear``'s weight and ``B`` (out, r) zero, so a new adapter leaves the model's output exactly
as it was. What each target kind is:

- ``attention``: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` of every decoder layer
  (:class:`LoRALinear`: ``base(x) + s · B(A(dropout(x)))``, the base an ``nn.Linear`` or a
  :class:`~Ava.layers.quantized.QuantizedLinear`);
- ``mlp``: the dense SwiGLU layers' and the shared experts' projections (:class:`LoRALinear`);
- ``experts``: the routed experts' 3-D weights, one adapter pair per expert (:class:`LoRAExperts`:
  the delta ``s · B_e @ A_e`` is added to each expert's weight for the call, as PEFT's
  ``target_parameters`` does, so it has no input dropout);
- ``router``: the router's (E, D) weight (:class:`LoRADelta`, a ``torch.nn.utils.parametrize``
  parametrization of ``gate.weight``).

Only the decoder stack is adapted (the MTP heads stay frozen: they are training-only and absent
from every export). :func:`merge_lora` folds the adapters into plain modules, the form
``ava generate`` / ``eval`` / ``export`` load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .experts import Experts, compute_dtype, routed_experts
from .quantized import QuantizedExperts, QuantizedLinear, QuantizedParameter, dequantize_modules, quantize_modules
from .routing import Router

__all__ = [
    "LORA_FILE", "LORA_TARGETS", "LoRADelta", "LoRAExperts", "LoRALinear", "adapter_state_dict",
    "adapt_base", "apply_lora", "lora_modules", "merge_lora", "read_lora",
]

LORA_FILE = "lora.json"  # in a fine-tune's checkpoint folder: the base, its quantization and the adapters' shape
LORA_TARGETS = ("attention", "mlp", "experts", "router")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def _init_a(a: torch.Tensor) -> None:
    """``A`` as ``nn.Linear`` draws its weight (PEFT's default), one draw per (expert) matrix."""
    for matrix in a.reshape(-1, *a.shape[-2:]):
        nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))


class LoRALinear(nn.Module):
    """``base(x) + (alpha / r) · B(A(dropout(x)))`` over a frozen linear.

    Args:
        base: an ``nn.Linear`` (no bias) or a :class:`~Ava.layers.quantized.QuantizedLinear`.
        rank, alpha, dropout: r, alpha and the dropout on the adapter's input.
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / rank
        device = _device_of(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        _init_a(self.lora_A)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (out, in), without the adapter: for shape and size readers."""
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def delta(self) -> torch.Tensor:
        """The adapter's weight delta ``s · B @ A`` (out, in), fp32."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding ``W + delta`` (the base dequantized when quantized)."""
        weight = self.base.weight.detach().float() + self.delta().detach()
        linear = nn.Linear(self.in_features, self.out_features, bias=False, device=weight.device)
        dtype = self.base.weight.dtype if isinstance(self.base, nn.Linear) else torch.float32
        linear.weight = nn.Parameter(weight.to(dtype))
        return linear

    def extra_repr(self) -> str:
        return f"rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


class LoRAExperts(nn.Module):
    """Routed experts with one LoRA pair per expert on ``gate_up_proj`` (E, 2I, D) and
    ``down_proj`` (E, D, I): each call runs the usual expert kernels on ``W_e + s · B_e @ A_e``.

    The adapter keys are ``gate_up_lora_A`` (E, r, D), ``gate_up_lora_B`` (E, 2I, r),
    ``down_lora_A`` (E, r, I), ``down_lora_B`` (E, D, r).

    Args:
        base: :class:`~Ava.layers.experts.Experts` or :class:`~Ava.layers.quantized.QuantizedExperts`
            (frozen), every expert local.
        rank, alpha: r and alpha.
    """

    def __init__(self, base: Experts, rank: int, alpha: float) -> None:
        super().__init__()
        if base.ep_size > 1:
            raise ValueError("LoRA on experts split over ranks (expert parallelism) is not supported")
        self.base = base
        self.num_experts = self.num_local_experts = base.num_experts
        self.ep_rank, self.ep_size = 0, 1
        self.intermediate_size = base.intermediate_size
        E, F2, D = base.gate_up_proj.shape
        inter = base.down_proj.shape[-1]
        self.scaling = alpha / rank
        device = _device_of(base)
        self.gate_up_lora_A = nn.Parameter(torch.empty(E, rank, D, device=device))
        self.gate_up_lora_B = nn.Parameter(torch.zeros(E, F2, rank, device=device))
        self.down_lora_A = nn.Parameter(torch.empty(E, rank, inter, device=device))
        self.down_lora_B = nn.Parameter(torch.zeros(E, D, rank, device=device))
        _init_a(self.gate_up_lora_A)
        _init_a(self.down_lora_A)

    @property
    def dispatcher(self) -> Any:  # noqa: D102 - the base's (local) token dispatcher
        return self.base.dispatcher

    @property
    def gate_up_proj(self) -> Any:  # noqa: D102 - the frozen base weight (E, 2I, D), for shape and size readers
        return self.base.gate_up_proj

    @property
    def down_proj(self) -> Any:  # noqa: D102 - the frozen base weight (E, D, I)
        return self.base.down_proj

    @property
    def backend(self) -> str:  # noqa: D102
        return self.base.backend

    @backend.setter
    def backend(self, value: str) -> None:
        self.base.backend = value

    def delta(self, which: str) -> torch.Tensor:
        """``s · B_e @ A_e`` for every expert of ``gate_up`` or ``down``, (E, out, in), fp32."""
        a, b = getattr(self, f"{which}_lora_A"), getattr(self, f"{which}_lora_B")
        return torch.bmm(b.float(), a.float()) * self.scaling

    def _base_weight(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        weight = getattr(self.base, name)
        return weight.dequantize(dtype) if isinstance(weight, QuantizedParameter) else weight.to(dtype)

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapted ``gate_up_proj`` and ``down_proj`` in ``dtype`` (differentiable in the adapters)."""
        return (self._base_weight("gate_up_proj", dtype) + self.delta("gate_up").to(dtype),
                self._base_weight("down_proj", dtype) + self.delta("down").to(dtype))

    @torch.compiler.disable
    def forward(self, x_TD: torch.Tensor, routing: Any) -> torch.Tensor:
        """(T, D) -> (T, D): the routed experts on the adapted weights."""
        dtype = compute_dtype(x_TD)
        gate_up, down = self.weights(dtype)
        choice = self.base.kernels(x_TD.device.type, dtype)
        return routed_experts(x_TD, routing, gate_up, down, choice.select(routing), self.base.dispatcher)

    def merged(self) -> Experts:
        """Plain :class:`~Ava.layers.experts.Experts` holding the adapted weights (fp32 when the base is quantized)."""
        base = self.base
        dtype = torch.float32 if isinstance(base, QuantizedExperts) else base.gate_up_proj.dtype
        E, F2, D = base.gate_up_proj.shape
        experts = Experts(E, D, F2 // 2, backend=base.backend, dispatcher=base.dispatcher)
        gate_up, down = (w.detach() for w in self.weights(torch.float32))
        experts.gate_up_proj = nn.Parameter(gate_up.to(dtype))
        experts.down_proj = nn.Parameter(down.to(dtype))
        return experts

    def extra_repr(self) -> str:
        return f"experts={self.num_experts}, rank={self.gate_up_lora_A.shape[1]}, scaling={self.scaling:g}"


class LoRADelta(nn.Module):
    """A ``parametrize`` parametrization ``W -> W + (alpha / r) · B @ A`` (the router's weight).

    Args:
        out_features, in_features: the weight's shape.
        rank, alpha: r and alpha.
    """

    def __init__(self, out_features: int, in_features: int, rank: int, alpha: float,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=device))
        _init_a(self.lora_A)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return weight + (self.lora_B @ self.lora_A).to(weight.dtype) * self.scaling


def _device_of(module: nn.Module) -> torch.device:
    tensor = next(iter(module.state_dict().values()), None)
    return tensor.device if tensor is not None else torch.device("cpu")


def _target_kind(name: str, module: nn.Module) -> str | None:
    """Which of :data:`LORA_TARGETS` the module ``name`` is (None: not adaptable)."""
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "layers":  # the decoder stack only (not the MTP heads, head, embedding)
        return None
    linear = isinstance(module, (nn.Linear, QuantizedLinear))
    if linear and parts[-2] == "self_attn" and parts[-1] in _ATTENTION:
        return "attention"
    if isinstance(module, Experts):
        return "experts"
    if isinstance(module, Router):
        return "router"
    if linear and "mlp" in parts:
        return "mlp"
    return None


def adapt_base(model: nn.Module, base_quant: str, base_group_size: int | None, rank: int, alpha: float,
               dropout: float, targets: list[str] | tuple[str, ...], seed: int = 0,
               copy_weights: bool = True) -> list[str]:
    """A fine-tune's model from its base, in place: the base quantized as ``finetune.base_quant``
    asks (QLoRA), then LoRA adapters on ``targets`` (:func:`apply_lora`). The one recipe that
    training, the memory estimate and loading a fine-tune's checkpoint share.

    Args:
        model: the base (:class:`~Ava.models.EnhancedMoEModel`), full precision.
        base_quant: ``none``, ``int8`` or ``int4``.
        base_group_size: the int4 group size (ignored otherwise).
        rank, alpha, dropout, targets, seed: as :func:`apply_lora`.
        copy_weights: quantize the base's weights (False: empty quantized modules, as on the
            meta device).

    Returns:
        The adapted modules' names.

    Raises:
        ValueError: naming the key: ``finetune.base_group_size`` (does not divide a width) or
            ``finetune.lora.targets`` (unknown, or none in the model).
    """
    if base_quant != "none":
        try:
            quantize_modules(model, base_quant, base_group_size if base_quant == "int4" else None,
                             copy_weights=copy_weights)
        except ValueError as err:
            raise ValueError(f"finetune.base_group_size: {err}") from None
    try:
        return apply_lora(model, rank, alpha, dropout, targets, seed=seed)
    except ValueError as err:
        raise ValueError(f"finetune.lora.targets: {err}") from None


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str] | tuple[str, ...],
               seed: int = 0) -> list[str]:
    """Put LoRA adapters on ``targets`` and freeze everything else, in place.

    Args:
        model: an :class:`~Ava.models.EnhancedMoEModel` (its linears and experts may be quantized).
        rank, alpha, dropout: the adapters' r, alpha and input dropout (linears only).
        targets: a subset of :data:`LORA_TARGETS`.
        seed: the draw of the ``A`` matrices.

    Returns:
        The adapted modules' names.

    Raises:
        ValueError: an unknown target, or none of the targets found in the model.
    """
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; use some of {list(LORA_TARGETS)}")
    for param in model.parameters():
        param.requires_grad_(False)
    chosen = [(name, module) for name, module in model.named_modules()
              if _target_kind(name, module) in targets]
    if not chosen:
        raise ValueError(f"the model has none of the LoRA targets {list(targets)}")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for name, module in chosen:
            kind = _target_kind(name, module)
            if kind == "router":
                weight = module.weight
                parametrize.register_parametrization(
                    module, "weight", LoRADelta(weight.shape[0], weight.shape[1], rank, alpha, weight.device))
                module.parametrizations.weight.original.requires_grad_(False)
                continue
            new = LoRAExperts(module, rank, alpha) if kind == "experts" else LoRALinear(module, rank, alpha, dropout)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, new)
    finally:
        torch.random.set_rng_state(generator_state)
    return [name for name, _ in chosen]


def lora_modules(model: nn.Module) -> list[str]:
    """Names of the adapted modules (LoRA linears and experts, parametrized routers)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, (LoRALinear, LoRAExperts))
            or (isinstance(module, Router) and parametrize.is_parametrized(module, "weight"))]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (what a fine-tune's checkpoint stores as its weights)."""
    return {name: param for name, param in model.named_parameters() if "lora_" in name}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight and dequantize a quantized base, in place.

    Afterwards the model is a plain full-precision model (its ``state_dict`` has the usual keys);
    its output equals the adapted model's up to rounding.

    Returns:
        ``model``.
    """
    for name in lora_modules(model):
        module = model.get_submodule(name)
        if isinstance(module, Router):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            continue
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.merged())
    dequantize_modules(model)
    return model


def read_lora(folder: str | Path) -> dict | None:
    """The ``lora.json`` of a fine-tune's checkpoint folder, or None when it has none."""
    path = Path(folder) / LORA_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))
