"""From a ``data`` config to ready datasets.

In memory: read → (dedup) → split per source → tokenizer → encode → pack → windows → mixture.
Prepared: memory-mapped shards written by ``ava prepare`` (``prepare.py``, read by ``shards.py``) → windows → mixture.
Streaming: ``data_streaming.py`` tokenizes on the fly.

``collect_documents`` and ``build_tokenizer`` are shared with ``ava prepare`` so both paths
split, deduplicate and train tokenizers identically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import AvaDataError
from .mixture import MixtureDataset
from .packing import PackedDataset, TokenStream, split_documents, tokenize_documents
from .readers import load_documents
from .records import DataReport, Document
from .tokenizer import AvaTokenizer

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "data"  # source name of documents that carry none


@dataclass
class SplitDocuments:
    """Documents per source and split, in stream order.

    Attributes:
        names: source names in config order.
        train: ``{source: documents}`` of the training split.
        val: ``{source: documents}`` of the validation split (may be empty lists).
        weights: ``{source: mixture weight}``.
        stats: dedup statistics (``dedup``), documents read (``documents``).
    """

    names: list[str]
    train: dict[str, list[Document]]
    val: dict[str, list[Document]]
    weights: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)

    def all_train(self) -> list[Document]:
        return [d for name in self.names for d in self.train[name]]


@dataclass
class PreparedData:
    """Everything training needs from the data.

    Attributes:
        tokenizer: the tokenizer (trained on the train split, or loaded).
        train: training windows (a :class:`PackedDataset`, or a :class:`MixtureDataset` of
            several sources); ``dataset[i]`` is a dict batch row (see ``window_sample``).
        val: validation windows; None when ``data.val_fraction == 0`` (or when no source has
            two documents, since a split is by document).
        source_names: the sources, in the order of the samples' ``source`` ids.
        stats: flat numbers for logs and reports: ``{train,val}_{documents,chars,tokens,windows}``,
            ``vocab_size``, ``tokenizer_source`` ("trained" or the loaded path),
            ``tokenizer_seconds``, ``seconds``, ``sources`` (per-source counts).
        report: rows skipped / characters replaced under the sources' policies.
    """

    tokenizer: AvaTokenizer
    train: Dataset
    val: Dataset | None
    source_names: list[str] = field(default_factory=lambda: [DEFAULT_SOURCE])
    stats: dict[str, Any] = field(default_factory=dict)
    report: DataReport = field(default_factory=DataReport)


def collect_documents(data: DataConfig, seed: int, report: DataReport) -> SplitDocuments:
    """Read every source, remove duplicates (``data.dedup``) and split each source by document.

    Args:
        data: the ``data`` section.
        seed: the run seed (document subset, split).
        report: collects skipped rows and replaced characters.

    Returns:
        The documents per source and split.

    Raises:
        AvaDataError: unreadable or empty data.
    """
    docs = load_documents(data, seed=seed, report=report)
    if not docs:
        raise AvaDataError("no documents to train on; add text to data.sources")
    stats: dict[str, Any] = {"documents": len(docs)}
    if data.dedup != "none":
        from .dedup import dedup_documents

        docs, dedup = dedup_documents(docs, data.dedup, data.dedup_threshold)  # fixed MinHash seed
        stats["dedup"] = dedup.to_dict()
        logger.info("dedup (%s): %d of %d documents kept", data.dedup, len(docs), stats["documents"])
    if data.sources:
        from .readers import source_names

        weights = {name: s.weight for name, s in zip(source_names(data.sources), data.sources)}
    else:
        weights = {}
    by_source: dict[str, list[Document]] = {name: [] for name in weights}
    for doc in docs:
        by_source.setdefault(doc.source_name or DEFAULT_SOURCE, []).append(doc)
    names = [name for name, group in by_source.items() if group]
    train: dict[str, list[Document]] = {}
    val: dict[str, list[Document]] = {}
    for name in names:
        train[name], val[name] = split_documents(by_source[name], data.val_fraction, seed)
    n_train = sum(len(v) for v in train.values())
    n_val = sum(len(v) for v in val.values())
    logger.info(
        "documents: %d read, %d train / %d val (%.2f MB of text) from %d source(s)",
        len(docs), n_train, n_val, sum(len(d.text) for d in docs) / 1e6, len(names),
    )
    return SplitDocuments(names, train, val, {n: weights.get(n, 1.0) for n in names}, stats)


def build_tokenizer(data: DataConfig, train_docs: Iterable[Document]) -> tuple[AvaTokenizer, str]:
    """Load ``data.tokenizer.path``, or train a byte-level BPE on the training documents.

    Returns:
        The tokenizer and where it came from (the path, or ``"trained"``).
    """
    start = time.perf_counter()
    if data.tokenizer.path is not None:
        tokenizer = AvaTokenizer.from_file(data.tokenizer.path)
        logger.info("tokenizer loaded from %s (vocab %d)", data.tokenizer.path, tokenizer.vocab_size)
        return tokenizer, str(data.tokenizer.path)
    tokenizer = AvaTokenizer.train(
        (d.text for d in train_docs), vocab_size=data.tokenizer.vocab_size, min_frequency=data.tokenizer.min_frequency,
    )
    logger.info(
        "tokenizer trained on the train split in %.1f s (vocab %d of %d requested)",
        time.perf_counter() - start, tokenizer.vocab_size, data.tokenizer.vocab_size,
    )
    return tokenizer, "trained"


def build_datasets(
    names: Sequence[str], train: dict[str, Sequence[TokenStream]], val: dict[str, Sequence[TokenStream]],
    weights: dict[str, float], seq_len: int, seed: int,
) -> tuple[Dataset, Dataset | None]:
    """Windows of every source, mixed by weight (a plain :class:`PackedDataset` for one source),
    and the validation set of :func:`build_validation_set`."""
    train_sets = [PackedDataset(list(train[n]), seq_len, split=f"train ({n})" if len(names) > 1 else "train")
                  for n in names]
    if len(names) == 1:
        train_set: Dataset = train_sets[0]
    else:
        train_set = MixtureDataset(train_sets, [weights[n] for n in names], seed, names=names)
    return train_set, build_validation_set(names, val, seq_len, seed)


def build_validation_set(
    names: Sequence[str], val: dict[str, Sequence[TokenStream]], seq_len: int, seed: int,
) -> Dataset | None:
    """Per-source validation windows, mixed in proportion to size and read in order.

    A source whose validation split is empty, or shorter than one window, is left out (with a
    warning). Samples keep the training source ids (``names`` order). None when no source has
    a validation window.
    """
    val_sets, val_names = [], []
    for i, name in enumerate(names):
        streams = [s for s in val.get(name, []) if len(s)]
        if not streams:
            continue
        if sum(len(s) for s in streams) < seq_len:
            logger.warning("source %s: its validation split is shorter than one window of %d tokens; "
                           "it is left out of validation", name, seq_len)
            continue
        val_sets.append(PackedDataset(streams, seq_len, split="val", source_id=i))
        val_names.append(name)
    if not val_sets:
        return None
    if len(val_sets) == 1:
        return val_sets[0]
    val_set = MixtureDataset(val_sets, [len(d) for d in val_sets], seed, names=val_names, shuffle=False)
    for d, name in zip(val_sets, val_names):
        d.source_id = list(names).index(name)  # keep the training ids in the samples
    return val_set


def prepare_data(
    data: DataConfig, seed: int, tokenizer_out: Path | None = None, eval_windows: int | None = None,
) -> PreparedData:
    """Read, split, tokenize and pack the configured data (or open prepared shards, or a stream).

    Args:
        data: the resolved ``data`` section (``data.seq_len`` must be set; loading the whole
            config through ``EnhancedTrainingConfig`` fills it from ``model.max_seq_len``).
        seed: the run seed (document subset, train/validation split, mixture order).
        tokenizer_out: where to save the tokenizer (e.g. ``run_dir / "tokenizer.json"``).
        eval_windows: validation windows a streaming run collects up front (eval batches ×
            batch size); ignored by the other paths, which hold the whole validation split.

    Returns:
        The tokenizer, the train/validation datasets and their statistics.

    Raises:
        AvaDataError: unreadable or empty data, a bad tokenizer file, or a split shorter than
            one ``seq_len`` window.
    """
    start = time.perf_counter()
    if data.seq_len is None:
        raise AvaDataError("data.seq_len is not set; set it or model.max_seq_len (it defaults to the latter)")
    if data.prepared is not None:
        prepared = _open_prepared(data, seed)
    elif data.streaming:
        from ..data_streaming import open_streaming

        prepared = open_streaming(data, seed, eval_windows=eval_windows if eval_windows is not None else 256,
                                  chunk_documents=data.chunk_documents)
    else:
        prepared = _prepare_in_memory(data, seed)
    if tokenizer_out is not None:
        prepared.tokenizer.save(tokenizer_out)
        logger.info("tokenizer saved to %s", tokenizer_out)
    prepared.stats["seconds"] = round(time.perf_counter() - start, 3)
    prepared.report.log()
    stats = prepared.stats
    logger.info(
        "tokens: %d train (%d windows of %d), %d val (%d windows); data ready in %.1f s",
        stats["train_tokens"], stats["train_windows"], data.seq_len,
        stats["val_tokens"], stats["val_windows"], stats["seconds"],
    )
    return prepared


def _prepare_in_memory(data: DataConfig, seed: int) -> PreparedData:
    report = DataReport()
    split = collect_documents(data, seed, report)
    tok_start = time.perf_counter()
    tokenizer, tokenizer_source = build_tokenizer(data, split.all_train())
    tok_seconds = time.perf_counter() - tok_start
    train = {n: [tokenize_documents(tokenizer, split.train[n], n)] for n in split.names}
    val = {n: [tokenize_documents(tokenizer, split.val[n], n)] for n in split.names if split.val[n]}
    if not val and data.val_fraction > 0:
        # A split is by whole documents, so a single document cannot be divided.
        logger.warning("no validation split: no source has two documents to split; add documents "
                       "or set data.val_fraction: 0")
    assert data.seq_len is not None
    train_set, val_set = build_datasets(split.names, train, val, split.weights, data.seq_len, seed)
    per_source = {
        n: {
            "weight": split.weights[n],
            "train_documents": len(split.train[n]), "val_documents": len(split.val[n]),
            "train_tokens": sum(len(s) for s in train[n]), "val_tokens": sum(len(s) for s in val.get(n, [])),
        }
        for n in split.names
    }
    stats: dict[str, Any] = {
        "train_documents": sum(len(v) for v in split.train.values()),
        "val_documents": sum(len(v) for v in split.val.values()),
        "train_chars": sum(len(d.text) for v in split.train.values() for d in v),
        "val_chars": sum(len(d.text) for v in split.val.values() for d in v),
        "tokenizer_source": tokenizer_source,
        "tokenizer_seconds": round(tok_seconds, 3),
        **split.stats,
    }
    return _finish(tokenizer, train_set, val_set, split.names, per_source, stats, data.seq_len, report)


def _open_prepared(data: DataConfig, seed: int) -> PreparedData:
    from .shards import load_prepared

    assert data.prepared is not None and data.seq_len is not None
    corpus = load_prepared(data.prepared)
    tokenizer = corpus.tokenizer
    if data.tokenizer.path is not None:
        wanted = AvaTokenizer.from_file(data.tokenizer.path)
        if wanted.tokenizer.to_str() != tokenizer.tokenizer.to_str():
            raise AvaDataError(
                f"data.tokenizer.path {data.tokenizer.path} differs from the tokenizer the shards in "
                f"{data.prepared} were made with; remove data.tokenizer.path (the shards bring theirs) "
                "or prepare the data again with this tokenizer"
            )
    train, val = corpus.streams("train"), corpus.streams("val")
    names = [n for n in corpus.source_names if train.get(n)]
    train_set, val_set = build_datasets(names, train, val, corpus.weights, data.seq_len, seed)
    per_source = {
        n: {"weight": corpus.weights[n], "train_tokens": sum(len(s) for s in train[n]),
            "val_tokens": sum(len(s) for s in val.get(n, [])),
            "train_documents": sum(s.num_documents for s in train[n]),
            "val_documents": sum(s.num_documents for s in val.get(n, []))}
        for n in names
    }
    stats = {
        "train_documents": sum(v["train_documents"] for v in per_source.values()),
        "val_documents": sum(v["val_documents"] for v in per_source.values()),
        "tokenizer_source": str(Path(data.prepared) / "tokenizer.json"),
        "prepared": str(data.prepared),
    }
    logger.info("prepared shards: %s (%d source(s))", data.prepared, len(names))
    # rows skipped / bytes replaced when the shards were prepared: reported with this run too
    report = DataReport.from_dict(corpus.manifest.get("report", {}))
    return _finish(tokenizer, train_set, val_set, names, per_source, stats, data.seq_len, report)


def _finish(
    tokenizer: AvaTokenizer, train: Dataset, val: Dataset | None, names: list[str],
    per_source: dict[str, dict[str, Any]], stats: dict[str, Any], seq_len: int, report: DataReport,
) -> PreparedData:
    stats.update({
        "train_tokens": sum(v["train_tokens"] for v in per_source.values()),
        "val_tokens": sum(v["val_tokens"] for v in per_source.values()) if val is not None else 0,
        "train_windows": len(train),
        "val_windows": len(val) if val is not None else 0,
        "seq_len": seq_len,
        "vocab_size": tokenizer.vocab_size,
        "sources": per_source,
    })
    if report.counts:
        stats["data_report"] = report.to_dict()
    return PreparedData(tokenizer=tokenizer, train=train, val=val, source_names=names, stats=stats, report=report)
