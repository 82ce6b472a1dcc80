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

import torch
from bench_common import (add_cpu_args, add_model_args, apply_cpu_args, model_config, time_round_robin,
                          training_step)

from Ava.config import OptimizerConfig
from Ava.config.compile_check import compile_problem
from Ava.models import EnhancedMoEModel
from Ava.optimization import build_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds after the compiling step")
    add_model_args(parser, backend=True)
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
            steps[name] = training_step(model, build_optimizer(model, OptimizerConfig(name="adamw"), 3e-4, torch.device("cpu")), batch, autocast)
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
