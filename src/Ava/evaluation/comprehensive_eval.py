"""Evaluate a checkpoint: loss/perplexity per source, expert use, calibration, MC accuracy, samples.

Legend: B windows, T positions, V vocabulary, E experts.

``ava eval`` scores what it is asked to: the ``--data`` files, the ``--mc`` questions, or both;
without either, the run's own validation split. The validation split is scored exactly as the
trainer scores it (same windows, batch size, precision and document mask, through the same
:func:`~Ava.evaluation.validation.validation_loss`), only over more batches. A ``--data`` file's
documents are encoded, joined with the end-of-text token and cut into windows of ``max_seq_len``
tokens (a shorter last window is right-padded within its batch); every position except the first
of a window is scored. From the same forward passes come the routing counts per MoE layer (load
shares, MaxVio, dead experts, router entropy; :mod:`Ava.models.routing_metrics`) and the
calibration of the next-token distribution: expected calibration error over 15 equal-width
confidence bins (Guo et al. 2017), confidence = the top-1 probability, correct = the top-1 token
is the target. Multiple-choice questions are scored as lm-evaluation-harness scores them
(:mod:`Ava.evaluation.multiple_choice`: ``acc``, ``acc_norm``, ``acc_per_token``). Generation
samples are made by a function the caller passes (the CLI composes generation with evaluation).

Every input (``--mc`` rows, ``--data`` files, the run's config) and the report folder are checked
before the model is loaded, so a bad row or an unwritable folder fails in one line, not after
the scoring.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from ..config import EnhancedTrainingConfig, SourceConfig, TokenizerConfig
from ..data import AvaTokenizer, Document, prepare_data, read_source
from ..errors import AvaCheckpointError, AvaDataError, AvaError, AvaOutputError
from ..models import EnhancedMoEModel
from ..models.routing_metrics import RoutingTotals
from ..utils.checkpoint import CONFIG_FILE, TOKENIZER_FILE, resolve_checkpoint
from ..utils.output_paths import check_output_dir
from ..utils.progress import progress_bar
from .calibration import ECE_BINS, CalibrationBins
from .multiple_choice import read_multiple_choice, score_multiple_choice
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
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Mean next-token loss over ``token_ids`` cut into windows of ``max_seq_len`` (:class:`TokenWindows`).

    Args:
        model: the model (its device is used).
        token_ids: the joined token stream of one source.
        batch_size: windows per forward pass.
        calibration: bins to add every scored position to.
        routing: router statistics to add every batch to.
        on_batch: called after each batch with its number of windows (a progress bar's update).

    Returns:
        ``loss`` (plain cross-entropy, nats/token), ``perplexity``, ``objective`` (the model's
        ``lm_loss``, which label smoothing or focal loss change), ``tokens`` scored, ``accuracy``
        (top-1).
    """
    windows = TokenWindows(token_ids, model.config.max_seq_len)
    result = validation_loss(model, windows, batch_size=batch_size,
                             calibration=calibration if calibration is not None else CalibrationBins(),
                             routing=routing, on_batch=on_batch)
    return _source_result(result)


def _source_result(result: dict[str, Any]) -> dict[str, Any]:
    """The report's view of one source from :func:`validation_loss`'s result (with calibration):
    ``loss`` is the plain cross-entropy (so ``perplexity`` is one, whatever ``model.loss`` trains),
    ``objective`` the training objective the trainer's validation loss reports."""
    nll = result["nll"]
    return {"loss": nll, "perplexity": math.exp(nll) if math.isfinite(nll) else float("nan"),
            "objective": result["loss"], "tokens": result["tokens"], "accuracy": result["accuracy"]}


# --------------------------------------------------------------------------------------------
# the whole report
# --------------------------------------------------------------------------------------------


