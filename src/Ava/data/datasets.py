"""What every data path hands training: :class:`PreparedData`, the tokenizer and the window datasets.

The in-memory and prepared-shard paths (:mod:`.pipeline`) and the streaming path
(:mod:`.streaming`) build their result from these pieces, so a tokenizer is loaded or trained,
and validation windows are mixed, the same way whichever path runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import AvaDataError
from .mixture import MixtureDataset
from .packing import PackedDataset, TokenStream
from .records import DataReport, Document
from .rows import RowDataset
from .tokenizer import AvaTokenizer

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "data"  # source name of documents that carry none


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
    weights: dict[str, float], seq_len: int, seed: int, packing: bool = True,
) -> tuple[Dataset, Dataset | None]:
    """Windows of every source, mixed by weight (a plain :class:`PackedDataset` for one source),
    and the validation set of :func:`build_validation_set`.

    With ``packing=False`` (``data.packing: false``) each document is a row of its own
    (:class:`~.rows.RowDataset`, truncated to ``seq_len``) instead of packed windows.
    """
    kind = PackedDataset if packing else RowDataset
    train_sets = [kind(list(train[n]), seq_len, split=f"train ({n})" if len(names) > 1 else "train")
                  for n in names]
    if not packing:
        for rows in train_sets:
            rows.log_summary()
    if len(names) == 1:
        train_set: Dataset = train_sets[0]
    else:
        train_set = MixtureDataset(train_sets, [weights[n] for n in names], seed, names=names)
    return train_set, build_validation_set(names, val, seq_len, seed, packing)


def build_validation_set(
    names: Sequence[str], val: dict[str, Sequence[TokenStream]], seq_len: int, seed: int, packing: bool = True,
) -> Dataset | None:
    """Per-source validation windows, mixed in proportion to size and read in order.

    A source whose validation split is empty, or shorter than one window, is left out (with a
    warning). Samples keep the training source ids (``names`` order). None when no source has
    a validation window. With ``packing=False`` the validation rows are documents, as in training.
    """
    val_sets, val_names = [], []
    for i, name in enumerate(names):
        streams = [s for s in val.get(name, []) if len(s)]
        if not streams:
            continue
        if not packing:
            try:
                val_sets.append(RowDataset(streams, seq_len, split="val", source_id=i))
            except AvaDataError:
                logger.warning("source %s: no validation row has a token to predict within %d tokens; "
                               "it is left out of validation", name, seq_len)
                continue
            val_names.append(name)
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
