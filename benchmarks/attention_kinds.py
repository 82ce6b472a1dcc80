"""Standard attention against mixture-of-head (MoH) and mixture of attention heads (MoA).

Trains the same small MoE on the embedded Shakespeare corpus once per ``model.attention`` kind,
in one process, through the trainer: the same seed, tokenizer, data order, steps and tokens;
only ``model.attention`` (and its section) changes. Reports the validation loss at the end and
its difference from standard attention, and the training speed as a ratio to standard measured
in the same process: every kind's training step (forward + backward + AdamW step on its own copy,
same batch) timed round by round, interleaved, the median per kind (``bench_common``), so machine
noise hits every kind alike; the runs' own tokens/s (sequential runs) are printed as well.

    python benchmarks/attention_kinds.py                   # defaults: a few minutes on 2 CPU cores
    python benchmarks/attention_kinds.py --steps 600 --kinds standard,moh
    python benchmarks/attention_kinds.py --timing-only --repeats 40     # the speed ratios alone (~1 min)
    python benchmarks/attention_kinds.py --hidden 128 --heads 8 --moh-shared 2 --moh-top-k 4 --moa-experts 16 --moa-top-k 8

Defaults: hidden 64, 2 layers, 4 heads of width 16 (4 key/value heads; MoA: 1 shared), 4
experts top-2, vocabulary 512, batch 16 × 64 tokens, 150 steps. MoH: 1 shared head + the top 2
of the 3 routed heads (3 of 4 heads active, the paper's 75 %); MoA: 8 head experts, top 4 per
token (as many heads per token as standard attention). Results: docs/experimental_attention.md.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench_common import add_cpu_args, apply_cpu_args, time_round_robin, training_step

REPO = Path(__file__).resolve().parents[1]


def kind_overrides(kind: str, args: argparse.Namespace) -> list[str]:
    """The config overrides that switch ``model.attention`` to ``kind``."""
    if kind == "moh":
        return ["model.attention=moh", f"model.moh.shared_heads={args.moh_shared}", f"model.moh.top_k={args.moh_top_k}"]
    if kind == "moa":
        return ["model.attention=moa", "model.num_kv_heads=1", f"model.moa.num_experts={args.moa_experts}",
                f"model.moa.top_k={args.moa_top_k}"]
    return []


def load(kind: str, args: argparse.Namespace, out_dir: Path):
    """The training config of ``kind``: configs/tiny.yaml resized by the flags."""
    from Ava.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", [
        f"model.hidden_size={args.hidden}", f"model.num_layers={args.layers}", f"model.num_heads={args.heads}",
        f"model.num_kv_heads={args.heads}", f"model.max_seq_len={args.seq_len}", f"data.seq_len={args.seq_len}",
        "model.moe.moe_intermediate_size=null", f"data.tokenizer.vocab_size={args.vocab}",
        f"training.batch_size={args.batch}", f"training.max_steps={args.steps}", "training.num_epochs=100",
        f"training.eval_every={args.steps}", f"training.eval_batches={args.eval_batches}",
        f"training.log_every={max(1, args.steps // 10)}", "scheduler.warmup_steps=30",
        "evaluation.sample_max_new_tokens=0", "logging.progress_bar=false", f"run.output_dir={out_dir}",
        f"run.name={kind}", f"run.seed={args.seed}", *kind_overrides(kind, args),
    ], check_environment=False)


def train(kind: str, args: argparse.Namespace, out_dir: Path) -> dict:
    """Train ``kind``; its final validation loss, parameter count and the run's own tokens/s."""
    from Ava.models import EnhancedMoEModel
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    config = load(kind, args, out_dir)
    seed_everything(config.run.seed)
    model = EnhancedMoEModel(config.model)
    trainer = EnhancedModularTrainer(model, config)
    start = time.perf_counter()
    summary = trainer.train()
    return {"kind": kind, "val_loss": summary.final_val_loss, "tokens": summary.tokens,
            "params": model.num_parameters(), "run_tokens_per_s": summary.tokens / (time.perf_counter() - start)}


def step_seconds(kinds: list[str], args: argparse.Namespace, out_dir: Path) -> dict[str, float]:
    """Median seconds of one training step per kind, interleaved round by round on one batch."""
    from Ava.models import EnhancedMoEModel

    steps = {}
    batch = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0))
    for kind in kinds:
        cfg = load(kind, args, out_dir).model.model_copy(update={"vocab_size": args.vocab})
        torch.manual_seed(0)
        model = EnhancedMoEModel(cfg).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        steps[kind] = training_step(model, optimizer, batch, autocast=args.bf16)
    times = time_round_robin(steps, args.repeats, warmup=2)
    return {kind: statistics.median(ts) for kind, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="standard,moh,moa", help="comma-separated model.attention kinds")
    for flag, default in (("--hidden", 64), ("--layers", 2), ("--heads", 4), ("--seq-len", 64), ("--batch", 16),
                          ("--vocab", 512), ("--steps", 150), ("--eval-batches", 10), ("--repeats", 10),
                          ("--moh-shared", 1), ("--moh-top-k", 2), ("--moa-experts", 8), ("--moa-top-k", 4),
                          ("--seed", 0)):
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--bf16", action="store_true", help="time the steps under bf16 autocast")
    parser.add_argument("--timing-only", action="store_true", help="skip the training runs: only the step timing")
    add_cpu_args(parser)
    args = parser.parse_args()
    apply_cpu_args(args)
    logging.basicConfig(level=logging.WARNING)
    kinds = args.kinds.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for kind in [] if args.timing_only else kinds:
            results.append(train(kind, args, Path(tmp)))
            print(f"{kind}: val loss {results[-1]['val_loss']:.4f}, {results[-1]['run_tokens_per_s']:,.0f} tok/s "
                  f"(whole run)", flush=True)
        seconds = step_seconds(kinds, args, Path(tmp))
    ref_kind = "standard" if "standard" in kinds else kinds[0]
    ref_s = seconds[ref_kind]
    tokens_per_step = args.batch * args.seq_len
    print(f"\nstep time: median of {args.repeats} interleaved rounds on {torch.get_num_threads()} threads"
          f"{' (bf16 autocast)' if args.bf16 else ''}; {tokens_per_step} tokens per step")
    if args.timing_only:
        print(f"| attention | train tokens/s | ÷ {ref_kind} |\n|---|---:|---:|")
        for kind in kinds:
            print(f"| {kind} | {tokens_per_step / seconds[kind]:,.0f} | {ref_s / seconds[kind]:.2f} |")
        return
    ref = next(r for r in results if r["kind"] == ref_kind)
    print(f"{args.steps} training steps per kind, the same tokens")
    print(f"| attention | parameters | val loss | Δ vs {ref_kind} | train tokens/s | ÷ {ref_kind} |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        s = seconds[r["kind"]]
        print(f"| {r['kind']} | {r['params']:,} | {r['val_loss']:.4f} | {r['val_loss'] - ref['val_loss']:+.4f} | "
              f"{tokens_per_step / s:,.0f} | {ref_s / s:.2f} |")


if __name__ == "__main__":
    main()