REPORT_FOLDER = "eval"
"""The default report folder, inside the evaluated checkpoint folder."""


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
    show_progress: bool | None = None,
) -> EvaluationReport:
    """Evaluate a checkpoint and write ``eval_report.json`` + ``eval_report.md``.

    What is scored: the ``data`` files and the ``mc_file`` questions, whichever are given; with
    neither, the run's validation split. Every input and the report folder are checked before the
    model is loaded.

    Args:
        path: run folder, checkpoint folder or Ava model folder.
        data: text/JSONL files, one source each.
        mc_file: a multiple-choice JSONL (:func:`~Ava.evaluation.multiple_choice.read_multiple_choice`).
        out: report folder (None = ``<checkpoint>/eval``, the :data:`REPORT_FOLDER` inside the
            resolved checkpoint folder).
        max_tokens: tokens scored per source at most (the validation split: whole batches of
            ``training.batch_size`` windows, at least one).
        num_samples: generation samples; their prompts are the first words of the source
            documents, of the validation windows, or (with ``mc_file`` alone) the questions; none
            without ``sample_fn``.
        sample_max_new_tokens: tokens per sample.
        device: where to run.
        sample_fn: makes one sample; the caller composes generation with evaluation (the CLI
            passes greedy decoding).
        verify: check the checkpoint against its manifest (see
            :meth:`EnhancedMoEModel.from_pretrained`); False skips it with a warning.
        show_progress: progress bars with ETA on stderr per pass (each source, the questions, the
            samples); None = when stderr is a terminal.

    Returns:
        The :class:`EvaluationReport`.

    Raises:
        AvaOutputError: the report folder cannot be written.
        AvaDataError: a missing or malformed ``mc_file`` row or ``data`` file, or no validation split.
        AvaCheckpointError: no checkpoint at ``path``, or no tokenizer in it.
    """
    if out is not None:
        check_output_dir(out, "--out")
    mc_rows = read_multiple_choice(mc_file) if mc_file is not None else None
    sources = _read_files(data) if data else {}
    checkpoint = resolve_checkpoint(path)
    folder = Path(out) if out is not None else checkpoint / REPORT_FOLDER
    if out is None:
        try:
            check_output_dir(folder, "report folder")
        except AvaOutputError as err:
            raise AvaOutputError(f"{err} with --out DIR (the default is a folder inside the checkpoint)") from None
    run_config = validation_config(checkpoint) if not data and mc_rows is None else None
    tokenizer_file = checkpoint / TOKENIZER_FILE
    if not tokenizer_file.is_file():
        raise AvaCheckpointError(f"{tokenizer_file} is missing; evaluation needs the model's tokenizer")
    tokenizer = AvaTokenizer.from_file(tokenizer_file)
    model = EnhancedMoEModel.from_pretrained(checkpoint, device=device, verify=verify).eval()

    calibration, routing = CalibrationBins(), RoutingTotals()
    results: dict[str, Any] = {"checkpoint": str(checkpoint), "sources": {}}
    prompts: list[str] = []
    if sources:
        prompts = _evaluate_files(model, tokenizer, sources, max_tokens, calibration, routing, results["sources"],
                                  show_progress)
    elif run_config is not None:
        prompts = _evaluate_validation(model, tokenizer, checkpoint, run_config, max_tokens, device,
                                       num_samples, calibration, routing, results["sources"], show_progress)
    if results["sources"]:
        results["calibration"] = {"ece": calibration.ece(), "bins": calibration.table(), "num_bins": ECE_BINS}
        results["experts"] = {str(layer): stats for layer, stats in sorted(routing.per_layer().items())}
    if mc_rows is not None:
        with progress_bar(len(mc_rows), "multiple choice", "question", show=show_progress) as bar:
            results["multiple_choice"] = score_multiple_choice(model, tokenizer, mc_rows,
                                                               on_question=lambda: bar.update(1))
        if not prompts:
            prompts = [row["question"] for row in mc_rows]
    prompts = prompts[:num_samples] if sample_fn is not None else []
    results["samples"] = []
    with progress_bar(len(prompts), "samples", "sample", show=show_progress if prompts else False) as bar:
        for prompt in prompts:
            results["samples"].append({"prompt": prompt,
                                       "completion": sample_fn(model, tokenizer, prompt, sample_max_new_tokens)})
            bar.update(1)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path = folder / "eval_report.json", folder / "eval_report.md"
    json_path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(write_markdown(results), encoding="utf-8")
    return EvaluationReport(results, json_path, md_path)


