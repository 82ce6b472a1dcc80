"""On-the-fly streaming data (``data.streaming: true``): read, tokenize and pack while training.

For data too big to prepare. Nothing is held in memory but a few chunks; the batch order is a
pure function of the data, the seed and the chunk size (not of the worker count), and a
:class:`StreamCursor` of two integers resumes it exactly. The order and validation arithmetic and
the per-source readers are in :mod:`Ava.data.stream_order`.

Shape suffixes: see ``Ava/__init__.py``; here ``Z`` documents per chunk (the rows of one chunk), ``N``
windows in a chunk, ``T`` = seq_len, ``B`` batch size; one value per source is written ``(sources,)``.

Document order
    The training stream is infinite: each source's documents in reader order (files sorted,
    rows in file order), minus its validation documents, from the beginning again when the
    source is exhausted (pass 0, 1, …). Sources are interleaved document by document with a
    smooth weighted round-robin: the next document comes from the source with the smallest
    ``(taken_s + 1) / w_s``, ties to the lower index (exact rational arithmetic). The
    interleaving depends only on the weights, so how many documents each source contributed to
    the first ``n`` is a closed form (:func:`source_counts`), and skipping never tokenizes.
Validation
    A document is a validation document iff its key ``sha256(seed, name)`` (the key
    :func:`~Ava.data.packing.split_documents` sorts by, read as a number in [0, 1)) falls below
    ``data.val_fraction``: a test of the document alone, no global view. ``split_documents``
    instead takes the ``round(n · val_fraction)`` smallest keys of a source; both pick by the same
    key, so for the same documents one split's validation set contains the other's, but their
    sizes differ slightly (here the share is ``val_fraction`` in expectation only).
Chunks
    Chunk ``c`` is documents ``[c·Z, (c+1)·Z)`` of the interleaved stream. It is tokenized
    (loss masks from templates/chat kept), packed into one stream (each document followed by
    EOS), cut into ``⌊tokens / T⌋`` windows (the tail is dropped, so every chunk can be rebuilt
    from its index alone) and its windows are shuffled with a generator seeded by
    ``(seed, c)``. A window spans documents of several sources; its ``source`` is the source
    holding most of its tokens (ties to the lower index).
Workers
    In a ``DataLoader(dataset, batch_size=None, num_workers=W)``, worker ``w`` builds chunks
    ``start + w, start + w + W, …`` and yields one item per chunk, also for a chunk without a
    full window (``N = 0``), because the DataLoader takes items round-robin from the workers in
    worker order: item ``k`` is chunk ``start + k`` for every ``W``. Each worker reads every
    document (it skips other workers' chunks without tokenizing them), so reading and parsing
    are repeated ``W`` times; only tokenizing and packing are split.
Resume
    :class:`StreamBatcher` cuts the chunk items into batches of ``B`` windows (a batch may span
    chunks) and reports after each the position of the next unconsumed window, a
    :class:`StreamCursor` ``(chunk, window)``. A batcher started from it starts the workers at
    that chunk (reading, not tokenizing, the documents before it) and skips ``window`` windows.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .. import errors
from ..config import DataConfig
from ..errors import AvaDataError, AvaError
from . import readers
from .datasets import PreparedData, build_tokenizer, build_validation_set
from .packing import TokenStream, tokenize_documents, window_sample
from .records import DataReport, Document, plural
from .stream_order import (
    _collect_validation, _first_pass, _SourceStream, interleave, is_validation, source_counts, validation_key,
)

if TYPE_CHECKING:
    from .tokenizer import AvaTokenizer

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_DOCUMENTS = 256
TOKENIZER_SAMPLE_CHARS = 20_000_000  # text a streaming run trains its BPE on (~20 MB)
WINDOW_KEYS = ("input_ids", "labels", "position_ids", "document_ids")
_WASTE_CHECK_CHUNKS = 16  # chunks seen before the dropped-tail share is judged
_WASTE_WARN_SHARE = 0.10

__all__ = [
    "DEFAULT_CHUNK_DOCUMENTS", "TOKENIZER_SAMPLE_CHARS", "StreamBatcher", "StreamCursor", "StreamingDataset",
    "interleave", "is_validation", "open_streaming", "source_counts", "validation_key",
]


# ---------------------------------------------------------------------------------------------
# the cursor
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamCursor:
    """Where a stream stands: the next unconsumed window is window ``window`` of chunk ``chunk``.

    Attributes:
        chunk: chunk index.
        window: windows of that chunk already consumed (in its shuffled order).
        documents: ``{source: documents}`` of the chunks before ``chunk`` (wholly consumed),
            counting repeats on later passes; for accounting only (resuming reads ``chunk`` and
            ``window``).
    """

    chunk: int = 0
    window: int = 0
    documents: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for checkpoints)."""
        return {"chunk": int(self.chunk), "window": int(self.window), "documents": dict(self.documents)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> StreamCursor:
        """The cursor of :meth:`to_dict`.

        Raises:
            AvaDataError: ``state`` lacks ``chunk``/``window`` or holds negative values.
        """
        try:
            chunk, window = int(state["chunk"]), int(state["window"])
        except (KeyError, TypeError, ValueError):
            raise AvaDataError(
                f"the data cursor {state!r} has no integer chunk/window; the checkpoint was not written by a "
                "data.streaming run (resume with the data settings it was trained with)"
            ) from None
        if chunk < 0 or window < 0:
            raise AvaDataError(f"the data cursor {state!r} holds a negative position; the checkpoint is damaged")
        return cls(chunk, window, {str(k): int(v) for k, v in dict(state.get("documents", {})).items()})


# ---------------------------------------------------------------------------------------------
# reading: the chunked interleaving
# ---------------------------------------------------------------------------------------------


class _ChunkReader:
    """The interleaved training stream of one process, read chunk by chunk, forwards only."""

    def __init__(self, dataset: StreamingDataset) -> None:
        self.weights = dataset.weights
        self.chunk_documents = dataset.chunk_documents
        self.streams = [
            _SourceStream(source, name, dataset.seed, dataset.data.val_fraction)
            for source, name in zip(dataset.data.sources, dataset.source_names)
        ]
        self.taken = [0] * len(self.streams)  # (sources,) documents read from each source
        self.position = 0  # the next chunk read() returns

    def seek(self, chunk: int) -> None:
        """Move to ``chunk`` (≥ the current position) without tokenizing anything in between."""
        assert chunk >= self.position, (chunk, self.position)
        target = source_counts(self.weights, chunk * self.chunk_documents)
        for stream, have, want in zip(self.streams, self.taken, target):
            stream.relay.target = None
            stream.skip(want - have)
        self.taken, self.position = target, chunk

    def read(self, report: DataReport | None = None) -> tuple[list[Document], list[int]]:
        """The documents of the current chunk and their source indices; moves to the next chunk.

        Args:
            report: receives the reader events of this chunk's documents (pass 0 only).
        """
        Z = self.chunk_documents
        order = interleave(self.weights, self.position * Z, (self.position + 1) * Z)  # (Z,)
        for stream in self.streams:
            stream.relay.target = report
        docs = [self.streams[s].next() for s in order]
        for stream in self.streams:
            stream.relay.target = None
        for s in order:
            self.taken[s] += 1
        self.position += 1
        return docs, order

    def passes(self) -> list[int]:
        """``(sources,)`` pass index of each source's last document."""
        return [stream.pass_index for stream in self.streams]


# ---------------------------------------------------------------------------------------------
# the dataset
# ---------------------------------------------------------------------------------------------


class StreamingDataset(IterableDataset):
    """The training stream as one item per chunk (see the module docstring).

    Iterating yields, for chunks ``start_chunk + w, start_chunk + w + W, …`` (worker ``w`` of
    ``W``; all chunks from ``start_chunk`` without workers), a dict:

    - ``input_ids``, ``labels``, ``position_ids``, ``document_ids``: ``(N, T)`` int64, the
      chunk's windows in their shuffled order (as :func:`~Ava.data.packing.window_sample`);
    - ``source``: ``(N,)`` int64, the source holding most of each window's tokens;
    - ``chunk``: 0-d int64; ``passes``: ``(sources,)`` int64, the pass each source was in at the
      chunk's end; ``tokens``: 0-d int64, the chunk's tokens (including the dropped tail);
    - ``report`` (only when the chunk's reads skipped or repaired something on pass 0): a tuple
      of ``(source, kind, count, examples)``;

    or, once, ``{"error": message, "error_type": name}`` when the data is unusable (an
    :class:`~Ava.errors.AvaError` raised inside a worker would reach the main process with a
    traceback in its message; :class:`StreamBatcher` raises it again, one line, same type).
    """

    def __init__(
        self, data: DataConfig, tokenizer: AvaTokenizer, seq_len: int, seed: int, *,
        chunk_documents: int = DEFAULT_CHUNK_DOCUMENTS, start_chunk: int = 0,
    ) -> None:
        """Describe the stream (nothing is read until iteration).

        Args:
            data: the ``data`` section (``sources``, their weights/templates, ``val_fraction``).
            tokenizer: the tokenizer.
            seq_len: tokens per window (T).
            seed: the run seed (validation membership, window shuffles).
            chunk_documents: documents per chunk (Z): larger chunks shuffle over more documents
                and drop a smaller share of tokens as chunk tails, at the cost of memory and
                a coarser resume (a resume re-tokenizes one chunk).
            start_chunk: the first chunk to yield.

        Raises:
            AvaDataError: no sources, two sources with the same name, a bad size.
        """
        if not data.sources:
            raise AvaDataError("data.streaming reads data.sources; add sources")
        if seq_len < 2:
            raise AvaDataError(f"data.seq_len={seq_len} must be at least 2")
        if chunk_documents < 1:
            raise AvaDataError(f"chunk_documents={chunk_documents} must be at least 1")
        if start_chunk < 0:
            raise AvaDataError(f"start_chunk={start_chunk} must be non-negative")
        self.data = data
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.seed = seed
        self.chunk_documents = chunk_documents
        self.start_chunk = start_chunk
        self.source_names = readers.source_names(data.sources)
        self.weights = [float(s.weight) for s in data.sources]

    def starting_at(self, chunk: int) -> StreamingDataset:
        """A copy that starts at ``chunk``."""
        other = copy.copy(self)
        other.start_chunk = chunk
        return other

    def documents_before(self, chunk: int) -> dict[str, int]:
        """``{source: documents}`` in chunks ``0 … chunk - 1`` (closed form, nothing is read)."""
        return dict(zip(self.source_names, source_counts(self.weights, chunk * self.chunk_documents)))

    def documents_of_chunk(self, chunk: int) -> list[Document]:
        """The documents of ``chunk`` in stream order (reads from the start; for inspection and tests)."""
        reader = _ChunkReader(self)
        reader.seek(chunk)
        return reader.read()[0]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        try:
            yield from self._chunks(self.start_chunk + worker, workers)
        except AvaError as err:  # a user error: StreamBatcher raises it again, message intact
            yield {"error": str(err), "error_type": type(err).__name__}

    def _chunks(self, first: int, step: int) -> Iterator[dict[str, Any]]:
        reader = _ChunkReader(self)
        chunk = first
        while True:
            reader.seek(chunk)
            report = DataReport()
            docs, sources_Z = reader.read(report)
            yield self.pack(chunk, docs, sources_Z, reader.passes(), report)
            chunk += step

    def pack(
        self, chunk: int, docs: Sequence[Document], sources_Z: Sequence[int], passes: Sequence[int],
        report: DataReport | None = None,
    ) -> dict[str, Any]:
        """Tokenize, pack, cut and shuffle one chunk's documents into its item (see the class docstring)."""
        T = self.seq_len
        stream = tokenize_documents(self.tokenizer, docs)
        N = len(stream) // T
        generator = torch.Generator().manual_seed(_chunk_seed(self.seed, chunk))
        order_N = torch.randperm(N, generator=generator)
        samples = [window_sample(stream, int(i) * T, T) for i in order_N]
        item: dict[str, Any] = {
            key: torch.stack([s[key] for s in samples]) if samples else torch.zeros((0, T), dtype=torch.int64)
            for key in WINDOW_KEYS
        }
        item["source"] = torch.from_numpy(_majority_source(stream, sources_Z, len(self.weights), N, T))[order_N]
        item["chunk"] = torch.tensor(chunk, dtype=torch.int64)
        item["passes"] = torch.tensor(list(passes), dtype=torch.int64)
        item["tokens"] = torch.tensor(len(stream), dtype=torch.int64)
        if report is not None and report.counts:
            item["report"] = tuple(
                (source, kind, count, tuple(report.examples.get((source, kind), [])))
                for (source, kind), count in sorted(report.counts.items())
            )
        return item


def _report_of(events: Sequence[tuple[str, str, int, Sequence[str]]]) -> DataReport:
    """The :class:`DataReport` of a chunk item's ``report`` tuples."""
    report = DataReport()
    for source, kind, count, examples in events:
        report.counts[(source, kind)] += int(count)
        report.examples[(source, kind)] = list(examples)
    return report


def _chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed & 0xFFFFFFFF, chunk]).generate_state(1)[0])


