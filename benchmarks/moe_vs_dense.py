"""MoE against a dense model of equal active parameters, at a longer horizon, on the demo corpus.

Three runs of ``configs/demo.yaml``'s corpus and schedule, same seed, data order and token count,
one after another in this process: the 8-expert top-2 MoE with the Switch aux loss, the same MoE
with the aux-loss-free bias (γ set for the run's length, ``--gamma``), and a dense model whose
SwiGLU has the MoE's active width (``top_k × moe_intermediate_size``). The model is narrower than
the demo's (``--hidden``, default 128) so that several epochs fit a CPU: ``--steps`` × 16 × 256
tokens (default 1,000 steps = 4.1M tokens, about 3 epochs of the corpus). Validation every
``--eval-every`` steps on the same held-out windows.

Prints the validation losses and MaxVio per run and, with ``--plot PNG``, draws the validation
curves in one chart.

    python benchmarks/moe_vs_dense.py --plot docs/img/moe_vs_dense_curves.png
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def variants(args: argparse.Namespace) -> dict[str, tuple[str, ...]]:
    """Run name -> config overrides on top of the common ones."""
    dense_width = 2 * args.moe_intermediate
    return {
        "MoE 8×top-2, aux loss": (),
        f"MoE 8×top-2, aux-free bias (γ = {args.gamma:g})": (
            "model.moe.aux_loss_coef=0", "model.moe.aux_free_bias=true",
            f"model.moe.bias_update_rate={args.gamma}"),
        "dense, same active parameters": (
            "model.moe.first_dense_layers=4", f"model.intermediate_size={dense_width}"),
    }


def run(name: str, overrides: tuple[str, ...], args: argparse.Namespace, out: Path) -> dict:
    """Train one variant; its validation rows and parameter counts."""
    from Ava.config import load_config
    from Ava.training import EnhancedModularTrainer

    common = (f"run.output_dir={out}", "run.name=run", f"model.hidden_size={args.hidden}",
              f"model.moe.moe_intermediate_size={args.moe_intermediate}", f"training.max_steps={args.steps}",
              "training.num_epochs=100", f"training.eval_every={args.eval_every}", "training.eval_batches=20",
              f"precision.dtype={args.dtype}", "evaluation.sample_max_new_tokens=0", "logging.progress_bar=false",
              "scheduler.warmup_steps=50")
    config = load_config(REPO / "configs" / "demo.yaml", [*common, *overrides])
    trainer = EnhancedModularTrainer.from_config(config)
    summary = trainer.train()
    rows = [json.loads(line) for line in (Path(summary.run_dir) / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r.get("split") == "val"]
    return {"name": name, "val": val, "tokens": summary.tokens, "seconds": summary.wall_time_s,
            "params": trainer.model.num_parameters(), "active": trainer.model.num_parameters(active_only=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="optimizer steps of 16 × 256 tokens")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--moe-intermediate", type=int, default=256)
    parser.add_argument("--gamma", type=float, default=1e-2, help="aux-free bias step γ")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--plot", default=None, metavar="PNG")
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, overrides) in enumerate(variants(args).items()):
            results.append(run(name, overrides, args, Path(tmp) / str(k)))
    steps = [r["step"] for r in results[0]["val"]]
    print(f"\n{args.steps} steps × 4,096 tokens = {results[0]['tokens']:,} tokens, hidden {args.hidden}, {args.dtype}")
    print("| run | parameters (active) | " + " | ".join(f"val loss @{s}" for s in steps[-3:]) + " | val MaxVio (last) | "
          "time |")
    print("|---|---|" + "---:|" * (len(steps[-3:]) + 2))
    for r in results:
        losses = " | ".join(f"{v['loss']:.3f}" for v in r["val"][-3:])
        vio = r["val"][-1].get("max_vio")
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M ({r['active'] / 1e6:.2f}M) | {losses} | "
              f"{'—' if vio is None else f'{vio:.2f}'} | {r['seconds'] / 60:.1f} min |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for r in results:
            ax.plot([v["step"] * 4096 / 1e6 for v in r["val"]], [v["loss"] for v in r["val"]], marker="o",
                    markersize=3, label=r["name"])
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("validation loss")
        ax.set_title(f"demo corpus, hidden {args.hidden}, 4 layers, {args.dtype}: MoE vs dense of equal active "
                     "parameters", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
