"""Activation checkpointing (``performance.activation_checkpointing``): peak memory and step time, on vs off.

Two copies of one randomly initialised model (same weights) train on the same random batch, one
with :meth:`EnhancedMoEModel.set_activation_checkpointing` on. Both numbers come from the same run:

- peak memory: ``torch.distributed._tools.mem_tracker.MemTracker`` over one forward (with
  labels) + backward of each variant: the largest total of live tensor bytes (parameters,
  gradients, activations, temporaries) it saw. It counts tensors, not allocator caches or RSS,
  so it is deterministic and one step each suffices. ``activations`` is its ACT + TEMP share.
- step time: the full training step (forward with labels, backward, ``clip_grad_norm_``, fused
  AdamW step, ``zero_grad``), the two variants interleaved round-robin after ``--warmup`` rounds
  (``bench_common.time_round_robin``), median of ``--repeats``; ratio = on ÷ off.

    python benchmarks/activation_memory.py                       # hidden 256, 4 layers, 8 experts top-2, 8x256
    python benchmarks/activation_memory.py --dtypes bf16 --layers 8 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_common import (add_cpu_args, add_model_args, apply_cpu_args, model_config, time_round_robin,
                          training_step)
from torch.distributed._tools.mem_tracker import MemTracker

from Ava.config import OptimizerConfig
from Ava.models import EnhancedMoEModel
from Ava.optimization import build_optimizer


def peak_bytes(model: EnhancedMoEModel, batch: torch.Tensor, autocast: bool) -> tuple[int, int]:
    """(total, activations + temporaries) peak tensor bytes of one forward + backward."""
    tracker = MemTracker()
    tracker.track_external(model)
    with tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(batch, labels=batch).loss
        loss.backward()
    model.zero_grad(set_to_none=True)
    peak = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    parts = {str(kind).rsplit(".", 1)[-1]: value for kind, value in peak.items()}
    return peak["Total"], parts["ACT"] + parts["TEMP"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    add_model_args(parser)
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)

    torch.manual_seed(0)
    seed_model = EnhancedMoEModel(model_config(args))
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    print(f"hidden {args.hidden}, {args.layers} layers, {args.experts} experts top-{args.top_k}, "
          f"batch {args.batch}x{args.seq_len}, {torch.get_num_threads()} threads")
    print("| dtype | peak MB off | peak MB on | peak on/off | activations MB off | on | "
          "step s off | step s on | step on/off |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype in args.dtypes:
        autocast = dtype == "bf16"
        models = {}
        for name, on in (("off", False), ("on", True)):
            model = EnhancedMoEModel(model_config(args))
            model.load_state_dict(seed_model.state_dict())
            model.train().set_activation_checkpointing(on)
            models[name] = model
        peaks = {name: peak_bytes(model, batch, autocast) for name, model in models.items()}
        steps = {name: training_step(model, build_optimizer(model, OptimizerConfig(name="adamw"), 3e-4, torch.device("cpu")), batch, autocast) for name, model in models.items()}
        times = time_round_robin(steps, args.repeats, args.warmup)
        med = {name: statistics.median(values) for name, values in times.items()}
        mb = {name: (total / 2**20, act / 2**20) for name, (total, act) in peaks.items()}
        print(f"| {dtype} | {mb['off'][0]:.1f} | {mb['on'][0]:.1f} | {peaks['on'][0] / peaks['off'][0]:.2f} | "
              f"{mb['off'][1]:.1f} | {mb['on'][1]:.1f} | {med['off']:.3f} | {med['on']:.3f} | "
              f"{med['on'] / med['off']:.2f} |")


if __name__ == "__main__":
    main()
