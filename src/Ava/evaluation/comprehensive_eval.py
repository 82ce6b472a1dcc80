"""Evaluate a checkpoint: loss/perplexity per source, expert use, calibration, MC accuracy, samples.

Legend: B windows, T positions, V vocabulary, E experts.

Without ``--data`` the run's own validation split is scored exactly as the trainer scores it
(same windows, batch size, precision and document mask, through the same
:func:`~Ava.evaluation.validation.validation_loss`), only over more batches. A ``--data`` file's
documents are encoded, joined with the end-of-text token and cut into windows of ``max_seq_len``
tokens (a shorter last window is right-padded within its batch); every position except the first
of a window is scored. From the same forward passes come the routing counts per MoE layer (load
shares, MaxVio, dead experts, router entropy; :mod:`Ava.models.routing_metrics`) and the
calibration of the next-token distribution: expected calibration error over 15 equal-width
confidence bins (Guo et al. 2017), confidence = the top-1 probability, correct = the top-1 token
is the target. Multiple-choice questions are scored by the mean log-likelihood per token of each
choice after the question (length-normalised, so longer answers are not penalised for their
length); the best-scoring choice is the prediction. Generation samples are made by a function the
caller passes (the CLI composes generation with evaluation).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import Dataset

from ..config import EnhancedTrainingConfig, SourceConfig, TokenizerConfig
from ..data import AvaTokenizer, prepare_data, read_source
from ..errors import AvaCheckpointError, AvaDataError, AvaError
from ..models import EnhancedMoEModel
from ..models.routing_metrics import RoutingTotals
from ..utils.checkpoint import CONFIG_FILE, TOKENIZER_FILE, resolve_checkpoint
from .calibration import ECE_BINS, CalibrationBins
from .report import write_markdown
from .validation import validation_loss

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# loss, perplexity, routing and calibration over a token stream
# --------------------------------------------------------------------------------------------


class TokenWindows(Dataset):
    """Consecutive windows of ``seq_len`` tokens over one token stream, the last one possibly shorter.

    ``dataset[i]`` is the (≤ seq_len,) id tensor of window i; windows of fewer than 2 tokens (nothing
    to predict) are left out.
    """

    def __init__(self, token_ids: Sequence[int], seq_len: int) -> None:
        self.ids = torch.tensor(list(token_ids), dtype=torch.long)
        self.seq_len = seq_len
        starts = range(0, max(len(self.ids) - 1, 0), seq_len)
        self.starts = [i for i in starts if len(self.ids) - i >= 2]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> torch.Tensor:
        start = self.starts[i]
        return self.ids[start:start + self.seq_len]


def evaluate_tokens(
    model: EnhancedMoEModel,
    token_ids: Sequence[int],
    batch_size: int = 8,
    calibration: CalibrationBins | None = None,
    routing: RoutingTotals | None = None,
) -> dict[str, Any]:
    """Mean next-token loss over ``token_ids`` cut into windows of ``max_seq_len`` (:class:`TokenWindows`).

    Args:
        model: the model (its device is used).
        token_ids: the joined token stream of one source.
        batch_size: windows per forward pass.
        calibration: bins to add every scored position to.
        routing: router statistics to add every batch to.

    Returns:
        ``loss`` (plain cross-entropy, nats/token), ``perplexity``, ``objective`` (the model's
        ``lm_loss``, which label smoothing or focal loss change), ``tokens`` scored, ``accuracy``
        (top-1).
    """
    windows = TokenWindows(token_ids, model.config.max_seq_len)
    result = validation_loss(model, windows, batch_size=batch_size,
                             calibration=calibration if calibration is not None else CalibrationBins(),
                             routing=routing)
    return _source_result(result)


def _source_result(result: dict[str, Any]) -> dict[str, Any]:
    """The report's view of one source from :func:`validation_loss`'s result (with calibration):
    ``loss`` is the plain cross-entropy (so ``perplexity`` is one, whatever ``model.loss`` trains),
    ``objective`` the training objective the trainer's validation loss reports."""
    nll = result["nll"]
    return {"loss": nll, "perplexity": math.exp(nll) if math.isfinite(nll) else float("nan"),
            "objective": result["loss"], "tokens": result["tokens"], "accuracy": result["accuracy"]}


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


SampleFn = Callable[[EnhancedMoEModel, AvaTokenizer, str, int], str]
"""``(model, tokenizer, prompt, max_new_tokens) -> completion`` (the text after the prompt)."""


