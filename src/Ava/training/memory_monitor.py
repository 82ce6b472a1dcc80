"""Process memory (RSS now and peak) and CUDA memory, plus a readable out-of-memory hint."""

from __future__ import annotations

import os
import resource
import sys
from typing import TYPE_CHECKING

import torch

from ..utils.gpu_memory import cuda_memory

if TYPE_CHECKING:
    from ..config import EnhancedTrainingConfig

_MIB = 1024 * 1024


def rss_mb() -> float:
    """Current resident set size of this process in MiB (Linux /proc; peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / _MIB
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set size of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / _MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def memory_snapshot(device: torch.device) -> dict[str, float]:
    """RSS, peak RSS and (on CUDA) device memory, in MiB."""
    return {"rss_mb": rss_mb(), "peak_rss_mb": peak_rss_mb(), **cuda_memory(device)}


def oom_hint(config: "EnhancedTrainingConfig", device: torch.device) -> str:
    """What to lower after an out-of-memory error, with the current values."""
    t, d = config.training, config.data
    hints = [
        f"lower training.batch_size (now {t.batch_size}) and raise training.grad_accum_steps "
        f"(now {t.grad_accum_steps}) to keep the effective batch",
        f"lower data.seq_len (now {d.seq_len})",
    ]
    if config.precision.dtype == "fp32":
        hints.append("set precision.dtype: bf16")
    if device.type == "cuda":
        mem = cuda_memory(device)
        hints.append(f"peak CUDA memory was {mem['cuda_peak_mb']:.0f} of {mem['cuda_total_mb']:.0f} MiB")
    return "; ".join(hints)
