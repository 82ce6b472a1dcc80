"""Evaluate a checkpoint: loss/perplexity per source, expert use, calibration, MC accuracy, samples.

Legend: B windows, T positions, V vocabulary, E experts.

Each source's documents are encoded, joined with the end-of-text token and cut into windows
of ``max_seq_len`` tokens; every position except the first of a window is scored. From the same
forward passes come the routing counts per MoE layer (load shares, MaxVio, dead experts, router
entropy) and the calibration of the next-token distribution: expected calibration error over
15 equal-width confidence bins (Guo et al. 2017), confidence = the top-1 probability, correct =
the top-1 token is the target. Multiple-choice questions are scored by the mean log-likelihood
per token of each choice after the question (length-normalised, so longer answers are not
penalised for their length); the best-scoring choice is the prediction.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data import AvaTokenizer, Document
from ..errors import AvaCheckpointError, AvaDataError, AvaError
from ..models import EnhancedMoEModel
from ..utils.checkpoint import CONFIG_FILE, TOKENIZER_FILE, resolve_checkpoint
from .report import write_markdown

logger = logging.getLogger(__name__)

ECE_BINS = 15


# --------------------------------------------------------------------------------------------
# calibration
# --------------------------------------------------------------------------------------------


@dataclass
class CalibrationBins:
    """Running per-bin sums for the expected calibration error.

    Bin b holds confidences in ``(b/n, (b+1)/n]`` (bin 0 also takes 0).
    """

    num_bins: int = ECE_BINS
    count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    confidence: torch.Tensor = field(default=None)  # type: ignore[assignment]
    correct: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.num_bins, dtype=torch.float64)
        self.confidence = torch.zeros(self.num_bins, dtype=torch.float64)
        self.correct = torch.zeros(self.num_bins, dtype=torch.float64)

    def add(self, confidence_N: torch.Tensor, correct_N: torch.Tensor) -> None:
        """Add N predictions: top-1 probabilities and whether the top-1 token was right."""
        conf = confidence_N.detach().double().cpu()
        bins = (conf * self.num_bins).ceil().long().clamp(1, self.num_bins) - 1  # (N,)
        self.count.index_add_(0, bins, torch.ones_like(conf))
        self.confidence.index_add_(0, bins, conf)
        self.correct.index_add_(0, bins, correct_N.detach().double().cpu())

    def ece(self) -> float:
        """``Σ_b (n_b / N) · |accuracy_b − confidence_b|``."""
        total = self.count.sum()
        if total == 0:
            return float("nan")
        return float((self.correct - self.confidence).abs().sum() / total)

    def table(self) -> list[dict[str, float]]:
        """Per non-empty bin: range, count, mean confidence, accuracy."""
        rows = []
        for b in range(self.num_bins):
            n = float(self.count[b])
            if n:
                rows.append({"low": b / self.num_bins, "high": (b + 1) / self.num_bins, "count": n,
                             "confidence": float(self.confidence[b]) / n, "accuracy": float(self.correct[b]) / n})
        return rows


def expected_calibration_error(confidence_N: torch.Tensor, correct_N: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """ECE of N predictions (see :class:`CalibrationBins`).

    Args:
        confidence_N: (N,) top-1 probabilities in [0, 1].
        correct_N: (N,) bool or 0/1, the top-1 prediction was right.
        num_bins: equal-width bins over [0, 1].

    Returns:
        The ECE in [0, 1].
    """
    bins = CalibrationBins(num_bins)
    bins.add(confidence_N, correct_N.float())
    return bins.ece()


# --------------------------------------------------------------------------------------------
# expert utilisation
# --------------------------------------------------------------------------------------------


def expert_utilisation(counts_E: torch.Tensor, router_entropy: float | None = None) -> dict[str, Any]:
    """Load statistics of one MoE layer.

    Args:
        counts_E: (E,) token-slots routed to each expert.
        router_entropy: token-averaged entropy of the router probabilities (nats), if known.

    Returns:
        ``load_shares`` (sum 1), ``max_vio`` = max load / mean load − 1 (0 = perfectly balanced),
        ``load_entropy`` = entropy of the shares / ln E (1 = uniform), ``dead_experts`` (indices
        never chosen), ``router_entropy`` and ``router_entropy_normalised`` (/ ln E).
    """
    counts = counts_E.double().cpu()
    E = counts.numel()
    total = counts.sum()
    shares = counts / total if total > 0 else torch.full_like(counts, 1.0 / E)
    mean = total / E
    nz = shares[shares > 0]
    return {
        "load_shares": [round(float(s), 6) for s in shares],
        "max_vio": float(counts.max() / mean - 1) if total > 0 else 0.0,
        "load_entropy": float(-(nz * nz.log()).sum() / math.log(E)) if E > 1 else 1.0,
        "dead_experts": [i for i, c in enumerate(counts.tolist()) if c == 0],
        "router_entropy": router_entropy,
        "router_entropy_normalised": (router_entropy / math.log(E)) if router_entropy is not None and E > 1 else None,
    }


# --------------------------------------------------------------------------------------------
# loss, perplexity, routing and calibration over a token stream
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_tokens(
    model: EnhancedMoEModel,
    token_ids: Sequence[int],
    batch_size: int = 8,
    calibration: CalibrationBins | None = None,
    routing: dict[int, list] | None = None,
) -> dict[str, float]:
    """Mean next-token loss over ``token_ids`` cut into windows of ``max_seq_len``.

    Args:
        model: the model (put in eval mode by the caller).
        token_ids: the joined token stream of one source.
        batch_size: windows per forward pass.
        calibration: bins to add every scored position to.
        routing: layer → ``[counts_E, entropy_sum, tokens]`` accumulators to add to.

    Returns:
        ``loss`` (nats/token), ``perplexity``, ``tokens`` scored, ``accuracy`` (top-1).
    """
    device = next(model.parameters()).device
    T = model.config.max_seq_len
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    windows = [ids[i:i + T] for i in range(0, max(len(ids) - 1, 0), T)]
    windows = [w for w in windows if len(w) >= 2]
    nll_sum, correct_sum, scored = 0.0, 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        width = max(len(w) for w in batch)
        ids_BT = torch.zeros(len(batch), width, dtype=torch.long)
        mask_BT = torch.zeros(len(batch), width, dtype=torch.long)
        for b, w in enumerate(batch):  # right padding: positions stay 0..len-1
            ids_BT[b, :len(w)], mask_BT[b, :len(w)] = w, 1
        ids_BT, mask_BT = ids_BT.to(device), mask_BT.to(device)
        out = model(ids_BT, attention_mask=mask_BT if bool((mask_BT == 0).any()) else None)
        logprobs_BTV = out.logits[:, :-1].float().log_softmax(dim=-1)  # predicts positions 1..
        target_BT = ids_BT[:, 1:]
        valid_BT = mask_BT[:, 1:].bool()
        nll_BT = -logprobs_BTV.gather(-1, target_BT[..., None]).squeeze(-1)
        top_BT = logprobs_BTV.max(dim=-1)
        correct_BT = top_BT.indices == target_BT
        nll_sum += float(nll_BT[valid_BT].sum())
        correct_sum += float(correct_BT[valid_BT].sum())
        scored += int(valid_BT.sum())
        if calibration is not None:
            calibration.add(top_BT.values[valid_BT].exp(), correct_BT[valid_BT].float())
        if routing is not None:
            n_tokens = int(ids_BT.numel())  # router stats cover padding rows too (few, right-padded)
            for stat in out.router_stats:
                acc = routing.setdefault(stat.layer, [torch.zeros_like(stat.tokens_per_expert, device="cpu"), 0.0, 0])
                acc[0] += stat.tokens_per_expert.cpu()
                if stat.router_entropy is not None:
                    acc[1] += float(stat.router_entropy) * n_tokens
                    acc[2] += n_tokens
    loss = nll_sum / scored if scored else float("nan")
    return {"loss": loss, "perplexity": math.exp(loss) if scored else float("nan"), "tokens": scored,
            "accuracy": correct_sum / scored if scored else float("nan")}


# --------------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def choice_scores(model: EnhancedMoEModel, tokenizer: AvaTokenizer, question: str, choices: Sequence[str]) -> list[float]:
    """Mean log-likelihood per token of each choice after ``question``.

    The choice is joined with a space unless the question ends in whitespace or the choice
    starts with it; question and choice are encoded separately, so every choice is scored after
    the same context tokens.

    Args:
        model: the model (eval mode).
        tokenizer: its tokenizer.
        question: the context.
        choices: the candidate continuations.

    Returns:
        One score per choice (higher = more likely).
    """
    device = next(model.parameters()).device
    context = tokenizer.encode(question) or [tokenizer.eos_id]
    scores = []
    for choice in choices:
        joined = choice if (not question or question[-1].isspace() or choice[:1].isspace()) else " " + choice
        cont = tokenizer.encode(joined)
        if not cont:
            scores.append(float("-inf"))
            continue
        ids = (context + cont)[-model.config.max_seq_len:]
        logprobs_TV = model(torch.tensor([ids], device=device)).logits[0].float().log_softmax(dim=-1)
        first = len(ids) - len(cont)  # position of the first choice token
        picked = logprobs_TV[first - 1:len(ids) - 1].gather(-1, torch.tensor(cont, device=device)[:, None])
        scores.append(float(picked.mean()))
    return scores


def read_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``{question, choices, answer}`` JSONL; ``answer`` is an index or the choice text.

    Raises:
        AvaDataError: missing file, bad JSON or a row without the fields (naming the line).
    """
    path = Path(path)
    if not path.is_file():
        raise AvaDataError(f"--mc {path}: no such file; give a JSONL of {{question, choices, answer}} rows")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            question, choices, answer = row["question"], list(row["choices"]), row["answer"]
            index = choices.index(answer) if isinstance(answer, str) else int(answer)
            if not 0 <= index < len(choices) or len(choices) < 2:
                raise ValueError(f"answer {answer!r} is not one of {len(choices)} choices")
        except (ValueError, KeyError, TypeError) as err:
            raise AvaDataError(f"{path}:{n}: bad multiple-choice row ({err}); each line needs "
                               '{"question": str, "choices": [str, ...], "answer": index or choice}') from None
        rows.append({"question": question, "choices": choices, "answer": index})
    if not rows:
        raise AvaDataError(f"{path}: no questions")
    return rows


