"""What the benchmark scripts share: the CPU setup flags and the interleaved timing loop.

Every performance claim in docs/performance.md is a same-run ratio, so variants are timed round
by round (one run of each per round) and the shared machine's drift hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from Ava.config import ModelConfig
from Ava.utils.allocator import tune_cpu_allocator


def add_cpu_args(parser: argparse.ArgumentParser, allocator_note: str = "") -> None:
    """``--threads`` and ``--allocator``, applied by :func:`apply_cpu_args`."""
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned",
                        help="glibc malloc thresholds as Ava's trainer sets them (performance.cpu_allocator)"
                             + allocator_note)


def apply_cpu_args(args: argparse.Namespace) -> None:
    """Tune the allocator (process-wide), set the thread count as the flags ask, and print the
    machine's CPU features that decide low-precision speed (tables from different CPUs differ)."""
    if args.allocator == "tuned":
        tune_cpu_allocator()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_description()}, {torch.get_num_threads()} threads, torch {torch.__version__}")


def cpu_description() -> str:
    """The CPU's vector capability and whether it has native bf16/fp16 matmuls (oneDNN), e.g.
    ``AVX512, native bf16: yes, native fp16: no``."""
    native = {name: getattr(torch.ops.mkldnn, f"_is_mkldnn_{name}_supported")() for name in ("bf16", "fp16")}
    return (f"{torch.backends.cpu.get_cpu_capability()}, "
            + ", ".join(f"native {name}: {'yes' if ok else 'no'}" for name, ok in native.items()))


def add_model_args(parser: argparse.ArgumentParser, backend: bool = False) -> None:
    """The model shape flags (defaults: the demo-sized MoE, batch 8 × 256); see :func:`model_config`."""
    for flag, default in (("--hidden", 256), ("--layers", 4), ("--heads", 4), ("--kv-heads", 2), ("--experts", 8),
                          ("--top-k", 2), ("--moe-intermediate", 512), ("--vocab", 8192), ("--batch", 8),
                          ("--seq-len", 256)):
        parser.add_argument(flag, type=int, default=default)
    if backend:
        parser.add_argument("--backend", default="auto", help="model.moe.backend")


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The :class:`ModelConfig` of :func:`add_model_args`' flags."""
    moe = {"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate}
    if getattr(args, "backend", None) is not None:
        moe["backend"] = args.backend
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, num_experts=args.experts, max_seq_len=args.seq_len, moe=moe,
    )


def training_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
                  autocast: bool) -> Callable[[], torch.Tensor]:
    """One full training step (the same for Ava and HF models, which both shift ``labels`` inside):
    forward with labels under bf16 autocast if asked, backward, ``clip_grad_norm_(1.0)``, optimizer
    step, ``zero_grad``; returns the detached loss."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


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


def add_fwd_bwd_args(parser: argparse.ArgumentParser, repeats: int, calls: int, warmup: int) -> None:
    """``--repeats``, ``--calls`` and ``--warmup`` of :func:`fwd_bwd_ms`."""
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--calls", type=int, default=calls)
    parser.add_argument("--warmup", type=int, default=warmup)


def fwd_bwd_ms(variants: dict[str, Callable[[], torch.Tensor]], grad: torch.Tensor, leaves: list[torch.Tensor],
               args: argparse.Namespace) -> dict[str, float]:
    """Milliseconds per forward + backward call of each variant: ``args.calls`` calls per round,
    each the variant's output backpropagated with ``grad`` and the ``leaves``' gradients cleared,
    interleaved by :func:`time_round_robin`; the median of ``args.repeats`` rounds."""
    def rounds(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.calls):
                fn().backward(grad)
                for leaf in leaves:
                    leaf.grad = None
        return run

    times = time_round_robin({name: rounds(fn) for name, fn in variants.items()}, args.repeats, args.warmup)
    return {name: statistics.median(ts) / args.calls * 1e3 for name, ts in times.items()}
