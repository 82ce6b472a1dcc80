"""The markdown view of an evaluation report (the JSON one is the dict itself)."""

from __future__ import annotations

from typing import Any

from ..data.records import plural


_MC_METRICS = {
    "acc": "summed log-likelihood of the choice (lm-evaluation-harness `acc`)",
    "acc_norm": "summed log-likelihood ÷ characters of the choice (lm-evaluation-harness `acc_norm`)",
    "acc_per_token": "mean log-likelihood per token of the choice",
}


def _documents(source: dict[str, Any]) -> str:
    """``12`` or, when ``--max-tokens`` cut the source short, ``12 of 40``."""
    used, total = source.get("documents"), source.get("documents_total")
    if used is None:
        return "" if total is None else str(total)
    return f"{used:,}" if total is None or total == used else f"{used:,} of {total:,}"


def write_markdown(results: dict[str, Any]) -> str:
    """Render :func:`~Ava.evaluation.run_evaluation`'s results as markdown.

    Args:
        results: the report dict (``sources``, ``calibration``, ``experts``, optional
            ``multiple_choice``, ``samples``).

    Returns:
        The markdown text.
    """
    lines = [f"# Evaluation of `{results['checkpoint']}`"]
    if results["sources"]:
        lines += ["", "## Loss and perplexity", "",
                  "| source | documents | tokens | loss | perplexity | top-1 accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in results["sources"].items():
        lines.append(f"| {name} | {_documents(s)} | {s['tokens']:,} | {s['loss']:.4f} | "
                     f"{s['perplexity']:.2f} | {s['accuracy']:.3f} |")
    cal = results.get("calibration")
    if cal:
        lines += ["", f"## Calibration (ECE {cal['ece']:.4f}, {cal['num_bins']} bins)", "",
                  "| confidence bin | count | mean confidence | accuracy |", "|---|---:|---:|---:|"]
        lines += [f"| {b['low']:.2f}–{b['high']:.2f} | {int(b['count']):,} | {b['confidence']:.3f} | {b['accuracy']:.3f} |"
                  for b in cal["bins"]]
    if results.get("experts"):
        lines += ["", "## Expert utilisation", "",
                  "| layer | load shares | MaxVio | load entropy | router entropy (/ln E) | dead experts |",
                  "|---:|---|---:|---:|---:|---|"]
        for layer, e in results["experts"].items():
            shares = " ".join(f"{s:.3f}" for s in e["load_shares"])
            ent = "" if e["router_entropy_normalised"] is None else f"{e['router_entropy_normalised']:.3f}"
            lines.append(f"| {layer} | {shares} | {e['max_vio']:.3f} | {e['load_entropy']:.3f} | {ent} | "
                         f"{e['dead_experts'] or 'none'} |")
    mc = results.get("multiple_choice")
    if mc:
        lines += ["", f"## Multiple choice ({plural(mc['questions'], 'question')})", "",
                  "| metric | accuracy | ± stderr | correct | ranks choices by |", "|---|---:|---:|---:|---|"]
        for metric, meaning in _MC_METRICS.items():
            stderr = mc.get(f"{metric}_stderr")
            lines.append(f"| `{metric}` | {mc[metric]:.4f} | {'' if stderr is None else f'{stderr:.4f}'} | "
                         f"{mc['correct'][metric]} | {meaning} |")
        if mc.get("truncated_choices"):
            lines += ["", f"{mc['truncated_choices']} choice(s) did not fit the model's window with their question "
                          f"and were scored with the question cut from the left (max_seq_len {mc['max_seq_len']})."]
    if results.get("samples"):
        lines += ["", "## Samples (greedy)", ""]
        for sample in results["samples"]:
            lines += [f"**{sample['prompt']}**{sample['completion']}", ""]
    return "\n".join(lines) + "\n"
