"""Training precision: tokens/s and peak memory of fp32 / bf16 / bf16 weights with fp32 masters /
fp16 / FP8-emulated / QAT, and
what QAT buys over post-training quantization.

Same run, same machine. Training half: the demo model (configs/demo.yaml's model section, random
init, seed 0) is prepared once per variant through Ava's parallelism seam (``prepare_model``, so
FP8 and QAT are applied as ``ava train`` applies them) and runs the same full training step as the
trainer (autocast per ``precision.dtype``, fp16 loss scaling with ``GradScaler``, ``clip_grad_norm_``
after unscaling, fused AdamW) on the same random ``--batch`` × ``--seq-len`` tokens. Variants are
timed round by round (:func:`bench_common.time_round_robin`, ``--steps`` steps per sample, median
of ``--repeats`` after ``--warmup`` rounds); peak memory is the peak of live tensors over one step
(``MemTracker``: parameters, gradients, optimizer state, activations and temporaries). Ratios are
against fp32 measured in the same run.

QAT versus PTQ (``--qat-steps N``, default 60; 0 skips): configs/tiny.yaml is trained twice with the
same seed and data, once plainly and once with ``precision.qat``, each then quantized as
``ava quantize`` does (int8, int4 g32) and scored on the run's validation split
(``validation_perplexity``, as ``ava quantize`` reports it).

    python benchmarks/precision.py                     # demo model, 2 steps × 3 rounds per variant
    python benchmarks/precision.py --variants fp32 bf16 fp8-tensorwise --qat-steps 0
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from bench_common import add_cpu_args, apply_cpu_args, time_round_robin
from torch.distributed._tools.mem_tracker import MemTracker

REPO = Path(__file__).resolve().parents[1]

# name -> config overrides (precision section)
VARIANTS: dict[str, tuple[str, ...]] = {
    "fp32": ("precision.dtype=fp32",),
    "bf16": ("precision.dtype=bf16",),
    "bf16-weights": ("precision.dtype=bf16", "precision.param_dtype=bf16"),
    "fp16": ("precision.dtype=fp16",),
    "fp8-tensorwise": ("precision.dtype=bf16", "precision.fp8.enabled=true", "precision.fp8.emulate=true",
                       "precision.fp8.recipe=tensorwise"),
    "fp8-rowwise": ("precision.dtype=bf16", "precision.fp8.enabled=true", "precision.fp8.emulate=true",
                    "precision.fp8.recipe=rowwise"),
    "qat-int8": ("precision.dtype=fp32", "precision.qat={bits: 8}"),
    "qat-int4": ("precision.dtype=fp32", "precision.qat={bits: 4, group_size: 32}"),
}


def build_step(overrides: tuple[str, ...], batch: torch.Tensor, work: Path):
    """A prepared demo model for ``overrides`` and a closure running one full training step."""
    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel
    from Ava.optimization import build_optimizer
    from Ava.training.parallel import SingleProcess
    from Ava.training.precision import MixedPrecision

    config = load_config(REPO / "configs" / "demo.yaml", [f"run.output_dir={work}", "run.seed=0", *overrides])
    device = torch.device("cpu")
    model = SingleProcess(device).prepare_model(EnhancedMoEModel(config.model), config)
    model.train()
    optimizer = build_optimizer(model, config.optimizer, config.training.learning_rate, device)
    precision = MixedPrecision(config.precision, device)
    precision.attach(optimizer)  # precision.param_dtype bf16: fp32 master weights in the optimizer

    def step() -> None:
        with precision.autocast():
            loss = model(batch, labels=batch).loss
        precision.scale(loss).backward()
        precision.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(precision.grad_params(model), 1.0)
        precision.step(optimizer)
        precision.update()
        precision.zero_grad(optimizer)

    return model, optimizer, step


def peak_mib(model: torch.nn.Module, optimizer: torch.optim.Optimizer, step) -> float:
    """Peak MiB of live tensors over one training step (after the optimizer state exists)."""
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        step()
    return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] / 2**20


def training_half(args: argparse.Namespace, work: Path) -> None:
    """Tokens/s and peak memory per variant, ratios against fp32."""
    from Ava.config import load_config

    vocab = load_config(REPO / "configs" / "demo.yaml", [f"run.output_dir={work}"]).model.vocab_size
    batch = torch.randint(0, vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    steps, memory = {}, {}
    for name in args.variants:
        model, optimizer, step = build_step(VARIANTS[name], batch, work)
        step()  # optimizer state exists from here on
        memory[name] = peak_mib(model, optimizer, step)

        def run(step=step) -> None:
            for _ in range(args.steps):
                step()

        steps[name] = run
        print(f"built {name}", file=sys.stderr)
    times = time_round_robin(steps, args.repeats, args.warmup)
    tokens = args.batch * args.seq_len * args.steps
    tps = {name: tokens / statistics.median(ts) for name, ts in times.items()}
    ref = "fp32" if "fp32" in tps else args.variants[0]
    print(f"\nTraining, demo model, batch {args.batch} × {args.seq_len}, {args.steps} steps per sample, median of "
          f"{args.repeats} rounds, {torch.get_num_threads()} threads")
    print(f"| variant | tokens/s | × {ref} | peak MiB | × {ref} |")
    print("|---|---:|---:|---:|---:|")
    for name in args.variants:
        print(f"| {name} | {tps[name]:,.0f} | {tps[name] / tps[ref]:.2f} | {memory[name]:,.0f} | "
              f"{memory[name] / memory[ref]:.2f} |")


def qat_versus_ptq(args: argparse.Namespace, work: Path) -> None:
    """Validation perplexity of a plain and a QAT tiny run, before and after ``ava quantize``."""
    from Ava.cli.quantize_commands import validation_perplexity
    from Ava.config import load_config
    from Ava.config.checkpoint_layout import resolve_checkpoint
    from Ava.models import EnhancedMoEModel
    from Ava.optimization.quantization import quantize_model
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    schemes = (("int8", None, "{bits: 8}"), ("int4", 32, "{bits: 4, group_size: 32}"))
    base = [f"training.max_steps={args.qat_steps}", "evaluation.sample_max_new_tokens=0"]
    runs = {"plain": base}
    runs.update({f"qat-{s}{'-g' + str(g) if g else ''}": [*base, f"precision.qat={q}"] for s, g, q in schemes})
    checkpoints = {}
    for name, overrides in runs.items():
        config = load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={work / name}", *overrides])
        seed_everything(config.run.seed)
        summary = EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
        checkpoints[name] = resolve_checkpoint(summary.run_dir)
    print(f"\nQAT versus PTQ: configs/tiny.yaml, {args.qat_steps} steps, validation perplexity")
    print("| scheme | plain run, full precision | plain run quantized (PTQ) | QAT run, full precision | "
          "QAT run quantized | PTQ loss | QAT loss |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    plain_ckpt = checkpoints["plain"]
    plain = EnhancedMoEModel.from_pretrained(plain_ckpt)
    plain_fp = validation_perplexity(plain_ckpt, plain, show=False)
    for (scheme, group, _), qat_name in zip(schemes, list(runs)[1:], strict=True):
        ptq = copy.deepcopy(plain)
        quantize_model(ptq, scheme, group)
        ptq_ppl = validation_perplexity(plain_ckpt, ptq, show=False)
        qat_ckpt = checkpoints[qat_name]
        qat = EnhancedMoEModel.from_pretrained(qat_ckpt)
        qat_fp = validation_perplexity(qat_ckpt, qat, show=False)
        quantize_model(qat, scheme, group)
        qat_q = validation_perplexity(qat_ckpt, qat, show=False)
        label = f"{scheme}-g{group}" if group else scheme
        print(f"| {label} | {plain_fp:.2f} | {ptq_ppl:.2f} | {qat_fp:.2f} | {qat_q:.2f} | "
              f"{(ptq_ppl / plain_fp - 1) * 100:+.2f}% | {(qat_q / plain_fp - 1) * 100:+.2f}% |")
    print("(losses are against the plain run's full-precision perplexity)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed sample")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--qat-steps", type=int, default=60, help="tiny-run steps for QAT vs PTQ; 0 = skip")
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.variants:
            training_half(args, work)
        if args.qat_steps:
            qat_versus_ptq(args, work)


if __name__ == "__main__":
    main()