def _read_files(files: Sequence[str]) -> dict[str, list[Document]]:
    """The documents of each ``--data`` file, keyed by its report name (the file name, or the path
    as given when two files share a name)."""
    names = [Path(f).name for f in files]
    sources: dict[str, list[Document]] = {}
    for f, name in zip(files, names):
        key = name if names.count(name) == 1 else str(f)
        if key in sources:
            raise AvaDataError(f"--data {f} is given twice; give each file once")
        sources[key] = read_source(SourceConfig(path=str(f)))
    return sources


def _token_stream(tokenizer: AvaTokenizer, docs: Sequence[Document], max_tokens: int) -> tuple[list[int], int]:
    """The first ``max_tokens + 1`` tokens of the documents (each followed by end-of-text) and
    how many documents they reach into (the last one possibly cut)."""
    stream: list[int] = []
    used, chunk = 0, 256
    for begin in range(0, len(docs), chunk):
        for ids in tokenizer.encode_batch([d.text for d in docs[begin:begin + chunk]]):
            if len(stream) >= max_tokens + 1:
                return stream[:max_tokens + 1], used
            stream.extend(ids + [tokenizer.eos_id])
            used += 1
    return stream[:max_tokens + 1], used


def _evaluate_files(
    model: EnhancedMoEModel, tokenizer: AvaTokenizer, sources: dict[str, list[Document]], max_tokens: int,
    calibration: CalibrationBins, routing: RoutingTotals, into: dict[str, Any], show_progress: bool | None,
) -> list[str]:
    """Score each source into ``into``; returns sample prompts (first words of documents).

    A source's ``documents`` counts the documents its scored tokens reach into (fewer than
    ``documents_total`` when ``max_tokens`` cuts the source short).
    """
    prompts = []
    for name, docs in sources.items():
        stream, used = _token_stream(tokenizer, docs, max_tokens)
        windows = len(TokenWindows(stream, model.config.max_seq_len))
        with progress_bar(windows, f"eval {name}", "window", show=show_progress) as bar:
            result = evaluate_tokens(model, stream, calibration=calibration, routing=routing, on_batch=bar.update)
        into[name] = {**result, "documents": used, "documents_total": len(docs)}
        prompts += [" ".join(d.text.split()[:4]) for d in docs[:used]]
    return prompts


@dataclass(frozen=True)
class ValidationSplit:
    """A run's validation windows, rebuilt from its checkpoint, and how the trainer scores them."""

    dataset: Dataset
    batch_size: int
    max_batches: int
    autocast_dtype: torch.dtype | None
    document_mask: bool
    documents_total: int | None

    @property
    def windows(self) -> int:
        """The windows scored: the first ``max_batches`` whole batches, or all there are."""
        return min(len(self.dataset), self.max_batches * self.batch_size)