def score_multiple_choice(model: EnhancedMoEModel, tokenizer: AvaTokenizer, rows: list[dict]) -> dict[str, Any]:
    """Accuracy over ``rows`` (from :func:`read_multiple_choice`) and the per-question picks."""
    picks = []
    for row in rows:
        scores = choice_scores(model, tokenizer, row["question"], row["choices"])
        best = max(range(len(scores)), key=scores.__getitem__)
        picks.append({"question": row["question"], "predicted": best, "answer": row["answer"],
                      "scores": [round(s, 4) for s in scores]})
    correct = sum(p["predicted"] == p["answer"] for p in picks)
    return {"accuracy": correct / len(picks), "questions": len(picks), "correct": correct, "items": picks}


# --------------------------------------------------------------------------------------------
# the whole report
# --------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport:
    """What :func:`run_evaluation` wrote.

    Attributes:
        results: the JSON report as a dict.
        json_path / markdown_path: the files written.
    """

    results: dict[str, Any]
    json_path: Path
    markdown_path: Path


def run_evaluation(
    path: str | Path,
    data: Sequence[str] | None = None,
    mc_file: str | Path | None = None,
    out: str | Path | None = None,
    max_tokens: int = 200_000,
    num_samples: int = 3,
    sample_max_new_tokens: int = 48,
    device: str = "cpu",
) -> EvaluationReport:
    """Evaluate a checkpoint and write ``eval_report.json`` + ``eval_report.md``.

    Args:
        path: run folder, checkpoint folder or Ava model folder.
        data: text/JSONL files, one source each (None = the run's validation split, rebuilt from
            the checkpoint's config.yaml).
        mc_file: optional multiple-choice JSONL.
        out: report folder (None = ``<checkpoint>/eval``).
        max_tokens: tokens scored per source at most.
        num_samples: greedy generation samples (prompts: the first words of source documents).
        sample_max_new_tokens: tokens per sample.
        device: where to run.

    Returns:
        The :class:`EvaluationReport`.
    """
    from ..generation import TextGenerator

    checkpoint = resolve_checkpoint(path)
    tokenizer_file = checkpoint / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise AvaCheckpointError(f"{tokenizer_file} is missing; evaluation needs the model's tokenizer")
    tokenizer = AvaTokenizer.from_file(tokenizer_file)
    model = EnhancedMoEModel.from_pretrained(checkpoint, device=device).eval()
    sources = _sources(checkpoint, data)
    calibration, routing = CalibrationBins(), {}
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "sources": {}}
    for name, docs in sources.items():
        stream: list[int] = []
        for ids in tokenizer.encode_batch([d.text for d in docs]):
            stream.extend(ids + [tokenizer.eos_id])
            if len(stream) >= max_tokens + 1:
                break
        results["sources"][name] = evaluate_tokens(model, stream[:max_tokens + 1], calibration=calibration,
                                                   routing=routing)
        results["sources"][name]["documents"] = len(docs)
    results["calibration"] = {"ece": calibration.ece(), "bins": calibration.table(), "num_bins": ECE_BINS}
    results["experts"] = {
        str(layer): expert_utilisation(acc[0], acc[1] / acc[2] if acc[2] else None)
        for layer, acc in sorted(routing.items())
    }
    if mc_file is not None:
        results["multiple_choice"] = score_multiple_choice(model, tokenizer, read_multiple_choice(mc_file))
    generator = TextGenerator(model, tokenizer)
    prompts = [" ".join(d.text.split()[:4]) for docs in sources.values() for d in docs][:num_samples]
    results["samples"] = [
        {"prompt": p, "completion": generator.generate(p, sample_max_new_tokens, temperature=0)[len(p):]}
        for p in prompts
    ]
    folder = Path(out) if out is not None else checkpoint / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "eval_report.json", folder / "eval_report.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(write_markdown(results), encoding="utf-8")
    return EvaluationReport(results, json_path, md_path)


def _sources(checkpoint: Path, data: Sequence[str] | None) -> dict[str, list[Document]]:
    """Source name → documents: the given files, or the run's validation split."""
    from ..config import EnhancedTrainingConfig, SourceConfig
    from ..data import load_documents, read_source, split_documents

    if data:
        return {Path(f).name: read_source(SourceConfig(path=str(f))) for f in data}
    import yaml

    try:
        raw = yaml.safe_load((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        config = EnhancedTrainingConfig.from_dict(raw, source=str(checkpoint / CONFIG_FILE))
    except (OSError, yaml.YAMLError, AvaError, TypeError, AttributeError) as err:
        raise AvaDataError(f"{checkpoint / CONFIG_FILE} is not a full training config ({err}); pass --data FILE "
                           "to evaluate on explicit text files") from None
    docs = load_documents(config.data, seed=config.run.seed)
    _, val = split_documents(docs, config.data.val_fraction, config.run.seed)
    if not val:
        raise AvaDataError("the run has no validation split (data.val_fraction 0); pass --data FILE")
    return {"validation": val}
