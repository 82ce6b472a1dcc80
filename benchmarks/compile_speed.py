"""``performance.compile``: training step time of compiled decoder layers against eager.

Two copies of one randomly initialised model (same weights) train on the same random batch; one
runs :meth:`EnhancedMoEModel.compile_layers` (each decoder layer's training forward through
``torch.compile``, the routed experts eager). Per dtype (bf16 = ``precision.dtype: bf16``,
autocast over fp32 weights) the script prints the first compiled step's wall time (mostly
compilation), the step-1 losses of both (they must agree), then the full training step (forward
with labels, backward, ``clip_grad_norm_``, fused AdamW, ``zero_grad``) of the two variants
interleaved round-robin after ``--warmup`` rounds (``bench_common.time_round_robin``), median
of ``--repeats``: ``speed-up`` = eager ÷ compiled, a same-run ratio.

    python benchmarks/compile_speed.py                         # hidden 256, 4 layers, 8 experts top-2, 8x256
    python benchmarks/compile_speed.py --dtypes fp32 --repeats 9
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin

from Ava.config import ModelConfig, OptimizerConfig
from Ava.models import EnhancedMoEModel
from Ava.models.decoder_layer import compile_problem
from Ava.optimization import build_optimizer


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads,
        num_kv_heads=args.kv_heads, num_experts=args.experts, max_seq_len=args.seq_len,
        moe={"top_k": args.top_k, "moe_intermediate_size": args.moe_intermediate, "backend": args.backend},
    )


def training_step(model: EnhancedMoEModel, batch: torch.Tensor, autocast: bool) -> Callable[[], torch.Tensor]:
    optimizer = build_optimizer(model, OptimizerConfig(name="adamw"), 3e-4, torch.device("cpu"))

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the compiling step")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--moe-intermediate", type=int, default=512)
    parser.add_argument("--backend", default="auto", help="model.moe.backend")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    problem = compile_problem(torch.device("cpu"))
    if problem is not None:
        raise SystemExit(f"torch.compile cannot run here: {problem}")

    torch.manual_seed(0)
    seed_model = EnhancedMoEModel(model_config(args))
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    print(f"hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k} "
          f"(backend {args.backend}), batch {args.batch}x{args.seq_len}, {torch.get_num_threads()} threads")
    print("| dtype | first compiled step s | step-1 loss eager | compiled | eager s | compiled s | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        autocast = dtype == "bf16"
        steps = {}
        for name in ("eager", "compiled"):
            model = EnhancedMoEModel(model_config(args))
            model.load_state_dict(seed_model.state_dict())
            model.train().compile_layers(name == "compiled")
            steps[name] = training_step(model, batch, autocast)
        loss_eager = float(steps["eager"]())
        start = time.perf_counter()
        loss_compiled = float(steps["compiled"]())
        first = time.perf_counter() - start
        times = time_round_robin(steps, args.repeats, args.warmup)
        med = {name: statistics.median(values) for name, values in times.items()}
        print(f"| {dtype} | {first:.1f} | {loss_eager:.6f} | {loss_compiled:.6f} | {med['eager']:.3f} | "
              f"{med['compiled']:.3f} | {med['eager'] / med['compiled']:.2f}x |")


if __name__ == "__main__":
    main()
