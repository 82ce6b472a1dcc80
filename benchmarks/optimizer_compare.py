"""Train configs/demo.yaml for the same number of steps with each optimizer (and a few schedules).

Reports final val loss, tokens/s and optimizer-state memory as a Markdown table (the one in
docs/optimizers.md). Every run uses the same seed, data order and step count; only the listed
keys change. The demo takes ~1 s/step on 2 CPU cores, so the default 60 steps × 8 runs is ~10 min.

    python benchmarks/optimizer_compare.py [--steps 60] [--only adamw,muon] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# name → overrides; learning rates follow each optimizer's published guidance relative to AdamW's
# 2e-3 (Lion/Sophia: ~3-10x smaller with sign-like updates; Adafactor: its lr is a relative step)
RUNS: dict[str, list[str]] = {
    "adamw + cosine": ["optimizer.name=adamw"],
    "lion + cosine": ["optimizer.name=lion", "training.learning_rate=3e-4", "optimizer.weight_decay=0.3"],
    "sophia + cosine": ["optimizer.name=sophia", "training.learning_rate=5e-4"],
    "adafactor + cosine": ["optimizer.name=adafactor", "training.learning_rate=1e-2", "optimizer.weight_decay=0.0"],
    "muon + cosine": ["optimizer.name=muon"],
    "adamw + wsd (1-sqrt)": ["scheduler.name=wsd", "scheduler.wsd_decay_shape=1-sqrt"],
    "adamw + inverse_sqrt": ["scheduler.name=inverse_sqrt"],
    "adamw + cosine, pcgrad": ["gradient.surgery.method=pcgrad"],
}


def run_one(name: str, overrides: list[str], steps: int, out_dir: Path) -> dict:
    """Train the demo config with ``overrides`` for ``steps`` steps; return its numbers."""
    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel
    from Ava.optimization import optimizer_state_bytes
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    config = load_config(REPO / "configs" / "demo.yaml", [
        f"training.max_steps={steps}", f"training.eval_every={steps}", "scheduler.warmup_steps=10",
        "evaluation.sample_max_new_tokens=0", "logging.progress_bar=false", "logging.tensorboard=false",
        f"run.output_dir={out_dir}", *overrides,
    ])
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    start = time.perf_counter()
    summary = trainer.train()
    return {
        "run": name, "overrides": overrides, "steps": summary.steps,
        "val_loss": summary.final_val_loss, "train_loss": summary.final_train_loss,
        "tokens_per_s": summary.tokens / (time.perf_counter() - start),
        "optimizer_state_mb": optimizer_state_bytes(trainer.optimizer) / 2**20,
        "params_mb": sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20,
    }


def step_times(repeats: int) -> str:
    """Optimizer-step time of each optimizer on the demo model, interleaved in one process.

    Whole-run tokens/s above comes from sequential runs, so machine noise hits each run
    differently; this table is the robust comparison: every optimizer steps its own copy of the
    demo model (same gradients) in round-robin, and the median step time is reported next to a
    forward+backward of one demo batch measured in the same rounds.
    """
    import copy
    import statistics

    import torch

    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel
    from Ava.optimization import build_optimizer

    config = load_config(REPO / "configs" / "demo.yaml", check_environment=False)
    torch.manual_seed(0)
    base = EnhancedMoEModel(config.model)
    ids = torch.randint(0, config.model.vocab_size, (config.training.batch_size, config.data.seq_len))
    base(ids, labels=ids).loss.backward()
    names = ["adamw", "lion", "sophia", "adafactor", "muon"]
    models = {n: copy.deepcopy(base) for n in names}
    for model in models.values():  # deepcopy does not carry .grad: give every copy the same gradients
        for p, ref in zip(model.parameters(), base.parameters()):
            p.grad = ref.grad.clone()
    optimizers = {n: build_optimizer(models[n], config.optimizer.model_copy(update={"name": n}),
                                     config.training.learning_rate, torch.device("cpu")) for n in names}
    times: dict[str, list[float]] = {n: [] for n in ["forward+backward", *names]}
    for round_ in range(repeats + 1):  # round 0 warms up (allocates optimizer state)
        start = time.perf_counter()
        base(ids, labels=ids).loss.backward()  # accumulates; only its time is used
        fwd_bwd = time.perf_counter() - start
        for n in names:
            start = time.perf_counter()
            optimizers[n].step()
            elapsed = time.perf_counter() - start
            if round_:
                times[n].append(elapsed)
        if round_:
            times["forward+backward"].append(fwd_bwd)
    ref = statistics.median(times["forward+backward"])
    adamw = statistics.median(times["adamw"])
    lines = [f"median of {repeats} interleaved rounds; demo model, batch {tuple(ids.shape)}",
             "| optimizer | step ms | ÷ AdamW step | ÷ forward+backward |", "|---|---:|---:|---:|"]
    for n, values in times.items():
        med = statistics.median(values)
        lines.append(f"| {n} | {med * 1e3:.1f} | {med / adamw:.2f} | {med / ref:.3f} |")
    return "\n".join(lines)


def table(results: list[dict]) -> str:
    """The Markdown table of ``results``."""
    lines = ["| run | val loss | train loss | tokens/s | optimizer state (MB) |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['run']} | {r['val_loss']:.3f} | {r['train_loss']:.3f} | {r['tokens_per_s']:,.0f} "
                     f"| {r['optimizer_state_mb']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--only", default=None, help="comma-separated prefixes of run names")
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    parser.add_argument("--step-times-only", action="store_true",
                        help="only the interleaved optimizer-step timing (about a minute)")
    parser.add_argument("--repeats", type=int, default=10, help="rounds of the step timing")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(step_times(args.repeats), flush=True)
    if args.step_times_only:
        return
    runs = {k: v for k, v in RUNS.items()
            if args.only is None or any(k.startswith(p) for p in args.only.split(","))}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs.items():
            results.append(run_one(name, overrides, args.steps, Path(tmp)))
            print(f"{name}: val {results[-1]['val_loss']:.3f}  {results[-1]['tokens_per_s']:,.0f} tok/s", flush=True)
    print(table(results))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
