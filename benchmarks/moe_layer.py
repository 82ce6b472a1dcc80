"""Forward + backward time of one MoE layer per expert backend, against a dense SwiGLU.

The dense reference has the same active parameters per token (intermediate = top_k ×
moe_intermediate), so ``ratio`` is the overhead of routing, dispatch and combine over the matmuls
the MoE layer must do anyway. All variants run interleaved in the same process (warmup, then
``--repeats`` rounds; the median is reported), so machine noise hits them alike.

GFLOP/s counts the expert (or dense) SwiGLU matmuls only, forward + backward:
``6 · tokens · 3 · hidden · top_k · moe_intermediate`` (router and combine excluded), the same
numerator for every row.

    python benchmarks/moe_layer.py                       # defaults: 256 hidden, 8 experts, top-2
    python benchmarks/moe_layer.py --experts 64 --top-k 8 --moe-intermediate 128
"""

from __future__ import annotations

import argparse
import statistics
from typing import Callable

import torch
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin

from Ava.config import ModelConfig
from Ava.layers import MoEBlock, SwiGLU

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def _step_fn(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, autocast: torch.dtype | None,
             moe: bool) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            y = module(x)
            y = y.hidden_states if moe else y
        (y.float() * grad).sum().backward()

    return step


def run(args: argparse.Namespace) -> list[dict]:
    cfg = ModelConfig(
        vocab_size=256, hidden_size=args.hidden, num_layers=1, num_heads=max(1, args.hidden // 64),
        num_experts=args.experts,
        moe={"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate},
    )
    torch.manual_seed(0)
    moe = MoEBlock(cfg)
    dense = SwiGLU(args.hidden, args.top_k * args.moe_intermediate)
    x = torch.randn(args.tokens, args.hidden).unsqueeze(0)  # (1, T, D)
    grad = torch.randn_like(x)
    flops = 6.0 * args.tokens * 3 * args.hidden * args.top_k * args.moe_intermediate
    load = moe.gate(x[0]).tokens_per_expert_E.float()
    rows = []
    for dtype_name in args.dtypes:
        autocast = DTYPES[dtype_name]

        def backend_step(name: str) -> Callable[[], None]:
            inner = _step_fn(moe, x, grad, autocast, moe=True)

            def step() -> None:
                moe.experts.backend = name
                inner()

            return step

        variants = {
            "dense SwiGLU": _step_fn(dense, x[0], grad[0], autocast, moe=False),
            "moe loop": backend_step("loop"),
            "moe grouped": backend_step("grouped"),
            "moe batched": backend_step("batched"),
        }
        times = time_round_robin(variants, args.repeats, args.warmup)
        ref = statistics.median(times["dense SwiGLU"])
        for name, ts in times.items():
            med = statistics.median(ts)
            rows.append({"dtype": dtype_name, "variant": name, "ms": med * 1e3, "ratio": med / ref,
                         "gflops": flops / med / 1e9})
    print(f"Setup: torch {torch.__version__}, {torch.get_num_threads()} threads; tokens {args.tokens}, "
          f"hidden {args.hidden}, {args.experts} experts top-{args.top_k}, moe_intermediate "
          f"{args.moe_intermediate} (dense intermediate {args.top_k * args.moe_intermediate}); "
          f"load max/mean {load.max().item() / load.mean().item():.2f}; median of {args.repeats}")
    print("| dtype | variant | fwd+bwd ms | × dense | GFLOP/s |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dtype']} | {r['variant']} | {r['ms']:.1f} | {r['ratio']:.2f} | {r['gflops']:.0f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    run(args)


if __name__ == "__main__":
    main()
