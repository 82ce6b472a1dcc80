"""Data throughput: ``ava prepare`` tokens/s ÷ raw HF ``tokenizers`` ``encode_batch`` tokens/s.

Part 1 builds a synthetic but realistic corpus (``--mb`` MB of JSONL documents cut from the
embedded Shakespeare corpus at line boundaries, 2–30 KB each, shuffled and repeated; two
sources) in a temporary folder, trains one byte-level BPE on it and saves it, then measures in
the same process, interleaved for ``--repeats`` rounds (medians reported):

- reference: ``tokenizers.Tokenizer.encode_batch`` over the same texts, held in memory, in
  calls of ``prepare.CHUNK_CHARS`` characters (one call over all of them needs GBs for the
  ``Encoding`` objects); ``encode_batch_fast`` (no offsets) is shown for information;
- ``write_prepared``: tokenizing + packing + writing shards from documents already in memory,
  for each ``--workers`` value;
- ``prepare_corpus``: the whole ``ava prepare`` minus tokenizer training: reading the JSONL
  files, splitting, loading the tokenizer, tokenizing and writing.

Rates count the same content tokens (EOS excluded) for every line; the goal is
``prepare_corpus ÷ encode_batch ≥ 0.7``.

Part 2 (``--trainer``): the share of the training step spent waiting for data, from
``logging.time_breakdown`` (``time_data`` ÷ the sum of the data/forward/backward/optimizer
phases in ``metrics.jsonl``), for ``configs/demo.yaml`` with ``--steps`` steps, once with the
in-memory data and once from a folder written by ``prepare_corpus`` (goal < 1%). The first
logged window (iterator start-up) is left out of the steady-state share.

    python benchmarks/data_throughput.py                    # 30 MB, 3 rounds
    python benchmarks/data_throughput.py --mb 50 --repeats 5
    python benchmarks/data_throughput.py --trainer --steps 60
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from Ava.config import DataConfig
from Ava.data import prepare
from Ava.data.corpus import embedded_corpus
from Ava.data.pipeline import collect_documents
from Ava.data.records import DataReport
from Ava.data.prepare import prepare_corpus, write_prepared
from Ava.data.tokenizer import AvaTokenizer

GOAL_RATIO = 0.7
GOAL_DATA_SHARE = 0.01
SEED = 1234


def make_corpus(folder: Path, megabytes: float, seed: int) -> dict[str, list[str]]:
    """Write two JSONL sources of documents cut from the embedded corpus; returns their texts."""
    rng = random.Random(seed)
    pieces: list[str] = []
    for doc in embedded_corpus():
        lines = doc.text.splitlines(keepends=True)
        i = 0
        while i < len(lines):
            target, size, j = rng.randint(2_000, 30_000), 0, i
            while j < len(lines) and size < target:
                size += len(lines[j])
                j += 1
            pieces.append("".join(lines[i:j]))
            i = j
    texts: list[str] = []
    chars = 0
    while chars < megabytes * 1e6:
        rng.shuffle(pieces)
        for piece in pieces:
            texts.append(piece)
            chars += len(piece)
            if chars >= megabytes * 1e6:
                break
    sources = {"books": texts[: len(texts) * 3 // 4], "notes": texts[len(texts) * 3 // 4:]}
    for name, group in sources.items():
        (folder / name).mkdir(parents=True)
        per_file = -(-len(group) // 4)
        for f in range(4):
            with open(folder / name / f"part-{f}.jsonl", "w", encoding="utf-8") as out:
                for text in group[f * per_file:(f + 1) * per_file]:
                    out.write(json.dumps({"text": text}) + "\n")
    return sources


def chunked(texts: list[str], chunk_chars: int) -> list[list[str]]:
    chunks, chunk, chars = [], [], 0
    for text in texts:
        chunk.append(text)
        chars += len(text)
        if chars >= chunk_chars:
            chunks.append(chunk)
            chunk, chars = [], 0
    return chunks + ([chunk] if chunk else [])


def reference(encode: Callable, chunks: list[list[str]]) -> int:
    """Content tokens of one pass of ``encode`` (an HF ``encode_batch`` variant) over the chunks."""
    return sum(len(e) for chunk in chunks for e in encode(chunk, add_special_tokens=False))


def timed(fn: Callable[[], int]) -> tuple[float, int]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def throughput(args: argparse.Namespace, work: Path) -> None:
    print(f"building a {args.mb:g} MB corpus in {work} ...", flush=True)
    sources = make_corpus(work / "corpus", args.mb, SEED)
    texts = [t for group in sources.values() for t in group]
    tok_start = time.perf_counter()
    tokenizer = AvaTokenizer.train(texts[: max(1, len(texts) // 5)], vocab_size=8192)
    tok_path = tokenizer.save(work / "tokenizer.json")
    print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} MB of text; tokenizer trained in "
          f"{time.perf_counter() - tok_start:.1f} s (vocab {tokenizer.vocab_size})")

    data = DataConfig(
        sources=[{"path": str(work / "corpus" / name / "*.jsonl"), "name": name, "weight": w}
                 for name, w in (("books", 3.0), ("notes", 1.0))],
        tokenizer={"path": str(tok_path)}, val_fraction=0.01,
    )
    split_docs = collect_documents(data, SEED, DataReport())
    hf = tokenizer.tokenizer  # encode_special_tokens=True, as Ava encodes
    chunks = chunked(texts, prepare.CHUNK_CHARS)

    def run_write(workers: int) -> Callable[[], int]:
        def go() -> int:
            m = write_prepared(work / f"w{workers}", split_docs, tokenizer, workers=workers, overwrite=True,
                               progress=False)
            return m["totals"]["tokens"] - m["totals"]["documents"]
        return go

    def run_prepare() -> int:
        m = prepare_corpus(data, work / "prepared", SEED, workers=args.workers[0] if len(args.workers) == 1 else None,
                           profile=False, overwrite=True, progress=False)
        return m["totals"]["tokens"] - m["totals"]["documents"]

    variants: dict[str, Callable[[], int]] = {
        "HF encode_batch (reference)": lambda: reference(hf.encode_batch, chunks),
        "HF encode_batch_fast (no offsets)": lambda: reference(hf.encode_batch_fast, chunks),
        **{f"write_prepared, workers={w}": run_write(w) for w in args.workers},
        "prepare_corpus (read+split+tokenize+write)": run_prepare,
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    counts: dict[str, int] = {}
    names = list(variants)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate, so drift hits all alike
        for name in order:
            seconds, tokens = timed(variants[name])
            samples[name].append(seconds)
            counts[name] = tokens
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(
            f"{n.split(' (')[0]} {counts[n] / samples[n][-1] / 1e6:.2f}M/s" for n in names), flush=True)
    if len(set(counts.values())) != 1:
        raise SystemExit(f"token counts differ between variants: {counts}")

    ref = counts[names[0]] / statistics.median(samples[names[0]])
    print(f"\ncontent tokens per pass: {counts[names[0]]:,}; median of {args.repeats} rounds")
    print(f"{'variant':<46} {'seconds':>8} {'M tokens/s':>11} {'÷ ref':>7}")
    for name in names:
        rate = counts[name] / statistics.median(samples[name])
        print(f"{name:<46} {statistics.median(samples[name]):8.2f} {rate / 1e6:11.3f} {rate / ref:7.2f}")
    rate = {name: counts[name] / statistics.median(samples[name]) for name in names}
    ratio = rate[names[-1]] / ref
    print(f"\nprepare_corpus ÷ encode_batch = {ratio:.2f} (goal ≥ {GOAL_RATIO}): "
          + ("OK" if ratio >= GOAL_RATIO else "BELOW GOAL")
          + f"; ÷ encode_batch_fast = {rate[names[-1]] / rate[names[1]]:.2f}")


def data_share(metrics_file: Path) -> tuple[float, float, int]:
    """(steady-state share, share over all windows, windows) of time_data in the step phases."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time_data" in r]
    if not rows:
        raise SystemExit(f"{metrics_file} has no time_data: is logging.time_breakdown on?")

    def share(selected: list[dict]) -> float:
        data = sum(r["time_data"] for r in selected)
        total = sum(r[f"time_{p}"] for r in selected for p in ("data", "forward", "backward", "optimizer"))
        return data / total

    return share(rows[1:] or rows), share(rows), len(rows)


