"""Forgetting with and without episodic replay: train on domain A, then on domain B.

Two synthetic domains are written by the script (no downloads): A is English-like prose from a
small word list, B is arithmetic (``417 + 26 = 443``). One byte-level BPE tokenizer is trained
on both. Each variant trains a tiny MoE (configs/tiny.yaml's shape) with the trainer's own
``train_step``: ``--steps-a`` steps of domain-A windows, then ``--steps-b`` steps of domain-B
windows, the same windows in the same order for every variant (same process, same seeds). The
replay variants turn on ``memory`` (only its keys differ). Reported per variant: held-out
domain-A loss after phase A and after phase B (the difference is the forgetting), domain-B loss
after phase B, both as ratios to the run without replay, and how many domain-A rows the memory
holds during phase B and how many of the rows replayed during phase B were domain-A rows.

    python benchmarks/episodic_memory.py [--seed 0] [--steps-a 300] [--steps-b 300] [--only none,loss] [--out r.json]

The default (5 variants × 600 steps of 8 × 64 tokens) takes about 1.5 minutes on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

# variant → memory overrides (none = no replay); every other key is shared
VARIANTS: dict[str, list[str]] = {
    "none": ["memory.enabled=false"],
    "loss": ["memory.score=loss", "memory.retrieval=importance"],
    "surprise": ["memory.score=surprise", "memory.retrieval=importance"],
    "grad_norm": ["memory.score=grad_norm", "memory.retrieval=importance"],
    "loss + cosine": ["memory.score=loss", "memory.retrieval=cosine"],
}

_NOUNS = ["sailor", "garden", "river", "lantern", "merchant", "window", "castle", "meadow", "violin", "harbour",
          "teacher", "forest", "letter", "candle", "village", "mirror", "orchard", "pilgrim", "tower", "kettle"]
_ADJECTIVES = ["old", "quiet", "golden", "narrow", "gentle", "distant", "bright", "weary", "hollow", "crimson"]
_VERBS = ["watches", "remembers", "follows", "carries", "praises", "forgets", "admires", "visits", "guards", "paints"]


def prose(rng: random.Random, sentences: int) -> str:
    """Domain A: English-like sentences (lowercase words, commas, full stops)."""
    out = []
    for _ in range(sentences):
        words = (f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
                 f"the {rng.choice(_NOUNS)}")
        if rng.random() < 0.4:
            words += f", and the {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
        out.append(words + ".")
    return " ".join(out)


def arithmetic(rng: random.Random, lines: int) -> str:
    """Domain B: correct sums, differences and products of small numbers, one per line."""
    out = []
    for _ in range(lines):
        a, b = rng.randint(0, 999), rng.randint(0, 99)
        op = rng.choice("+-*")
        out.append(f"{a} {op} {b} = {a + b if op == '+' else a - b if op == '-' else a * b}")
    return "\n".join(out)


def write_domains(folder: Path, seed: int) -> dict[str, dict[str, str]]:
    """Training documents of both domains under ``folder/{a,b}/`` and a held-out text of each."""
    rng = random.Random(seed)
    texts = {"a": {"val": prose(rng, 300)}, "b": {"val": arithmetic(rng, 600)}}
    for name, make, size in (("a", prose, 400), ("b", arithmetic, 800)):
        (folder / name).mkdir(parents=True, exist_ok=True)
        docs = [make(rng, size) for _ in range(8)]
        for i, doc in enumerate(docs):
            (folder / name / f"doc{i}.txt").write_text(doc, encoding="utf-8")
        texts[name]["train"] = "\n".join(docs)
    return texts


def windows(ids: list[int], seq_len: int) -> torch.Tensor:
    """(N, seq_len) consecutive windows of ``ids``."""
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).reshape(n, seq_len)


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, val_NT: torch.Tensor, batch: int) -> float:
    """Mean next-token loss over the held-out windows (eval mode)."""
    model.eval()
    losses = [float(model(val_NT[i:i + batch], labels=val_NT[i:i + batch]).lm_loss)
              for i in range(0, len(val_NT), batch)]
    model.train()
    return sum(losses) / len(losses)


def run_variant(name: str, overrides: list[str], common: list[str], data, splits: dict[str, dict[str, torch.Tensor]],
                steps_a: int, steps_b: int, bar) -> dict:
    """Train one variant on A then B; return its losses."""
    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    config = load_config(REPO / "configs" / "tiny.yaml", [*common, f"training.max_steps={steps_a + steps_b}",
                                                          *overrides])
    seed_everything(config.run.seed)
    trainer = EnhancedModularTrainer(EnhancedMoEModel(config.model), config)
    trainer.prepare(data)
    batch = config.training.batch_size
    order = torch.Generator().manual_seed(config.run.seed)  # the same windows, in the same order, for every variant
    result: dict = {"variant": name, "memory": overrides}
    replayed = 0
    memory = trainer.memory
    a_rows: dict[int, int] = {}  # domain-A rows in the memory after B step k
    for source, (phase, steps) in enumerate((("a", steps_a), ("b", steps_b))):  # source ids: data.sources order
        train_NT = splits[phase]["train"]
        for _ in range(steps):
            ids = train_NT[torch.randint(0, len(train_NT), (batch,), generator=order)]
            rows = {"input_ids": ids, "labels": ids, "source": torch.full((batch,), source, dtype=torch.long)}
            metrics = trainer.train_step([rows])
            replayed += int(metrics.get("memory/replayed", 0))
            if phase == "b" and memory is not None:
                a_rows[len(a_rows) + 1] = int((memory.store.source_N == 0).sum())
            bar.update(1)
        if phase == "a":  # tokens of source a drawn from here on are replayed domain-A rows
            a_tokens_after_a, replayed_in_a = trainer.feed.source_tokens.get("a", 0), replayed
        result[f"a_loss_after_{phase}"] = held_out_loss(trainer.model, splits["a"]["val"], batch)
        result[f"b_loss_after_{phase}"] = held_out_loss(trainer.model, splits["b"]["val"], batch)
    result["forgetting"] = result["a_loss_after_b"] - result["a_loss_after_a"]
    result["replayed_rows"] = replayed
    result["replayed_rows_in_b"] = replayed - replayed_in_a
    result["replayed_a_rows_in_b"] = (trainer.feed.source_tokens.get("a", 0) - a_tokens_after_a) // splits["a"]["train"].shape[1]
    result["a_rows_in_memory"] = a_rows
    result["a_rows_gone_at_b_step"] = next((k for k, n in a_rows.items() if n == 0), None)
    result["memory_size"] = len(memory.store) if memory is not None else 0
    return result


def _a_rows(result: dict, steps_b: int) -> str:
    counts = result["a_rows_in_memory"]
    return " / ".join(str(counts.get(k, 0)) for k in sorted({min(k, steps_b) for k in (1, 10, 50, steps_b)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-a", type=int, default=300, help="optimizer steps on domain A")
    parser.add_argument("--steps-b", type=int, default=300, help="optimizer steps on domain B, after A")
    parser.add_argument("--capacity", type=int, default=256, help="memory.capacity of the replay variants")
    parser.add_argument("--replay-ratio", type=float, default=0.25, help="memory.replay_ratio of the replay variants")
    parser.add_argument("--only", default=None, help=f"comma-separated variants of {', '.join(VARIANTS)}")
    parser.add_argument("--seed", type=int, default=0, help="run.seed: initial weights, window order, sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    from Ava.data import prepare_data
    from Ava.config import load_config
    from Ava.utils.output_paths import check_output_file
    from Ava.utils.progress import progress_bar

    if args.out is not None:
        check_output_file(args.out, "--out")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    names = list(VARIANTS) if args.only is None else [n.strip() for n in args.only.split(",")]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        texts = write_domains(folder, seed=0)
        common = [f"run.output_dir={folder / 'runs'}", f"run.seed={args.seed}", "evaluation.sample_max_new_tokens=0",
                  "gradient.health.enabled=false",  # the switch to domain B is a loss jump on purpose
                  "scheduler.name=constant", "scheduler.warmup_steps=10", "training.grad_clip=1.0",
                  "data.val_fraction=0.0", f"memory.capacity={args.capacity}",
                  f"memory.replay_ratio={args.replay_ratio}", "memory.enabled=true"]
        config = load_config(REPO / "configs" / "tiny.yaml", [
            *common, f"data.sources=[{{path: {folder / 'a'}, name: a}}, {{path: {folder / 'b'}, name: b}}]"])
        common.append(f"data.sources=[{{path: {folder / 'a'}, name: a}}, {{path: {folder / 'b'}, name: b}}]")
        data = prepare_data(config.data, config.run.seed, folder / "tokenizer.json")
        seq_len = config.data.seq_len
        splits = {name: {split: windows(data.tokenizer.encode(text), seq_len) for split, text in parts.items()}
                  for name, parts in texts.items()}
        for name in splits:
            splits[name]["val"] = splits[name]["val"][:32]
        results = []
        with progress_bar(len(names) * (args.steps_a + args.steps_b), "episodic memory", "step") as bar:
            for name in names:
                results.append(run_variant(name, VARIANTS[name], common, data, splits,
                                           args.steps_a, args.steps_b, bar))

    base = next((r for r in results if r["variant"] == "none"), None)
    print(f"A then B: {args.steps_a} + {args.steps_b} steps of 8 × {seq_len} tokens; memory.capacity={args.capacity}, "
          f"memory.replay_ratio={args.replay_ratio}, run.seed={args.seed}; held-out loss (nats/token)\n")
    print("| replay (memory.score, retrieval) | A after A | A after B | forgetting | B after B | "
          "A after B vs none | B after B vs none | A rows in memory after B steps 1 / 10 / 50 / end | "
          "A rows replayed in B |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        vs_a = f"{r['a_loss_after_b'] / base['a_loss_after_b']:.3f}" if base else "n/a"
        vs_b = f"{r['b_loss_after_b'] / base['b_loss_after_b']:.3f}" if base else "n/a"
        print(f"| {r['variant']} | {r['a_loss_after_a']:.3f} | {r['a_loss_after_b']:.3f} | {r['forgetting']:+.3f} | "
              f"{r['b_loss_after_b']:.3f} | {vs_a} | {vs_b} | "
              f"{_a_rows(r, args.steps_b) + ' of ' + str(r['memory_size']) if r['memory_size'] else 'n/a'} | "
              f"{r['replayed_a_rows_in_b']} of {r['replayed_rows_in_b']} |")
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