def validation_config(checkpoint: Path, option: str = "--data FILE",
                      purpose: str = "to evaluate on explicit text files") -> EnhancedTrainingConfig:
    """The run's training config from the checkpoint, checked to have a validation split.

    Args:
        checkpoint: the checkpoint folder.
        option, purpose: the caller's way around a missing split, for the messages
            ("pass --data FILE to evaluate on explicit text files").

    Raises:
        AvaDataError: the config.yaml is not a full training config, or the run has no
            validation split.
    """
    try:
        raw = yaml.safe_load((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
        config = EnhancedTrainingConfig.from_dict(raw, source=str(checkpoint / CONFIG_FILE))
    except (OSError, yaml.YAMLError, AvaError, TypeError, AttributeError) as err:
        raise AvaDataError(f"{checkpoint / CONFIG_FILE} is not a full training config ({err}); pass {option} "
                           f"{purpose}") from None
    if config.data.val_fraction == 0:
        raise AvaDataError(f"the run has no validation split (data.val_fraction 0); pass {option}")
    return config


def validation_split(checkpoint: Path, config: EnhancedTrainingConfig, max_tokens: int,
                     option: str = "--data FILE") -> ValidationSplit:
    """The run's validation split rebuilt as the trainer built it (the run's own tokenizer, as a
    resumed trainer uses it, never a retrained one; its window length and seed), capped at
    ``max_tokens`` (whole batches). ``option`` is the caller's way around a missing split."""
    batch_size, seq_len = config.training.batch_size, config.data.seq_len
    max_batches = max(1, max_tokens // (batch_size * seq_len))
    data_cfg = config.data.model_copy(update={"tokenizer": TokenizerConfig(path=str(checkpoint / TOKENIZER_FILE))})
    prepared = prepare_data(data_cfg, config.run.seed, eval_windows=max_batches * batch_size)
    if prepared.val is None:
        raise AvaDataError(f"the run has no validation split (data.val_fraction 0); pass {option}")
    return ValidationSplit(prepared.val, batch_size, max_batches,
                           torch.bfloat16 if config.precision.dtype == "bf16" else None,
                           config.data.document_mask, prepared.stats.get("val_documents"))


def _evaluate_validation(
    model: EnhancedMoEModel, tokenizer: AvaTokenizer, checkpoint: Path, config: EnhancedTrainingConfig,
    max_tokens: int, device: str, num_samples: int, calibration: CalibrationBins, routing: RoutingTotals,
    into: dict[str, Any], show_progress: bool | None,
) -> list[str]:
    """Score the run's validation split as the trainer does, into ``into["validation"]``; returns
    sample prompts (the first words of the first validation windows)."""
    split = validation_split(checkpoint, config, max_tokens)
    with progress_bar(split.windows, "eval validation", "window", show=show_progress) as bar:
        result = validation_loss(
            model, split.dataset, batch_size=split.batch_size, max_batches=split.max_batches, device=device,
            autocast_dtype=split.autocast_dtype, document_mask=split.document_mask, calibration=calibration,
            routing=routing, on_batch=bar.update,
        )
    into["validation"] = {**_source_result(result), "documents": _documents_in_windows(split.dataset, split.windows),
                          "documents_total": split.documents_total}
    sample_windows = [split.dataset[i]["input_ids"] for i in range(min(num_samples, len(split.dataset)))]
    return [" ".join(tokenizer.decode(ids[:64].tolist()).split()[:4]) for ids in sample_windows]


def _documents_in_windows(dataset: Dataset, count: int) -> int | None:
    """How many documents the first ``count`` windows of a validation set reach into (a document
    cut across windows counts once); None for a dataset that does not say where its windows lie."""
    seen: set[tuple[int, int]] = set()
    for i in range(count):
        if hasattr(dataset, "window_of") and hasattr(dataset, "datasets"):
            source, window = dataset.window_of(i)
            packed = dataset.datasets[source]
        elif hasattr(dataset, "locate"):
            window, packed = i, dataset
        else:
            return None
        if not hasattr(packed, "locate"):  # unpacked rows (data.packing: false): a row is one document
            seen.add((id(packed), window))
            continue
        stream, start = packed.locate(window)
        first = int(np.searchsorted(stream.doc_starts, start, side="right")) - 1
        last = int(np.searchsorted(stream.doc_starts, start + packed.seq_len - 1, side="right")) - 1
        seen.update((id(stream), d) for d in range(first, last + 1))
    return len(seen)
