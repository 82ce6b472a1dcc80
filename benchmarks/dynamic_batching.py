"""Dynamic batching of unpacked chat rows: padding, throughput and loss against fixed-size batches.

The script writes a chat JSONL of conversations with varied lengths (no downloads: a user turn of
2–20 words and an assistant turn drawn from short, medium and long answers, so row lengths spread
from a few tokens to ``--seq-len``). Two runs of the real trainer (configs/tiny.yaml's model,
``data.packing: false``, the same seed, the same rows, the same number of steps) follow in the
same process:

- **fixed**: ``training.batch_size`` rows per micro-batch, each padded to its longest row;
- **dynamic**: ``data.max_tokens_per_batch`` chosen so a micro-batch holds as many real tokens
  as a fixed one on average (rows × longest row ≤ the budget, from length-sorted buckets).

Reported per run: the padding share (``data/padding`` of metrics.jsonl, over the whole run), real
(non-padding) tokens per second (median over the steps after ``--warmup``, from the per-step
``tokens_per_s`` and padding share), the mean training loss over the last 10 steps and the final
validation loss (the same validation rows for both); then the ratios dynamic ÷ fixed. The loss
is normalised per token over each step in both runs, so the two optimise the same objective on
differently grouped rows: their losses agree within the stated tolerance, while dynamic batching
wastes far less compute on padding.

    python benchmarks/dynamic_batching.py [--steps 60] [--rows 1500] [--batch-size 16] [--seq-len 256] [--out r.json]

The default takes about 2–3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
LOSS_RTOL = 0.03  # final validation loss, dynamic vs fixed (the same rows, grouped and ordered differently)

_WORDS = ["the", "river", "stone", "cloud", "ember", "quill", "lumen", "garden", "castle", "meadow", "violin",
          "harbour", "teacher", "forest", "letter", "candle", "village", "mirror", "orchard", "tower", "kettle",
          "quiet", "golden", "narrow", "gentle", "distant", "bright", "watches", "remembers", "follows", "carries"]


def write_chat(path: Path, rows: int, seed: int) -> None:
    """``rows`` conversations (one user and one assistant turn) with a wide spread of lengths."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            answer = rng.choice([rng.randint(2, 12), rng.randint(12, 40), rng.randint(40, 160)])
            messages = [
                {"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 20))) + "?"},
                {"role": "assistant", "content": " ".join(rng.choice(_WORDS) for _ in range(answer)) + "."},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")


def run(name: str, tmp: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """Train one variant; its padding, real tokens/s and losses."""
    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    config = load_config(REPO / "configs" / "tiny.yaml", [
        f"run.output_dir={tmp / name}", f"data.sources=[{{path: '{tmp / 'chat.jsonl'}', chat: {{}}}}]",
        "data.packing=false", f"data.seq_len={args.seq_len}", f"model.max_seq_len={args.seq_len}",
        f"training.batch_size={args.batch_size}", f"training.max_steps={args.steps}", "training.num_epochs=100",
        "training.log_every=1", f"training.eval_every={args.steps}", "training.eval_batches=1000",
        "logging.tensorboard=false", "evaluation.sample_max_new_tokens=0",
        "data.val_fraction=0.05", f"scheduler.warmup_steps={max(args.steps // 10, 1)}", *extra,
    ])
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    summary = trainer.train()
    records = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    padded_total = real_total = 0.0
    rates = []
    previous = 0
    for r in train:
        padded = r["tokens"] - previous  # positions of the step (padding included)
        previous = r["tokens"]
        real = padded * (1.0 - r["data/padding"])
        padded_total, real_total = padded_total + padded, real_total + real
        if r["step"] > args.warmup:
            rates.append(r["tokens_per_s"] * (1.0 - r["data/padding"]))
    return {
        "padding": 1.0 - real_total / padded_total,
        "real_tokens": int(real_total),
        "real_tokens_per_s": statistics.median(rates),
        "train_loss_last10": statistics.fmean(r["lm_loss"] for r in train[-10:]),
        "val_loss": summary.final_val_loss,
        "steps": summary.steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run")
    parser.add_argument("--rows", type=int, default=1500, help="conversations in the chat file")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per fixed micro-batch")
    parser.add_argument("--seq-len", type=int, default=256, help="longest row (data.seq_len)")
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the tokens/s median")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("Ava").setLevel(logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        write_chat(tmp / "chat.jsonl", args.rows, seed=0)
        fixed = run("fixed", tmp, args, [])
        # a budget that holds as many real tokens per micro-batch as a fixed one does on average
        per_micro = fixed["real_tokens"] / (args.steps * args.batch_size) * args.batch_size
        budget = max(args.seq_len, int(round(per_micro * 1.02 / 8)) * 8)
        dynamic = run("dynamic", tmp, args, [f"data.max_tokens_per_batch={budget}"])

    print(f"chat rows: {args.rows}, seq_len {args.seq_len}, {args.steps} steps; fixed: {args.batch_size} rows per "
          f"micro-batch; dynamic: data.max_tokens_per_batch={budget}")
    print(f"{'':10}{'padding':>9}{'real tok/s':>12}{'real tokens':>13}{'train loss':>12}{'val loss':>10}")
    for name, r in (("fixed", fixed), ("dynamic", dynamic)):
        print(f"{name:10}{r['padding']:>9.1%}{r['real_tokens_per_s']:>12,.0f}{r['real_tokens']:>13,}"
              f"{r['train_loss_last10']:>12.4f}{r['val_loss']:>10.4f}")
    speed = dynamic["real_tokens_per_s"] / fixed["real_tokens_per_s"]
    val_rel = abs(dynamic["val_loss"] - fixed["val_loss"]) / fixed["val_loss"]
    print(f"dynamic ÷ fixed: padding {dynamic['padding'] / fixed['padding']:.3f}, real tokens/s {speed:.2f}×, "
          f"val loss {dynamic['val_loss'] / fixed['val_loss']:.4f} (|Δ| {val_rel:.2%}, tolerance {LOSS_RTOL:.0%}: "
          f"{'within' if val_rel <= LOSS_RTOL else 'OUTSIDE'})")
    if args.out:
        args.out.write_text(json.dumps({"fixed": fixed, "dynamic": dynamic, "budget": budget,
                                        "real_tokens_per_s_ratio": speed, "val_loss_rel_diff": val_rel,
                                        "tolerance": LOSS_RTOL, "args": {k: str(v) for k, v in vars(args).items()}},
                                       indent=2))


if __name__ == "__main__":
    main()