def trainer(args: argparse.Namespace, work: Path) -> None:
    from Ava.config import load_config
    from Ava.models import EnhancedMoEModel
    from Ava.training import EnhancedModularTrainer
    from Ava.training.run_manager import seed_everything

    overrides = [
        f"training.max_steps={args.steps}", "logging.time_breakdown=true", f"run.output_dir={work / 'runs'}",
        "training.eval_every=1000000", "logging.tensorboard=false", "logging.progress_bar=false",
        f"training.log_every={max(1, args.steps // 6)}", f"scheduler.warmup_steps={max(1, args.steps // 4)}",
        "logging.level=WARNING",
    ] + list(args.override)
    base = load_config(args.config, overrides)
    prepared = work / "demo-prepared"
    start = time.perf_counter()
    prepare_corpus(base.data, prepared, base.run.seed, profile=False, progress=False)
    print(f"prepared {args.config}'s data in {time.perf_counter() - start:.1f} s -> {prepared}")

    results = []
    for label, extra in (("in-memory", []), ("prepared shards", [f"data.prepared={prepared}"])):
        config = load_config(args.config, overrides + extra + [f"run.name=bench_{len(results)}"])
        seed_everything(config.run.seed)
        summary = EnhancedModularTrainer(EnhancedMoEModel(config.model), config).train()
        steady, overall, windows = data_share(Path(summary.run_dir) / "metrics.jsonl")
        results.append((label, steady, overall, windows, summary.tokens_per_second))
        print(f"{label}: {summary.steps} steps, final val loss {summary.final_val_loss:.4f}", flush=True)
    import torch

    device = base.run.device if base.run.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"\n{args.config}, {args.steps} steps on {device}; data wait ÷ step time "
          "(time_data ÷ Σ time_{data,forward,backward,optimizer})")
    print(f"{'data':<18} {'steady state':>12} {'all windows':>12} {'windows':>8} {'tokens/s':>10}")
    for label, steady, overall, windows, tps in results:
        print(f"{label:<18} {steady:12.3%} {overall:12.3%} {windows:8d} {tps:10,.0f}")
    worst = max(r[1] for r in results)
    print(f"\nsteady-state data wait ≤ {worst:.3%} (goal < {GOAL_DATA_SHARE:.0%}): "
          + ("OK" if worst < GOAL_DATA_SHARE else "ABOVE GOAL"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=30.0, help="corpus size in MB of text (default 30)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2],
                        help="write_prepared workers to compare, comma-separated (default 1,2)")
    parser.add_argument("--trainer", action="store_true", help="also measure the trainer's data-wait share")
    parser.add_argument("--only-trainer", action="store_true", help="only the trainer part")
    parser.add_argument("--config", default="configs/demo.yaml", help="config of the trainer part")
    parser.add_argument("--steps", type=int, default=60, help="training steps per trainer run (default 60)")
    parser.add_argument("--override", action="append", default=[], metavar="key=value",
                        help="extra override for the trainer runs (repeatable), e.g. run.device=cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="ava-data-bench-") as tmp:
        if not args.only_trainer:
            throughput(args, Path(tmp))
        if args.trainer or args.only_trainer:
            trainer(args, Path(tmp))


if __name__ == "__main__":
    main()
