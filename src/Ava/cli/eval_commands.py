"""``ava eval``: its parser and plain function.

Registered by :func:`add_commands` from :func:`Ava.cli.main.build_parser`.
"""

from __future__ import annotations

import argparse
import sys

from .arg_types import non_negative_int, positive_int
from .generation_commands import _add_no_verify, _greedy_completion, check_device


def cmd_eval(args: argparse.Namespace) -> int:
    """``ava eval RUN_DIR|CKPT [--data FILE ...] [--mc FILE] [--out DIR]``."""
    from ..data.records import plural
    from ..evaluation import run_evaluation

    check_device(args.device)
    report = run_evaluation(
        args.path, data=args.data, mc_file=args.mc, out=args.out, max_tokens=args.max_tokens,
        num_samples=args.samples, sample_max_new_tokens=args.sample_tokens, device=args.device,
        sample_fn=_greedy_completion, verify=not args.no_verify,
    )
    for name, source in report.results["sources"].items():
        print(f"{name}: loss {source['loss']:.4f}  ppl {source['perplexity']:.2f}  ({_counts(source)})")
    if report.results.get("calibration"):
        print(f"ECE {report.results['calibration']['ece']:.4f}")
    mc = report.results.get("multiple_choice")
    if mc:
        print(f"multiple choice ({plural(mc['questions'], 'question')}): "
              + "  ".join(f"{metric} {mc[metric]:.4f}" for metric in ("acc", "acc_norm", "acc_per_token")))
        if mc["truncated_choices"]:
            print(f"warning: {plural(mc['truncated_choices'], 'choice')} did not fit the model's window "
                  f"(max_seq_len {mc['max_seq_len']}) with the question; scored with the question cut from the left",
                  file=sys.stderr)
    print(f"report: {report.json_path} and {report.markdown_path}")
    return 0


def _counts(source: dict) -> str:
    """``12,345 tokens, 3 of 40 documents`` (the documents the scored tokens reach into)."""
    from ..data.records import plural

    tokens = f"{source['tokens']:,} token{'' if source['tokens'] == 1 else 's'}"
    used, total = source.get("documents"), source.get("documents_total")
    if used is None:
        return tokens
    if total is None or total == used:
        return f"{tokens}, {plural(used, 'document')}"
    return f"{tokens}, {used:,} of {plural(total, 'document')}"


def add_commands(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Register ``eval`` on the ``ava`` subparsers."""
    ev = sub.add_parser("eval", parents=[common], help="loss, perplexity, expert use, calibration, MC accuracy",
                        description="Score a checkpoint: loss/perplexity, expert use and calibration on the --data "
                                    "files (default: the run's validation split), and multiple-choice accuracy "
                                    "(acc, acc_norm, acc_per_token as lm-evaluation-harness defines them) on --mc. "
                                    "With --mc alone only the questions are scored. See docs/evaluation.md.")
    ev.add_argument("path", help="run folder, checkpoint folder or Ava model folder")
    ev.add_argument("--data", nargs="+", default=None, metavar="FILE",
                    help=".txt/.jsonl files (one source each; default: the run's validation split, unless --mc is given)")
    ev.add_argument("--mc", default=None, metavar="FILE", help="multiple-choice JSONL, one {question, choices, answer} per line "
                         "(answer: index or choice text); checked before any scoring")
    ev.add_argument("--out", default=None, help="folder for eval_report.json and eval_report.md (default: CHECKPOINT/eval, "
                         "a folder eval inside the evaluated checkpoint folder)")
    ev.add_argument("--max-tokens", type=positive_int, default=200_000, help="tokens scored per source at most")
    ev.add_argument("--samples", type=non_negative_int, default=3, help="generation samples in the report")
    ev.add_argument("--sample-tokens", type=positive_int, default=48, help="tokens per generation sample")
    ev.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    _add_no_verify(ev)
    ev.set_defaults(func=cmd_eval)
