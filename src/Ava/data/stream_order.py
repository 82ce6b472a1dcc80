"""Streaming document order: validation membership, the weighted round-robin over sources (with
closed-form per-source counts) and the per-source readers (endless training passes, the first pass).
``streaming.py`` builds the chunked stream on them; its docstring states the rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING

from ..config import DataConfig, SourceConfig
from ..errors import AvaDataError
from . import readers
from .packing import tokenize_documents
from .records import DataReport, Document

if TYPE_CHECKING:
    from .tokenizer import AvaTokenizer


# ---------------------------------------------------------------------------------------------
# validation membership and the weighted round-robin
# ---------------------------------------------------------------------------------------------


def validation_key(seed: int, name: str) -> float:
    """A document's split key in [0, 1): the first 8 bytes of ``sha256(f"{seed}\\0{name}")``.

    The same digest :func:`~Ava.data.packing.split_documents` sorts by, so both paths order
    documents alike.
    """
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def is_validation(seed: int, name: str, val_fraction: float) -> bool:
    """Whether the document named ``name`` is held out: its :func:`validation_key` is below ``val_fraction``."""
    return val_fraction > 0 and validation_key(seed, name) < val_fraction


def _fractions(weights: Sequence[float]) -> list[Fraction]:
    if not weights or any(w <= 0 for w in weights):
        raise AvaDataError(f"mixture weights must be positive, got {list(weights)}; fix data.sources[].weight")
    return [Fraction(w) for w in weights]  # exact: a float is a binary fraction


def source_counts(weights: Sequence[float], n: int) -> list[int]:
    """Documents each source contributes to the first ``n`` of the interleaved stream.

    The round-robin picks keys ``(k + 1) / w_s`` in increasing order (a merge of one sorted
    sequence per source), so the first ``n`` picks hold every key ``≤ n / Σw``, i.e.
    ``⌊n·w_s / Σw⌋`` of source ``s``, plus fewer than one pick per source made greedily.

    Args:
        weights: mixture weight per source (> 0).
        n: documents of the stream (≥ 0).

    Returns:
        One count per source, summing to ``n``.
    """
    w = _fractions(weights)
    total = sum(w)
    counts = [int(n * ws / total) for ws in w]  # floor of a non-negative Fraction
    for _ in range(n - sum(counts)):
        s = min(range(len(w)), key=lambda i: ((counts[i] + 1) / w[i], i))
        counts[s] += 1
    return counts


def interleave(weights: Sequence[float], start: int, stop: int) -> list[int]:
    """The source of each document ``start … stop - 1`` of the interleaved stream.

    Args:
        weights: mixture weight per source (> 0).
        start: first document index.
        stop: one past the last.

    Returns:
        ``stop - start`` source indices.
    """
    w = _fractions(weights)
    taken = source_counts(weights, start)
    order = []
    for _ in range(stop - start):
        s = min(range(len(w)), key=lambda i: ((taken[i] + 1) / w[i], i))
        taken[s] += 1
        order.append(s)
    return order


# ---------------------------------------------------------------------------------------------
# reading: one source's endless training documents, and the first pass
# ---------------------------------------------------------------------------------------------


class _Relay(DataReport):
    """A report that forwards events to ``target`` (the current chunk's report) or drops them."""

    def __init__(self) -> None:
        super().__init__()
        self.target: DataReport | None = None

    def add(self, source: str, kind: str, location: str = "", count: int = 1) -> None:
        if self.target is not None:
            self.target.add(source, kind, location, count)


def _no_training_documents(name: str, source: SourceConfig, read: int, val_fraction: float) -> AvaDataError:
    if read == 0:
        return AvaDataError(
            f"data source {name!r} ({source.path!r}) holds no documents; add text or remove it from data.sources"
        )
    return AvaDataError(
        f"data source {name!r} ({source.path!r}) has no training documents: all {read} of its documents "
        f"fall in the validation split (data.val_fraction={val_fraction}); add documents or lower data.val_fraction"
    )


class _SourceStream:
    """One source's training documents, pass after pass, read lazily.

    Reader events (skipped rows, replaced characters) are forwarded to ``relay.target`` on
    pass 0 only, so a bad row is counted once however often the source repeats.
    """

    def __init__(self, source: SourceConfig, name: str, seed: int, val_fraction: float) -> None:
        self.source, self.name, self.seed, self.val_fraction = source, name, seed, val_fraction
        self.relay = _Relay()
        self.pass_index = 0  # pass of the last document returned
        self._documents: Iterator[Document] | None = None
        self._read = 0  # documents read in the current pass (train and validation)
        self._train = 0  # of them, training documents

    def next(self) -> Document:
        """The next training document (restarting the source at its end)."""
        while True:
            if self._documents is None:
                # An unused relay on later passes keeps repeated events out of the counts.
                report = self.relay if self.pass_index == 0 else DataReport()
                self._documents = readers.iter_documents(self.source, report, self.name)
            doc = next(self._documents, None)
            if doc is None:
                if self._train == 0:
                    raise _no_training_documents(self.name, self.source, self._read, self.val_fraction)
                self.pass_index += 1
                self._documents, self._read, self._train = None, 0, 0
                continue
            self._read += 1
            if is_validation(self.seed, doc.name, self.val_fraction):
                continue
            self._train += 1
            return doc

    def skip(self, count: int) -> None:
        """Pass over ``count`` training documents (read, not tokenized)."""
        for _ in range(count):
            self.next()


def _first_pass(
    data: DataConfig, names: Sequence[str], seed: int, report: DataReport,
) -> Iterator[tuple[int, Document, bool]]:
    """``(source index, document, is validation)`` of every source's first pass, interleaved by weight.

    The same round-robin as the training stream over all documents read, each once; an
    exhausted source drops out.

    Raises:
        AvaDataError: a source that ends without a training document.
    """
    weights = _fractions([s.weight for s in data.sources])
    iterators = [readers.iter_documents(s, report, n) for s, n in zip(data.sources, names)]
    taken = [0] * len(iterators)
    train = [0] * len(iterators)
    active = list(range(len(iterators)))
    while active:
        s = min(active, key=lambda i: ((taken[i] + 1) / weights[i], i))
        doc = next(iterators[s], None)
        if doc is None:
            if train[s] == 0:
                raise _no_training_documents(names[s], data.sources[s], taken[s], data.val_fraction)
            active.remove(s)
            continue
        taken[s] += 1
        val = is_validation(seed, doc.name, data.val_fraction)
        train[s] += not val
        yield s, doc, val


def _collect_validation(
    data: DataConfig, names: Sequence[str], seed: int, tokenizer: AvaTokenizer, seq_len: int, eval_windows: int,
    report: DataReport,
) -> dict[str, list[Document]]:
    """Validation documents of the first pass, per source, until they fill ``eval_windows`` windows."""
    docs: dict[str, list[Document]] = {n: [] for n in names}
    tokens = dict.fromkeys(names, 0)
    pending: dict[str, list[Document]] = {n: [] for n in names}
    batch = 32  # documents counted per encode_batch call

    def count(name: str) -> None:
        tokens[name] += len(tokenize_documents(tokenizer, pending[name], name))
        docs[name].extend(pending[name])
        pending[name] = []

    def filled() -> bool:
        return sum(t // seq_len for t in tokens.values()) >= eval_windows

    for s, doc, val in _first_pass(data, names, seed, report):
        if not val:
            continue
        pending[names[s]].append(doc)
        if len(pending[names[s]]) >= batch:
            count(names[s])
            if filled():
                break
    for name in names:
        if pending[name]:
            count(name)
    return docs
