"""What the benchmark scripts share: the CPU setup flags and the interleaved timing loop.

Every performance claim in docs/performance.md is a same-run ratio, so variants are timed round
by round (one run of each per round) and the shared machine's drift hits them alike.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from Ava.utils.allocator import tune_cpu_allocator


def add_cpu_args(parser: argparse.ArgumentParser, allocator_note: str = "") -> None:
    """``--threads`` and ``--allocator``, applied by :func:`apply_cpu_args`."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                        help="glibc malloc thresholds as Ava's trainer sets them (performance.cpu_allocator)"
                             + allocator_note)


def apply_cpu_args(args: argparse.Namespace) -> None:
    """Tune the allocator (process-wide) and set the thread count as the flags ask."""
    if args.allocator == "tuned":
        tune_cpu_allocator()
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def time_round_robin(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 0
) -> dict[str, list[float]]:
    """Seconds per call of each variant: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    The order rotates every round, so no variant always runs right after the same other one
    (whose cache and allocator state it would inherit).
    """
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times