def _majority_source(stream: TokenStream, sources_Z: Sequence[int], num_sources: int, N: int, T: int) -> np.ndarray:
    """``(N,)`` the source holding most tokens of each window (in stream order; ties to the lower index)."""
    lengths_Z = np.diff(np.append(stream.doc_starts, len(stream)))
    token_source = np.repeat(np.asarray(sources_Z, dtype=np.int64), lengths_Z)[: N * T]  # (N·T,)
    rows = np.repeat(np.arange(N, dtype=np.int64), T)  # (N·T,)
    # (N, sources) tokens of each source per window
    counts = np.bincount(rows * num_sources + token_source, minlength=N * num_sources).reshape(N, num_sources)
    return counts.argmax(axis=1).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------


class StreamBatcher:
    """Micro-batches of ``B`` windows from a :class:`StreamingDataset`, with an exact resume cursor.

    Iterating yields ``(batch, cursor_after)`` forever: ``batch`` holds ``input_ids``,
    ``labels``, ``position_ids``, ``document_ids`` (each ``(B, T)`` int64) and ``source``
    ``(B,)``; ``cursor_after`` is the position of the next unconsumed window. A batcher built
    with that cursor yields exactly the batches an uninterrupted one yields next, for any
    ``num_workers``. Each iteration starts afresh from the constructor's cursor (or the one of
    :meth:`load_state_dict`); :attr:`cursor` follows the last batch yielded.

    Attributes:
        cursor: the position after the last batch yielded (the starting cursor before any).
        report: reader events (skipped rows, replaced characters) of the chunks read so far
            on pass 0 (chunks before the starting cursor are not read again and not counted).
    """

    def __init__(
        self, dataset: StreamingDataset, batch_size: int, num_workers: int, cursor: StreamCursor | None = None,
        *, pin_memory: bool = False,
    ) -> None:
        """Wrap a dataset.

        Args:
            dataset: the stream (its ``start_chunk`` is replaced by the cursor's chunk).
            batch_size: windows per micro-batch (B).
            num_workers: DataLoader worker processes (0 = build chunks in this process).
            cursor: where to start; None = the beginning.
            pin_memory: pin batches for faster host-to-GPU copies.
        """
        if batch_size < 1:
            raise AvaDataError(f"batch_size={batch_size} must be at least 1")
        if num_workers < 0:
            raise AvaDataError(f"data.num_workers={num_workers} must be non-negative")
        self.dataset = dataset
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._start = cursor if cursor is not None else StreamCursor(0, 0, dataset.documents_before(0))
        self.cursor = self._start
        self.report = DataReport()

    def state_dict(self) -> dict[str, Any]:
        """The cursor after the last batch yielded (:meth:`StreamCursor.to_dict`)."""
        return self.cursor.to_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration at the cursor of :meth:`state_dict`."""
        self._start = self.cursor = StreamCursor.from_dict(state)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], StreamCursor]]:
        start = self._start
        dataset = self.dataset.starting_at(start.chunk)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory)
        B, T = self.batch_size, dataset.seq_len
        parts: list[dict[str, torch.Tensor]] = []
        have = 0
        expected = start.chunk
        empty_since: torch.Tensor | None = None  # (sources,) passes at the first chunk of a run of empty ones
        tokens = windows = chunks = 0
        for item in loader:
            if "error" in item:
                error_type = getattr(errors, item["error_type"], AvaDataError)
                raise error_type(item["error"])
            chunk = int(item["chunk"])
            assert chunk == expected, f"chunk {chunk} arrived where chunk {expected} was due"
            expected += 1
            if "report" in item:
                self.report.merge(_report_of(item["report"]))
            N = int(item["input_ids"].shape[0])
            empty_since = self._check_progress(item, N, empty_since)
            tokens, windows, chunks = tokens + int(item["tokens"]), windows + N, chunks + 1
            if chunks == _WASTE_CHECK_CHUNKS and tokens and 1 - windows * T / tokens > _WASTE_WARN_SHARE:
                logger.warning(
                    "data.streaming: chunks of %d documents average %d tokens; %.0f%% of tokens fall in the "
                    "dropped tail of a chunk (shorter than data.seq_len=%d); use larger chunks or a shorter seq_len",
                    dataset.chunk_documents, tokens // chunks, 100 * (1 - windows * T / tokens), T,
                )
            position = 0
            if chunk == start.chunk and start.window:
                if start.window > N:
                    raise AvaDataError(
                        f"the data cursor points at window {start.window} of chunk {chunk}, which has {N} "
                        "windows: the data, data.seq_len or the chunk size changed since the checkpoint; "
                        "resume with the data settings it was trained with"
                    )
                position = start.window
            while position < N:
                take = min(B - have, N - position)
                parts.append({key: item[key][position:position + take] for key in (*WINDOW_KEYS, "source")})
                have += take
                position += take
                if have == B:
                    batch = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
                    after = (chunk, position) if position < N else (chunk + 1, 0)
                    self.cursor = StreamCursor(after[0], after[1], dataset.documents_before(after[0]))
                    parts, have = [], 0
                    yield batch, self.cursor

    def _check_progress(self, item: dict[str, Any], N: int, empty_since: torch.Tensor | None) -> torch.Tensor | None:
        """Track runs of chunks without a window; raise once one spans a whole pass of every source."""
        if N:
            return None
        passes = item["passes"]
        if empty_since is None:
            return passes
        # Pass p + 1 lies wholly inside the run once every source has reached pass p + 2.
        if bool((passes >= empty_since + 2).all()):
            raise AvaDataError(
                f"data.streaming: no chunk of {self.dataset.chunk_documents} documents holds a full window of "
                f"data.seq_len={self.dataset.seq_len} tokens in a whole pass over the sources; lower "
                "data.seq_len or use larger chunks (more documents per chunk)"
            )
        return empty_since


# ---------------------------------------------------------------------------------------------
# opening a streaming run
# ---------------------------------------------------------------------------------------------


def open_streaming(
    data: DataConfig, seed: int, *, eval_windows: int, chunk_documents: int = DEFAULT_CHUNK_DOCUMENTS,
    tokenizer_chars: int = TOKENIZER_SAMPLE_CHARS,
) -> PreparedData:
    """The tokenizer, the training stream and an in-memory validation set of a streaming run.

    Only prefixes of the sources' first pass are read here, the sources interleaved by weight
    (each document once):

    - the tokenizer: ``data.tokenizer.path``, or a byte-level BPE trained on the first
      ``tokenizer_chars`` characters (~20 MB) of training documents;
    - validation: the validation documents met, until they fill ``eval_windows`` windows of
      ``data.seq_len`` (counted per source, as the windows are cut) or the first pass ends;
      packed per source and mixed in proportion to size, as in the in-memory path.

    Args:
        data: the ``data`` section with ``streaming: true`` (``seq_len`` set).
        seed: the run seed.
        eval_windows: validation windows wanted (e.g. eval batches × batch size); 0 = none.
        chunk_documents: documents per training chunk.
        tokenizer_chars: characters of text a new BPE is trained on.

    Returns:
        ``train`` is a :class:`StreamingDataset` (iterate it with :class:`StreamBatcher`);
        ``val`` a :class:`~Ava.data.packing.PackedDataset` or
        :class:`~Ava.data.mixture.MixtureDataset`, None when ``val_fraction`` or
        ``eval_windows`` is 0 or no window was filled. Stats are those of the other paths with
        ``streaming: True``: the training split's size is unknown, so ``train_documents``,
        ``train_chars``, ``train_tokens`` and ``train_windows`` are 0. ``report`` holds the
        events of these reads (the training stream's are in :attr:`StreamBatcher.report`).

    Raises:
        AvaDataError: no sources, ``seq_len`` unset, ``dedup``/``max_documents`` set (they need
            every document at once), unreadable data, or a source without training documents.
    """
    start = time.perf_counter()
    if not data.sources:
        raise AvaDataError("data.streaming reads data.sources; add sources")
    if data.seq_len is None:
        raise AvaDataError("data.seq_len is not set; set it or model.max_seq_len (it defaults to the latter)")
    if data.dedup != "none":
        raise AvaDataError(
            f"data.dedup={data.dedup!r} needs every document at once, which data.streaming never holds; "
            "set data.dedup: none, or deduplicate with `ava prepare` and train on data.prepared"
        )
    if data.max_documents is not None:
        raise AvaDataError(
            "data.max_documents samples from all documents at once, which data.streaming never holds; "
            "remove data.max_documents or set data.streaming: false"
        )
    names = readers.source_names(data.sources)
    seq_len = data.seq_len

    tok_start = time.perf_counter()
    tokenizer_report = DataReport()
    sample_chars = 0
    if data.tokenizer.path is not None:
        tokenizer, tokenizer_source = build_tokenizer(data, [])
    else:
        def sample() -> Iterator[Document]:
            nonlocal sample_chars
            for _, doc, val in _first_pass(data, names, seed, tokenizer_report):
                if sample_chars >= tokenizer_chars:
                    return
                if not val:
                    sample_chars += len(doc.text)
                    yield doc

        tokenizer, tokenizer_source = build_tokenizer(data, sample())
        logger.info("data.streaming: tokenizer trained on the first %.1f MB of training text", sample_chars / 1e6)
    tok_seconds = time.perf_counter() - tok_start

    val_report = DataReport()
    val_docs: dict[str, list[Document]] = {}
    if data.val_fraction > 0 and eval_windows > 0:
        val_docs = _collect_validation(data, names, seed, tokenizer, seq_len, eval_windows, val_report)
    val_streams = {n: tokenize_documents(tokenizer, docs, n) for n, docs in val_docs.items() if docs}
    val_set = build_validation_set(names, {n: [stream] for n, stream in val_streams.items()}, seq_len, seed)
    if val_set is None and data.val_fraction > 0 and eval_windows > 0:
        logger.warning("data.streaming: no validation window: the validation documents of the first pass hold "
                       "fewer than data.seq_len=%d tokens per source; raise data.val_fraction or add data", seq_len)

    report = _union_of_prefixes(tokenizer_report, val_report)
    train = StreamingDataset(data, tokenizer, seq_len, seed, chunk_documents=chunk_documents)
    per_source = {
        name: {
            "weight": source.weight, "train_documents": 0, "train_tokens": 0,
            "val_documents": len(val_docs.get(name, [])),
            "val_tokens": len(val_streams[name]) if name in val_streams else 0,
        }
        for source, name in zip(data.sources, names)
    }
    stats: dict[str, Any] = {
        "streaming": True,
        "chunk_documents": chunk_documents,
        "train_documents": 0, "train_chars": 0, "train_tokens": 0, "train_windows": 0,
        "val_documents": sum(len(v) for v in val_docs.values()),
        "val_chars": sum(len(d.text) for v in val_docs.values() for d in v),
        "val_tokens": sum(v["val_tokens"] for v in per_source.values()) if val_set is not None else 0,
        "val_windows": len(val_set) if val_set is not None else 0,
        "seq_len": seq_len,
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_source": tokenizer_source,
        "tokenizer_seconds": round(tok_seconds, 3),
        "tokenizer_chars": sample_chars,
        "sources": per_source,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if report.counts:
        stats["data_report"] = report.to_dict()
    logger.info(
        "data.streaming: %s, chunks of %s, %s of %d tokens",
        plural(len(names), "source"), plural(chunk_documents, "document"), plural(stats["val_windows"], "validation window"),
        seq_len,
    )
    return PreparedData(tokenizer=tokenizer, train=train, val=val_set, source_names=names, stats=stats,
                        report=report)


def _union_of_prefixes(a: DataReport, b: DataReport) -> DataReport:
    """One report of two reads of prefixes of the same documents: per (source, kind) the larger count."""
    out = DataReport()
    for key in set(a.counts) | set(b.counts):
        bigger = a if a.counts.get(key, 0) >= b.counts.get(key, 0) else b
        out.counts[key] = bigger.counts[key]
        out.examples[key] = list(bigger.examples.get(key, []))
    return out
