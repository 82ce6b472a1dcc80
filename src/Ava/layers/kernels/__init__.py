"""Device-specific expert kernels and the registry that picks them once per model and device.

The reference kernels (``loop``, ``grouped``) live in :mod:`~Ava.layers.expert_kernels`; the fast
paths that only pay off on some devices and dtypes live here (:mod:`.batched`, :mod:`.decode`),
and :mod:`.registry` says which runs where.
"""

from .batched import batched_autograd_kernel, batched_kernel
from .decode import DecodePath, decode_path_for, experts_gathered, experts_slots
from .registry import (
    BACKEND_CHOICES,
    KERNELS,
    KernelChoice,
    describe_auto,
    kernel_for,
    resolve_kernels,
    row_multiple,
)

__all__ = [
    "BACKEND_CHOICES", "KERNELS", "DecodePath", "KernelChoice", "batched_autograd_kernel", "batched_kernel",
    "decode_path_for", "describe_auto", "experts_gathered", "experts_slots", "kernel_for", "resolve_kernels",
    "row_multiple",
]
