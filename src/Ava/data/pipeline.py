"""From a ``data`` config to ready datasets.

In memory: read → (dedup) → split per source → tokenizer → encode → pack → windows → mixture.
Prepared: memory-mapped shards written by ``ava prepare`` (``prepare.py``, read by ``shards.py``) → windows → mixture.
Streaming: ``streaming.py`` (public path ``Ava.data_streaming``) tokenizes on the fly.

``collect_documents`` and :func:`~.datasets.build_tokenizer` are shared with ``ava prepare`` so
both paths split, deduplicate and train tokenizers identically; what every path returns,
:class:`~.datasets.PreparedData`, is built in :mod:`.datasets`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import AvaDataError
from .datasets import DEFAULT_SOURCE, PreparedData, build_datasets, build_tokenizer
from .packing import split_documents, tokenize_documents
from .readers import load_documents
from .records import DataReport, Document, plural
from .streaming import open_streaming
from .tokenizer import AvaTokenizer

logger = logging.getLogger(__name__)


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
        logger.info("dedup (%s): %d of %s kept", data.dedup, len(docs), plural(stats["documents"], "document"))
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
    skipped = report.skipped()
    logger.info(
        "documents: %d read%s, %d train / %d val (%.2f MB of text) from %s",
        len(docs), f" ({plural(skipped, 'row/file', 'rows/files')} skipped, bad_rows: skip)" if skipped else "",
        n_train, n_val, sum(len(d.text) for d in docs) / 1e6, plural(len(names), "source"),
    )
    return SplitDocuments(names, train, val, {n: weights.get(n, 1.0) for n in names}, stats)

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
    if not data.packing:
        stats["packing"] = False  # each document its own row (data.packing: false)
    unit = "windows" if data.packing else "rows"
    logger.info(
        "tokens: %d train (%d %s of %s%d), %d val (%d %s); data ready in %.1f s",
        stats["train_tokens"], stats["train_windows"], unit, "" if data.packing else "at most ", data.seq_len,
        stats["val_tokens"], stats["val_windows"], unit, stats["seconds"],
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
    train_set, val_set = build_datasets(split.names, train, val, split.weights, data.seq_len, seed, data.packing)
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
    train_set, val_set = build_datasets(names, train, val, corpus.weights, data.seq_len, seed, data.packing)
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
