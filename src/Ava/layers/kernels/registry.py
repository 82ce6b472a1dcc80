"""The kernel registry: which expert kernel, buffer layout and decode path run on a device.

Shapes (legend in ``Ava/__init__.py``): E experts, R rows of the expert buffer.

``model.moe.backend`` names a kernel (``loop``, ``grouped``, ``batched``) or ``auto``.
:func:`resolve_kernels` turns it into a :class:`KernelChoice` for one device type and compute
dtype; :class:`~Ava.layers.experts.Experts` resolves once per (backend, device type, compute
dtype) and keeps the result, so nothing here runs per call except what depends on the step's
data (``KernelChoice.select``'s load test and ``DecodePath.applies``).

Device-specific rules live here, beside the reference kernels they adapt:
- CPU bf16 pads expert blocks to multiples of 64 rows (:func:`row_multiple`): oneDNN builds a
  kernel per GEMM shape and routing changes every step, so exact row counts meant new shapes
  (and new kernels) every step.
- ``auto`` is ``grouped``, except on CPU in bf16 with more than 32 experts at balanced load,
  where one ``bmm`` per projection (``batched``) beats one small GEMM per expert; ``batched``
  pads every expert to the busiest one, so under skew it loses, hence the load limit. Without
  ``torch._grouped_mm`` it is ``batched``.
The measurements behind both: ``docs/performance.md``, "Expert kernels and dispatch: the
measurements behind the choices".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

import torch

from ..expert_kernels import ExpertKernel, grouped_kernel, loop_kernel
from ..routing import RouterOutput
from ..token_dispatcher import BufferLayout
from .batched import batched_autograd_kernel, batched_kernel
from .decode import DecodePath, decode_path_for

ONEDNN_ROW_MULTIPLE = 64  # CPU bf16: expert blocks rounded up to this many rows
BATCHED_MAX_SKEW = 2.0  # auto on CPU in bf16: batched while the busiest expert has ≤ 2× the mean load
BATCHED_MIN_EXPERTS = 33  # ... and only with more experts than 32


def row_multiple(device_type: str, compute_dtype: torch.dtype) -> int:
    """Rows each expert block is rounded up to a multiple of (1 = exact rows).

    64 on CPU in bf16, where oneDNN builds a kernel per GEMM shape; fp32 (MKL) and GPUs need none.
    """
    return ONEDNN_ROW_MULTIPLE if device_type == "cpu" and compute_dtype == torch.bfloat16 else 1


def _loop(device_type: str, compute_dtype: torch.dtype) -> ExpertKernel:
    return ExpertKernel("loop", loop_kernel)


def _grouped(device_type: str, compute_dtype: torch.dtype) -> ExpertKernel:
    return ExpertKernel("grouped", grouped_kernel, BufferLayout(multiple=row_multiple(device_type, compute_dtype)))


def _batched(device_type: str, compute_dtype: torch.dtype) -> ExpertKernel:
    # The hand-written backward measured faster below fp32 only; fp32 keeps plain autograd.
    fn = batched_autograd_kernel if compute_dtype == torch.float32 else batched_kernel
    return ExpertKernel("batched", fn, BufferLayout(multiple=row_multiple(device_type, compute_dtype), uniform=True))


KernelFactory = Callable[[str, torch.dtype], ExpertKernel]

KERNELS: MappingProxyType[str, KernelFactory] = MappingProxyType(
    {"loop": _loop, "grouped": _grouped, "batched": _batched}
)
"""The registry: kernel name -> ``factory(device_type, compute_dtype)`` of its :class:`ExpertKernel`."""

BACKEND_CHOICES = (*KERNELS, "auto")


def kernel_for(name: str, device_type: str, compute_dtype: torch.dtype) -> ExpertKernel:
    """The registered kernel ``name`` with the layout it needs on this device and dtype.

    Args:
        name: a key of :data:`KERNELS`.
        device_type: ``cpu``, ``cuda``, ...
        compute_dtype: the dtype the rows arrive in.

    Returns:
        The :class:`ExpertKernel`.
    """
    return KERNELS[name](device_type, compute_dtype)


def is_balanced(tokens_per_expert_E: torch.Tensor, max_skew: float) -> bool:
    """Whether the busiest expert has at most ``max_skew`` × the mean load (two host reads)."""
    return float(tokens_per_expert_E.max()) <= max_skew * float(tokens_per_expert_E.float().mean())


@dataclass(frozen=True)
class KernelChoice:
    """What one :class:`~Ava.layers.experts.Experts` runs on one device type and compute dtype.

    Attributes:
        kernel: the kernel of every training call.
        balanced: for ``auto`` on CPU bf16 with many experts: the kernel of calls whose load is
            within ``max_skew`` (``batched``); None = always ``kernel``.
        max_skew: the busiest expert's load over the mean up to which ``balanced`` runs.
        decode: the inference fast path for few token-slots (:class:`DecodePath`).
    """

    kernel: ExpertKernel
    balanced: ExpertKernel | None = None
    max_skew: float = BATCHED_MAX_SKEW
    decode: DecodePath | None = None

    def select(self, routing: RouterOutput) -> ExpertKernel:
        """The kernel of this call: ``balanced`` while the load allows it, else ``kernel``.

        The choice depends only on the step's routing, so every run and rank makes the same one.
        """
        if self.balanced is not None and is_balanced(routing.tokens_per_expert_E, self.max_skew):
            return self.balanced
        return self.kernel

    def describe(self) -> str:
        """One line for logs, e.g. ``batched while the busiest expert has ≤ 2× the mean load, else grouped``."""
        if self.balanced is None:
            return self.kernel.name
        return (f"{self.balanced.name} while the busiest expert has ≤ {self.max_skew:g}× the mean load, "
                f"else {self.kernel.name}")


def _batched_when_balanced(device_type: str, compute_dtype: torch.dtype, num_experts: int) -> bool:
    """Whether ``auto`` runs ``batched`` at balanced load here (CPU, bf16, many experts)."""
    return device_type == "cpu" and compute_dtype == torch.bfloat16 and num_experts >= BATCHED_MIN_EXPERTS


def resolve_kernels(backend: str, device_type: str, compute_dtype: torch.dtype, num_experts: int) -> KernelChoice:
    """The kernels ``backend`` runs on this device type and compute dtype.

    Args:
        backend: a key of :data:`KERNELS` or ``auto`` (:data:`BACKEND_CHOICES`).
        device_type: ``cpu``, ``cuda``, ...
        compute_dtype: the dtype the experts compute in (autocast's, when on).
        num_experts: E.

    Returns:
        The :class:`KernelChoice`, with the device's decode path.
    """
    if backend not in BACKEND_CHOICES:
        raise ValueError(f"unknown experts backend {backend!r}; use one of {sorted(BACKEND_CHOICES)}")
    decode = decode_path_for(device_type, num_experts)
    if backend != "auto":
        return KernelChoice(kernel_for(backend, device_type, compute_dtype), decode=decode)
    if not hasattr(torch, "_grouped_mm"):
        return KernelChoice(kernel_for("batched", device_type, compute_dtype), decode=decode)
    grouped = kernel_for("grouped", device_type, compute_dtype)
    if _batched_when_balanced(device_type, compute_dtype, num_experts):
        return KernelChoice(grouped, balanced=kernel_for("batched", device_type, compute_dtype), decode=decode)
    return KernelChoice(grouped, decode=decode)


def describe_auto(device_type: str, compute_dtype: torch.dtype, num_experts: int) -> str:
    """What ``auto`` runs for this device type, dtype and expert count (for the trainer's log)."""
    return resolve_kernels("auto", device_type, compute_dtype, num_experts).describe()
