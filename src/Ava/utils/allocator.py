"""CPU allocator tuning: keep large tensors in the glibc heap instead of fresh mmap pages.

glibc serves allocations above ``M_MMAP_THRESHOLD`` (at most 32 MiB by its dynamic rule) with a
fresh ``mmap`` and returns them with ``munmap`` on free. A training step allocates and frees the
same large activations every step (a (32768, 256) fp32 buffer is exactly 32 MiB), so each step
page-faults and zero-fills them again: on the 2-core CPU box this cost 16-19 % of a training step
and up to 40 % of a fine-grained MoE layer's forward+backward (``docs/performance.md``).
Raising the mmap and trim thresholds keeps those buffers in the heap, reused from step to step;
the price is that the process does not hand freed memory back to the OS (RSS stays at its peak).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: every activation of a model that fits a CPU box stays in the heap


def tune_cpu_allocator() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (Linux with glibc only).

    Returns:
        True when both settings were applied; False elsewhere (macOS, musl, Windows), where
        nothing changes.
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, _THRESHOLD) == 1 and mallopt(_M_TRIM_THRESHOLD, _THRESHOLD) == 1
    if ok:
        logger.info("CPU allocator: large tensors stay in the malloc heap (performance.cpu_allocator: tuned)")
    return ok