def run_evaluation(
    path: str | Path,
    data: Sequence[str] | None = None,
    mc_file: str | Path | None = None,
    out: str | Path | None = None,
    max_tokens: int = 200_000,
    num_samples: int = 3,
    sample_max_new_tokens: int = 48,
    device: str = "cpu",
    sample_fn: SampleFn | None = None,
    verify: bool = True,
) -> EvaluationReport:
    """Evaluate a checkpoint and write ``eval_report.json`` + ``eval_report.md``.

    Args:
        path: run folder, checkpoint folder or Ava model folder.
        data: text/JSONL files, one source each (None = the run's validation split, rebuilt from
            the checkpoint's config.yaml and scored as the trainer scores it).
        mc_file: optional multiple-choice JSONL.
        out: report folder (None = ``<checkpoint>/eval``).
        max_tokens: tokens scored per source at most (the validation split: whole batches of
            ``training.batch_size`` windows, at least one).
        num_samples: generation samples (prompts: the first words of the source documents, or of
            the validation windows); none without ``sample_fn``.
        sample_max_new_tokens: tokens per sample.
        device: where to run.
        sample_fn: makes one sample; the caller composes generation with evaluation (the CLI
            passes greedy decoding).
        verify: check the checkpoint against its manifest (see
            :meth:`EnhancedMoEModel.from_pretrained`); False skips it with a warning.

    Returns:
        The :class:`EvaluationReport`.
    """
    checkpoint = resolve_checkpoint(path)
    tokenizer_file = checkpoint / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise AvaCheckpointError(f"{tokenizer_file} is missing; evaluation needs the model's tokenizer")
    tokenizer = AvaTokenizer.from_file(tokenizer_file)
    model = EnhancedMoEModel.from_pretrained(checkpoint, device=device, verify=verify).eval()
    calibration, routing = CalibrationBins(), RoutingTotals()
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "sources": {}}
    if data:
        prompts = _evaluate_files(model, tokenizer, data, max_tokens, calibration, routing, results["sources"])
    else:
        prompts = _evaluate_validation(model, tokenizer, checkpoint, max_tokens, device, num_samples,
                                       calibration, routing, results["sources"])
    results["calibration"] = {"ece": calibration.ece(), "bins": calibration.table(), "num_bins": ECE_BINS}
    results["experts"] = {str(layer): stats for layer, stats in sorted(routing.per_layer().items())}
    if mc_file is not None:
        results["multiple_choice"] = score_multiple_choice(model, tokenizer, read_multiple_choice(mc_file))
    prompts = prompts[:num_samples] if sample_fn is not None else []
    results["samples"] = [{"prompt": p, "completion": sample_fn(model, tokenizer, p, sample_max_new_tokens)}
                          for p in prompts]
    folder = Path(out) if out is not None else checkpoint / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "eval_report.json", folder / "eval_report.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(write_markdown(results), encoding="utf-8")
    return EvaluationReport(results, json_path, md_path)


def _evaluate_files(
    model: EnhancedMoEModel, tokenizer: AvaTokenizer, files: Sequence[str], max_tokens: int,
    calibration: CalibrationBins, routing: RoutingTotals, into: dict[str, Any],
) -> list[str]:
    """Score each file as one source into ``into``; returns sample prompts (first words of documents)."""
    prompts = []
    for f in files:
        docs = read_source(SourceConfig(path=str(f)))
        stream: list[int] = []
        for ids in tokenizer.encode_batch([d.text for d in docs]):
            stream.extend(ids + [tokenizer.eos_id])
            if len(stream) >= max_tokens + 1:
                break
        result = evaluate_tokens(model, stream[:max_tokens + 1], calibration=calibration, routing=routing)
        into[Path(f).name] = {**result, "documents": len(docs)}
        prompts += [" ".join(d.text.split()[:4]) for d in docs]
    return prompts


def _evaluate_validation(
    model: EnhancedMoEModel, tokenizer: AvaTokenizer, checkpoint: Path, max_tokens: int, device: str,
    num_samples: int, calibration: CalibrationBins, routing: RoutingTotals, into: dict[str, Any],
) -> list[str]:
    """Score the run's validation split as the trainer does, into ``into["validation"]``; returns
    sample prompts (the first words of the first validation windows)."""
    try:
        raw = yaml.safe_load((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        config = EnhancedTrainingConfig.from_dict(raw, source=str(checkpoint / CONFIG_FILE))
    except (OSError, yaml.YAMLError, AvaError, TypeError, AttributeError) as err:
        raise AvaDataError(f"{checkpoint / CONFIG_FILE} is not a full training config ({err}); pass --data FILE "
                           "to evaluate on explicit text files") from None
    if config.data.val_fraction == 0:
        raise AvaDataError("the run has no validation split (data.val_fraction 0); pass --data FILE")
    batch_size, seq_len = config.training.batch_size, config.data.seq_len
    max_batches = max(1, max_tokens // (batch_size * seq_len))
    # the run's own tokenizer, as a resumed trainer uses it (never a retrained one)
    data_cfg = config.data.model_copy(update={"tokenizer": TokenizerConfig(path=str(checkpoint / TOKENIZER_FILE))})
    prepared = prepare_data(data_cfg, config.run.seed, eval_windows=max_batches * batch_size)
    if prepared.val is None:
        raise AvaDataError("the run has no validation split (data.val_fraction 0); pass --data FILE")
    result = validation_loss(
        model, prepared.val, batch_size=batch_size, max_batches=max_batches, device=device,
        autocast_dtype=torch.bfloat16 if config.precision.dtype == "bf16" else None,
        document_mask=config.data.document_mask, calibration=calibration, routing=routing,
    )
    into["validation"] = {**_source_result(result), "documents": prepared.stats.get("val_documents")}
    windows = [prepared.val[i]["input_ids"] for i in range(min(num_samples, len(prepared.val)))]
    return [" ".join(tokenizer.decode(ids[:64].tolist()).split()[:4]) for ids in windows]
