"""From a ``data`` config to ready datasets: read → split → tokenizer → encode → pack → windows."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import AvaDataError
from .packing import PackedDataset, pack_documents, split_documents
from .readers import Document, load_documents
from .tokenizer import AvaTokenizer

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """Everything training needs from the data.

    Attributes:
        tokenizer: the tokenizer (trained on the train split, or loaded).
        train: training windows.
        val: validation windows; None when ``data.val_fraction == 0`` (or when there is a single
            document, which cannot be split by document).
        stats: flat numbers for logs and reports: ``{train,val}_{documents,chars,tokens,windows}``,
            ``vocab_size``, ``tokenizer_source`` ("trained" or the loaded path),
            ``tokenizer_seconds``, ``seconds``.
    """

    tokenizer: AvaTokenizer
    train: PackedDataset
    val: PackedDataset | None
    stats: dict[str, Any] = field(default_factory=dict)


def prepare_data(data: DataConfig, seed: int, tokenizer_out: Path | None = None) -> PreparedData:
    """Read, split, tokenize and pack the configured data.

    Args:
        data: the resolved ``data`` section (``data.seq_len`` must be set; loading the whole
            config through ``EnhancedTrainingConfig`` fills it from ``model.max_seq_len``).
        seed: the run seed (document subset and train/validation split).
        tokenizer_out: where to save the tokenizer (e.g. ``run_dir / "tokenizer.json"``).

    Returns:
        The tokenizer, the train/validation datasets and their statistics.

    Raises:
        AvaDataError: unreadable or empty data, a bad tokenizer file, or a split shorter than
            one ``seq_len`` window.
    """
    start = time.perf_counter()
    if data.seq_len is None:
        raise AvaDataError("data.seq_len is not set; set it or model.max_seq_len (it defaults to the latter)")
    docs = load_documents(data, seed=seed)
    if not docs:
        raise AvaDataError("no documents to train on; add text to data.sources")
    train_docs, val_docs = split_documents(docs, data.val_fraction, seed)
    logger.info(
        "documents: %d read, %d train / %d val (%.2f MB of text)",
        len(docs), len(train_docs), len(val_docs), sum(len(d.text) for d in docs) / 1e6,
    )

    tok_start = time.perf_counter()
    if data.tokenizer.path is not None:
        tokenizer = AvaTokenizer.from_file(data.tokenizer.path)
        source = str(data.tokenizer.path)
        logger.info("tokenizer loaded from %s (vocab %d)", source, tokenizer.vocab_size)
    else:
        tokenizer = AvaTokenizer.train(
            (d.text for d in train_docs),
            vocab_size=data.tokenizer.vocab_size,
            min_frequency=data.tokenizer.min_frequency,
        )
        source = "trained"
        logger.info(
            "tokenizer trained on the train split in %.1f s (vocab %d of %d requested)",
            time.perf_counter() - tok_start, tokenizer.vocab_size, data.tokenizer.vocab_size,
        )
    tok_seconds = time.perf_counter() - tok_start
    if tokenizer_out is not None:
        tokenizer.save(tokenizer_out)
        logger.info("tokenizer saved to %s", tokenizer_out)

    train = _encode_split(tokenizer, train_docs, data.seq_len, "train")
    val = _encode_split(tokenizer, val_docs, data.seq_len, "val") if val_docs else None
    if val is None and data.val_fraction > 0:
        # A split is by whole documents, so a single document cannot be divided.
        logger.warning(
            "no validation split: %d document(s) cannot be split by document; add documents "
            "or set data.val_fraction: 0", len(docs),
        )

    stats: dict[str, Any] = {
        "train_documents": len(train_docs),
        "val_documents": len(val_docs),
        "train_chars": sum(len(d.text) for d in train_docs),
        "val_chars": sum(len(d.text) for d in val_docs),
        "train_tokens": train.num_tokens,
        "val_tokens": val.num_tokens if val is not None else 0,
        "train_windows": len(train),
        "val_windows": len(val) if val is not None else 0,
        "seq_len": data.seq_len,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_source": source,
        "tokenizer_seconds": round(tok_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
    }
    logger.info(
        "tokens: %d train (%d windows of %d), %d val (%d windows); data ready in %.1f s",
        stats["train_tokens"], stats["train_windows"], data.seq_len,
        stats["val_tokens"], stats["val_windows"], stats["seconds"],
    )
    return PreparedData(tokenizer=tokenizer, train=train, val=val, stats=stats)


def _encode_split(tokenizer: AvaTokenizer, docs: list[Document], seq_len: int, split: str) -> PackedDataset:
    ids = tokenizer.encode_batch([d.text for d in docs])
    return PackedDataset(pack_documents(ids, tokenizer.eos_id), seq_len, split=split)
