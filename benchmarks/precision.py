"""Precision and deployment in one run: training tokens/s and peak memory per precision, and per
quantization scheme the file size, validation perplexity and batch-1 decode speed of a trained
run, and what quantization-aware training buys over post-training quantization.

Same run, same machine; every ratio is against a reference measured in this run.

Training half (``--variants``): the demo model (configs/demo.yaml's model section, random init,
seed 0) is prepared once per variant through Ava's parallelism seam (``prepare_model``, so FP8 and
QAT are applied as ``ava train`` applies them) and runs the same full training step as the trainer
(autocast per ``precision.dtype``, fp16 loss scaling with ``GradScaler``, ``clip_grad_norm_`` after
unscaling, fused AdamW) on the same random ``--batch`` × ``--seq-len`` tokens: fp32, bf16, bf16
weights with fp32 masters, fp16, FP8 emulated (tensorwise, rowwise), QAT int8 and int4. Variants
are timed round by round (:func:`bench_common.time_round_robin`, ``--steps`` steps per sample,
median of ``--repeats`` after ``--warmup`` rounds); peak memory is the peak of live tensors over one
step (``MemTracker``: parameters, gradients, optimizer state, activations and temporaries).

Quantization half (needs ``--run``, a trained run such as ``make demo``'s): the run's model in
fp32, bf16 and each ``ava quantize`` scheme (int8, int4 at group sizes 32/64/128, fp8): the size of
the saved ``model.safetensors``, the validation perplexity on the run's validation split (as
``ava quantize`` scores it) and greedy batch-1 decode tokens/s with the KV cache: fp32, the model
cast to bf16, and each quantized model both in fp32 compute (as ``ava generate`` loads it) and cast
to bf16, since which is faster depends on the CPU's bf16 support; median of ``--decode-repeats``
interleaved rounds.

QAT versus PTQ (needs ``--run``; ``--qat none`` skips it): the run's own config is trained again
with ``precision.qat`` for the ``--qat`` scheme (same seed and data), and both runs are quantized
with that scheme and scored on the same validation tokens.

    python benchmarks/precision.py                                 # the training half only
    python benchmarks/precision.py --run runs/demo_<time>          # all three halves (~15 min on 2 cores)
    python benchmarks/precision.py --variants --run runs/demo_<time> --qat none   # quantization only
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


def quantization_half(args: argparse.Namespace, checkpoint: Path, work: Path) -> None:
    """Per scheme, on ``checkpoint``: file size, validation perplexity and batch-1 decode tokens/s,
    ratios against fp32 and bf16 (benchmarks/quantization.py's measurements on a trained model)."""
    import quantization as q
    from Ava.models import EnhancedMoEModel

    fp32 = EnhancedMoEModel.from_pretrained(checkpoint).eval()
    sizes, models = q.saved_variants(fp32, work, checkpoint)
    # Decode: every quantized model in fp32 compute (inputs rounded to bf16 for the packed kernels
    # only) and in bf16 compute (their native input): which wins depends on the CPU.
    for name in [n for n in models if n not in ("fp32", "bf16")]:
        models[f"{name}+bf16"] = copy.deepcopy(models[name]).to(torch.bfloat16)
    speed = q.decode_tokens_per_s(models, argparse.Namespace(**{**vars(args), "repeats": args.decode_repeats}),
                                  fp32.config.vocab_size)
    del models
    ppl = q.perplexities(checkpoint, args.ppl_tokens)
    print(f"\nQuantization of {checkpoint} ({sum(p.numel() for p in fp32.parameters()) / 1e6:.1f}M parameters): "
          f"validation perplexity on {args.ppl_tokens:,} tokens at most (quantized models with fp32 activations); "
          f"decode batch 1, {args.prompt_len}-token prompt, {args.new_tokens} new tokens, median of "
          f"{args.decode_repeats} interleaved rounds, quantized models in fp32 compute and cast to bf16")
    print("| variant | file MiB | × bf16 | perplexity | vs fp32 | decode tok/s, fp32 compute | × fp32 | "
          "decode tok/s, bf16 compute | × bf16 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in sizes:
        as_fp32 = "fp32" if name == "bf16" else name
        as_bf16 = "bf16" if name in ("fp32", "bf16") else f"{name}+bf16"
        print(f"| {name} | {sizes[name]:.2f} | {sizes[name] / sizes['bf16']:.3f} | {ppl[name]:.3f} | "
              f"{100 * (ppl[name] / ppl['fp32'] - 1):+.2f}% | "
              + (f"{speed[as_fp32]:.1f} | {speed[as_fp32] / speed['fp32']:.2f} | " if name != "bf16" else "| | ")
              + (f"{speed[as_bf16]:.1f} | {speed[as_bf16] / speed['bf16']:.2f} |" if name != "fp32" else " | |"))


def qat_versus_ptq(args: argparse.Namespace, checkpoint: Path, work: Path) -> None:
    """``checkpoint``'s run trained again with ``precision.qat`` (same config, seed and data), then
    both quantized as ``ava quantize`` does and scored on the same validation tokens."""
    import quantization as q
    from Ava.cli.quantize_commands import validation_perplexity, validation_split
    from Ava.config import load_config
    from Ava.config.checkpoint_layout import CONFIG_FILE, resolve_checkpoint
    from Ava.models import EnhancedMoEModel
    from Ava.optimization.quantization import quantize_model
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    scheme, _, group = args.qat.partition("-g")
    group_size = int(group) if group else None
    bits = 4 if scheme == "int4" else 8
    qat = f"{{bits: {bits}, group_size: {group_size or 'null'}, start_step: {args.qat_start}}}"
    if args.qat_run:  # trained before: it must be this run's config with precision.qat only
        qat_ckpt = resolve_checkpoint(args.qat_run)
        config = load_config(qat_ckpt / CONFIG_FILE)
        wanted = load_config(checkpoint / CONFIG_FILE, [f"precision.qat={qat}"])
        if {**config.model_dump(), "run": None} != {**wanted.model_dump(), "run": None}:
            sys.exit(f"--qat-run {args.qat_run}: its config is not {checkpoint}'s with precision.qat={qat}")
    else:
        overrides = [f"run.output_dir={work / 'qat'}", f"precision.qat={qat}"]
        config = load_config(checkpoint / CONFIG_FILE, overrides)
        seed_everything(config.run.seed)
        summary = EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
        qat_ckpt = resolve_checkpoint(summary.run_dir)

    split = validation_split(checkpoint, args.ppl_tokens)  # the same config and data: the same split
    scores = {}
    for name, ckpt in (("plain", checkpoint), ("qat", qat_ckpt)):
        model = EnhancedMoEModel.from_pretrained(ckpt)
        scores[name] = validation_perplexity(split, model, show=False)
        quantize_model(model, scheme, group_size)
        scores[f"{name}-q"] = validation_perplexity(split, model, show=False)
    base = scores["plain"]
    print(f"\nQAT versus PTQ, {q.label(scheme, group_size)}: {checkpoint} against its config trained again with "
          f"precision.qat={qat}; validation perplexity, changes against the plain run in full precision")
    print("| plain run | plain run quantized (PTQ) | QAT run, full precision | QAT run quantized | PTQ change | "
          "QAT change | QAT run's own change |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {base:.3f} | {scores['plain-q']:.3f} | {scores['qat']:.3f} | {scores['qat-q']:.3f} | "
          f"{100 * (scores['plain-q'] / base - 1):+.2f}% | {100 * (scores['qat-q'] / base - 1):+.2f}% | "
          f"{100 * (scores['qat-q'] / scores['qat'] - 1):+.2f}% |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="training variants (none: skip the training half)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timed sample")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--run", default=None,
                        help="a trained run (make demo) for the quantization and QAT-vs-PTQ halves; without it they are skipped")
    parser.add_argument("--no-quant", action="store_true", help="skip the quantization half")
    parser.add_argument("--qat", default="int4-g64", choices=["int8", "int4-g32", "int4-g64", "int4-g128", "none"],
                        help="scheme of the QAT-vs-PTQ comparison (none: skip it; it trains --run's config again)")
    parser.add_argument("--qat-run", default=None,
                        help="a QAT run trained before (--run's config plus precision.qat) instead of training one")
    parser.add_argument("--qat-start", type=int, default=0, help="precision.qat.start_step of the QAT run")
    parser.add_argument("--ppl-tokens", type=int, default=200_000, help="validation tokens scored at most")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode: new tokens per sample")
    parser.add_argument("--prompt-len", type=int, default=16, help="decode: prompt tokens")
    parser.add_argument("--decode-repeats", type=int, default=9, help="decode: timed rounds (median reported)")
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.variants:
            training_half(args, work)
        if args.run is None:
            print("\n(no --run: the quantization and QAT-vs-PTQ halves need a trained run; `make demo` trains one)")
            return
        from Ava.config.checkpoint_layout import resolve_checkpoint

        checkpoint = resolve_checkpoint(args.run)
        if not args.no_quant:
            quantization_half(args, checkpoint, work)
        if args.qat != "none":
            qat_versus_ptq(args, checkpoint, work)


if __name__ == "__main__":
    main()
