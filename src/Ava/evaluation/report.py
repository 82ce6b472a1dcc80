"""The markdown view of an evaluation report (the JSON one is the dict itself)."""

from __future__ import annotations

from typing import Any


def write_markdown(results: dict[str, Any]) -> str:
    """Render :func:`~Ava.evaluation.run_evaluation`'s results as markdown.

    Args:
        results: the report dict (``sources``, ``calibration``, ``experts``, optional
            ``multiple_choice``, ``samples``).

    Returns:
        The markdown text.
    """
    lines = [f"# Evaluation of `{results['checkpoint']}`", "", "## Loss and perplexity", "",
             "| source | documents | tokens | loss | perplexity | top-1 accuracy |", "|---|---:|---:|---:|---:|---:|"]
    for name, s in results["sources"].items():
        lines.append(f"| {name} | {s.get('documents', '')} | {s['tokens']:,} | {s['loss']:.4f} | "
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
        lines += ["", f"## Multiple choice: {mc['correct']}/{mc['questions']} = {mc['accuracy']:.3f}", ""]
    if results.get("samples"):
        lines += ["", "## Samples (greedy)", ""]
        for sample in results["samples"]:
            lines += [f"**{sample['prompt']}**{sample['completion']}", ""]
    return "\n".join(lines) + "\n"
