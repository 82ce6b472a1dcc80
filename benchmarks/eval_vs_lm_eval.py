"""``ava eval --mc`` against EleutherAI's lm-evaluation-harness on the same questions and model.

A tiny model (``configs/tiny.yaml``) is trained on a generated play-like corpus (or ``--run`` names
an existing run), exported to a Hugging Face folder in fp32 (``ava export --dtype fp32``), and the
same multiple-choice JSONL is scored twice: by Ava (:func:`Ava.evaluation.run_evaluation`) on the
checkpoint, and by the harness (``lm_eval --model hf``, the task of docs/evaluation.md) on the
export. Printed: both sides' ``acc`` and ``acc_norm``, how many items pick the same choice per
metric, and the largest difference between the two sides' per-choice log-likelihoods.

The harness is not an Ava dependency. Install ``lm-eval[hf]`` next to Ava's torch (for example a
venv whose ``.pth`` adds Ava's site-packages, so pip finds torch there and does not install
another) and pass its ``lm_eval`` with ``--lm-eval``.

    python benchmarks/eval_vs_lm_eval.py --lm-eval /tmp/lmeval-venv/bin/lm_eval
    python benchmarks/eval_vs_lm_eval.py --lm-eval lm_eval --run runs/demo_<time> --questions 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

_SPEAKERS = ["ROMEO", "JULIET", "HAMLET", "OPHELIA", "KING", "QUEEN", "FOOL", "PORTIA"]
_SUBJECTS = ["The king", "My lord", "The queen", "Thy father", "The night", "This heart", "The moon", "A fool"]
_VERBS = ["loves", "fears", "speaks of", "dreams of", "waits for", "remembers", "calls", "follows"]
_OBJECTS = ["the stars", "his brother", "a gentle rose", "the cold grave", "thy fair face",
            "the bitter wind", "our good name", "the silver light", "a poor soul", "the old tower"]

TASK_YAML = """task: ava_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {questions}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def write_corpus(path: Path, seed: int = 0, speeches: int = 600) -> None:
    """A play-like text from the word lists above (the model learns their order)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(speeches):
        sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}."
        lines.append(f"{rng.choice(_SPEAKERS)}:\n{sentence}\n")
    path.write_text("\n".join(lines), encoding="utf-8")


def write_questions(path: Path, count: int, seed: int = 1) -> None:
    """``count`` questions: a speaker and a sentence start; four objects as choices, one the answer.

    Choices of different lengths (characters and tokens) make ``acc`` and ``acc_norm`` differ.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        question = f"{rng.choice(_SPEAKERS)}:\n{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)}"
        choices = rng.sample(_OBJECTS, 4)
        if rng.random() < 0.5:
            choices[rng.randrange(4)] += " and the sea"
        rows.append({"question": question, "choices": choices, "answer": rng.randrange(4)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def train_tiny(work: Path) -> Path:
    """Train configs/tiny.yaml on the generated corpus; returns the run folder."""
    from Ava.config import load_config
    from Ava.training import EnhancedModularTrainer

    corpus = work / "corpus.txt"
    write_corpus(corpus)
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text(encoding="utf-8"))
    raw["data"]["sources"] = [{"path": str(corpus)}]
    raw["data"]["val_fraction"] = 0
    raw["run"]["output_dir"] = str(work / "runs")
    config_file = work / "tiny_bench.yaml"
    config_file.write_text(yaml.safe_dump(raw), encoding="utf-8")
    summary = EnhancedModularTrainer.from_config(load_config(config_file)).train()
    return Path(summary.run_dir)


def run_lm_eval(lm_eval: str, hf_dir: Path, questions: Path, work: Path) -> tuple[dict, list[dict]]:
    """The harness's ``results["ava_mc"]`` and its logged samples."""
    task_dir = work / "mc_task"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "ava_mc.yaml").write_text(TASK_YAML.format(questions=questions), encoding="utf-8")
    out = work / "lm_eval_out"
    cmd = [lm_eval, "--model", "hf", "--model_args", f"pretrained={hf_dir},dtype=float32",
           "--include_path", str(task_dir), "--tasks", "ava_mc", "--device", "cpu", "--batch_size", "1",
           "--output_path", str(out), "--log_samples"]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                                         "TOKENIZERS_PARALLELISM": "false"})
    def newest(pattern: str) -> Path:
        return max(out.rglob(pattern), key=lambda p: p.stat().st_mtime)

    results = json.loads(newest("results_*.json").read_text())
    samples = [json.loads(line) for line in newest("samples_ava_mc_*.jsonl").read_text().splitlines()]
    return results["results"]["ava_mc"], sorted(samples, key=lambda s: s["doc_id"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm-eval", required=True, help="the harness's lm_eval executable")
    parser.add_argument("--run", default=None, help="a run folder to use (default: train configs/tiny.yaml)")
    parser.add_argument("--questions", type=int, default=100, help="generated questions (default 100)")
    parser.add_argument("--work", default=None, help="folder for the run, export and outputs (default: a temp one)")
    args = parser.parse_args()

    from Ava.evaluation import run_evaluation
    from Ava.interop import export_hf

    work = Path(args.work or tempfile.mkdtemp(prefix="ava_eval_vs_lm_eval_")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    run = Path(args.run) if args.run else train_tiny(work)
    questions = work / "questions.jsonl"
    write_questions(questions, args.questions)
    hf_dir = work / "hf_model"
    export_hf(run, hf_dir, dtype="fp32")

    ava = run_evaluation(run, mc_file=questions, out=work / "ava_report", num_samples=0).results["multiple_choice"]
    harness, samples = run_lm_eval(args.lm_eval, hf_dir, questions, work)

    same = {"acc": 0, "acc_norm": 0}
    worst = 0.0
    for item, sample in zip(ava["items"], samples, strict=True):
        lls = [float(r[0]) for r in sample["filtered_resps"]]
        chars = [len(c) for c in sample["doc"]["choices"]]
        harness_pick = {"acc": max(range(len(lls)), key=lambda i: (lls[i], -i)),
                        "acc_norm": max(range(len(lls)), key=lambda i: (lls[i] / chars[i], -i))}
        for metric in same:
            same[metric] += harness_pick[metric] == item["predicted"][metric]
        worst = max(worst, max(abs(a - b) for a, b in zip(item["loglikelihoods"], lls)))
    n = len(samples)
    print(f"\n{n} questions, model {run}")
    print(f"{'metric':<14} {'Ava':>16} {'lm-eval':>16} {'same pick':>10}")
    for metric in ("acc", "acc_norm"):
        ours = f"{ava[metric]:.4f} ± {ava[metric + '_stderr']:.4f}"
        theirs = f"{harness[metric + ',none']:.4f} ± {harness[metric + '_stderr,none']:.4f}"
        print(f"{metric:<14} {ours:>16} {theirs:>16} {same[metric]:>6}/{n}")
    ours = f"{ava['acc_per_token']:.4f} ± {ava['acc_per_token_stderr']:.4f}"
    print(f"{'acc_per_token':<14} {ours:>16} {'(none)':>16}")
    print(f"largest |Δ log-likelihood| of a choice: {worst:.2e} nats")
    return 0 if all(v == n for v in same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
