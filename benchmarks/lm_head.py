"""Output head + LM loss, forward + backward: logits path against the fused head.

The logits path is what ``model.loss.fused_head: off`` runs: ``lm_head(h)`` makes the (N, V)
logits, ``causal_lm_objective`` casts them to fp32 and takes the cross-entropy. The fused path
(``fused_head: auto``, the default) runs ``fused_causal_lm_objective`` on the hidden states:
row chunks, gradients made in the same pass, no (N, V) tensor. Both run interleaved in the same
process (warmup, then ``--repeats`` rounds, median), fp32 and bf16 autocast, so ``speed-up`` is
a same-run ratio. GFLOP/s counts the three head matmuls (``6 · N · D · V``).

``--memory`` instead runs one step of each variant in a fresh subprocess and reports the peak
resident memory it added over the inputs (``ru_maxrss`` after − before the step).

    python benchmarks/lm_head.py                          # N 2048, D 256, V 8192 (the train_throughput shape)
    python benchmarks/lm_head.py --hidden 512 --vocab 32768
    python benchmarks/lm_head.py --memory --vocab 65536
    python benchmarks/lm_head.py --dtypes bf16 --chunk-rows 128 256 512 1024   # the chunk-size rule
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from typing import Callable

import torch
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin

from Ava.config import LossConfig
from Ava.losses import causal_lm_objective, fused_causal_lm_objective
from Ava.losses import fused_head

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _variants(h_BTD: torch.Tensor, head: torch.nn.Linear, labels_BT: torch.Tensor,
              autocast: torch.dtype | None, chunk_rows: list[int] = ()) -> dict[str, Callable[[], None]]:
    cfg = LossConfig()

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            head.zero_grad(set_to_none=True)
            h_BTD.grad = None
            with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
                loss = loss_fn()
            loss.backward()
        return run

    def fused_with_rows(rows: int) -> Callable[[], torch.Tensor]:
        def loss() -> torch.Tensor:
            saved = fused_head.chunk_rows
            fused_head.chunk_rows = lambda vocab, device: rows
            try:
                return fused_causal_lm_objective(h_BTD, head.weight, labels_BT, cfg)
            finally:
                fused_head.chunk_rows = saved
        return loss

    variants = {
        "logits + cross-entropy": step(lambda: causal_lm_objective(head(h_BTD), labels_BT, cfg)),
        "fused head": step(lambda: fused_causal_lm_objective(h_BTD, head.weight, labels_BT, cfg)),
    }
    for rows in chunk_rows:
        variants[f"fused head, {rows}-row chunks"] = step(fused_with_rows(rows))
    return variants


def _inputs(args: argparse.Namespace) -> tuple[torch.Tensor, torch.nn.Linear, torch.Tensor]:
    torch.manual_seed(0)
    B = args.tokens // args.seq_len
    h_BTD = torch.randn(B, args.seq_len, args.hidden, requires_grad=True)
    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    labels_BT = torch.randint(0, args.vocab, (B, args.seq_len))
    return h_BTD, head, labels_BT


def peak_memory_of_one_step(args: argparse.Namespace) -> None:
    """(In a subprocess) print the peak RSS one step adds, in MiB, as JSON."""
    h_BTD, head, labels_BT = _inputs(args)
    head.weight.grad = torch.zeros_like(head.weight)  # gradients exist in training anyway
    h_BTD.grad = torch.zeros_like(h_BTD)
    fn = _variants(h_BTD, head, labels_BT, DTYPES[args.dtypes[0]])[args.variant]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"added_mib": (after - before) / 1024}))


def run_memory(args: argparse.Namespace) -> list[dict]:
    rows = []
    for dtype_name in args.dtypes:
        for variant in ("logits + cross-entropy", "fused head"):
            cmd = [sys.executable, __file__, "--_child", variant, "--dtypes", dtype_name, "--hidden", str(args.hidden),
                   "--vocab", str(args.vocab), "--tokens", str(args.tokens), "--seq-len", str(args.seq_len),
                   "--allocator", args.allocator]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append({"dtype": dtype_name, "variant": variant, **json.loads(out.strip().splitlines()[-1])})
    print(f"Peak resident memory added by one fwd+bwd step (fresh process each); rows {args.tokens}, hidden "
          f"{args.hidden}, vocab {args.vocab}; (N, V) fp32 = {args.tokens * args.vocab * 4 / 2**20:.0f} MiB")
    print("| dtype | variant | MiB added |")
    print("|---|---|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['variant']} | {r['added_mib']:.0f} |")
    return rows


def run(args: argparse.Namespace) -> list[dict]:
    h_BTD, head, labels_BT = _inputs(args)
    B = h_BTD.shape[0]
    flops = 6.0 * B * args.seq_len * args.hidden * args.vocab
    rows = []
    for dtype_name in args.dtypes:
        variants = _variants(h_BTD, head, labels_BT, DTYPES[dtype_name], args.chunk_rows)
        times = time_round_robin(variants, args.repeats, args.warmup)
        ref = statistics.median(times["logits + cross-entropy"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"dtype": dtype_name, "variant": name, "ms": med * 1e3, "speedup": ref / med,
                         "gflops": flops / med / 1e9})
    print(f"Setup: torch {torch.__version__}, {torch.get_num_threads()} threads; rows {B}×{args.seq_len}, "
          f"hidden {args.hidden}, vocab {args.vocab}; median of {args.repeats}")
    print("| dtype | variant | fwd+bwd ms | speed-up | GFLOP/s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['variant']} | {r['ms']:.1f} | {r['speedup']:.2f}× | {r['gflops']:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    add_cpu_args(parser)
    parser.add_argument("--memory", action="store_true", help="peak memory per variant instead of time")
    parser.add_argument("--chunk-rows", type=int, nargs="+", default=[], metavar="ROWS",
                        help="also time the fused head with these rows per chunk (the default picks "
                             f"{fused_head.chunk_rows(8192, torch.device('cpu'))} at vocab 8192 on CPU)")
    parser.add_argument("--_child", dest="variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    apply_cpu_args(args)
    if args.variant is not None:
        peak_memory_of_one_step(args)
    elif args.memory:
        run_memory(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
