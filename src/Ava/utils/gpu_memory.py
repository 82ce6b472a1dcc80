"""CUDA memory numbers (allocated, reserved, peaks) in MiB; empty on machines without CUDA."""

from __future__ import annotations

import torch

_MIB = 1024 * 1024


def cuda_memory(device: torch.device) -> dict[str, float]:
    """Allocated/reserved/peak memory of ``device`` in MiB, or {} when it is not CUDA."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return {}
    return {
        "cuda_allocated_mb": torch.cuda.memory_allocated(device) / _MIB,
        "cuda_reserved_mb": torch.cuda.memory_reserved(device) / _MIB,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / _MIB,
        "cuda_total_mb": torch.cuda.get_device_properties(device).total_memory / _MIB,
    }
