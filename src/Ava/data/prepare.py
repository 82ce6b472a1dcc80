"""Writing prepared folders (``ava prepare``): :func:`prepare_corpus` (config → folder) and
:func:`write_prepared` (documents → shards), chunks encoded on threads, the folder committed
atomically. The folder's layout and :func:`~.shards.load_prepared` are in ``shards.py``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import AvaDataError
from ..utils.output_paths import check_output_dir
from ..utils.progress import progress_bar
from .packing import token_dtype, tokenize_documents
from .records import DataReport, Document, plural
from .shards import FORMAT_NAME, FORMAT_VERSION, MANIFEST_FILE, SPLITS, TOKENIZER_FILE, _sha256
from .tokenizer import AvaTokenizer

if TYPE_CHECKING:
    from ..config import DataConfig
    from .pipeline import SplitDocuments

logger = logging.getLogger(__name__)

DEFAULT_SHARD_TOKENS = 1 << 27  # 256 MiB of uint16 ids per shard
DEFAULT_WORKERS = 2
# Text per encode_batch call: large enough that the Rust threads stay busy and per-call Python
# overhead is small, small enough that a chunk's token lists (~40 bytes per id) stay a few 100 MB.
CHUNK_CHARS = 2_000_000


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------


def write_prepared(
    out_dir: str | Path,
    split_docs: SplitDocuments,
    tokenizer: AvaTokenizer,
    *,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    report: DataReport | None = None,
    extra_manifest: Mapping[str, Any] | None = None,
    source_configs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    before_commit: Callable[[Path, dict[str, Any]], Mapping[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """Tokenize the documents of every split and source into shards, atomically.

    Documents are encoded in chunks of about :data:`CHUNK_CHARS` characters; ``workers`` chunks
    are in flight at once (each ``encode_batch`` call already runs on all Rust threads; a second
    one in flight overlaps the Python-side packing and writing of the previous chunk). Each
    source's stream is cut into shards of at most ``shard_tokens`` tokens at document boundaries
    (a document longer than that gets a shard of its own).

    Args:
        out_dir: the folder to create; it must not exist, be empty, or (with ``overwrite``) be a
            prepared folder, which is replaced only once the new one is complete.
        split_docs: source ``names`` (config order), documents per split and source
            (``train``/``val`` dicts, in stream order), the mixture ``weights`` and collection
            ``stats`` (see ``pipeline.collect_documents``).
        tokenizer: the tokenizer; saved as ``tokenizer.json`` in the folder.
        workers: encode chunks in flight (threads); None = :data:`DEFAULT_WORKERS`.
        shard_tokens: largest shard, in tokens.
        report: what the readers skipped or repaired; stored in the manifest.
        extra_manifest: more top-level manifest keys (e.g. the data config, the seed); they may
            not replace the keys written here.
        source_configs: the original ``data.sources`` entry of each source (JSON-able), by name.
        overwrite: replace an existing prepared folder.
        progress: show a progress bar; None = when stderr is a terminal.
        before_commit: called with the temporary folder and the manifest once the shards are
            written, before the manifest is; it may add files there (the data profile), and the
            mapping it returns is added to the manifest.

    Returns:
        The manifest that was written.

    Raises:
        AvaDataError: ``out_dir`` is in the way, or a split holds no documents at all.
        ValueError: ``shard_tokens`` or ``workers`` below 1, or ``extra_manifest`` reusing a key.
    """
    start = time.perf_counter()
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be ≥ 1, got {shard_tokens}")
    workers = DEFAULT_WORKERS if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, overwrite)
    splits = {"train": split_docs.train, "val": split_docs.val}
    if not any(split_docs.train.values()):
        raise AvaDataError("the train split holds no documents; add text to data.sources")

    dtype = token_dtype(tokenizer.vocab_size)
    names = list(split_docs.names)
    folders = _folder_names(names)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(3)}")
    tmp.mkdir()
    try:
        tokenizer.save(tmp / TOKENIZER_FILE)
        writers = {
            (split, name): _ShardWriter(tmp, f"{split}/{folders[name]}", dtype, shard_tokens,
                                        has_mask=any(d.segments is not None for d in splits[split].get(name, ())))
            for split in SPLITS for name in names
        }
        total_docs = sum(len(docs) for by_source in splits.values() for docs in by_source.values())
        jobs = (
            (key, chunk)
            for key in writers
            for chunk in _chunks(splits[key[0]].get(key[1], ()), CHUNK_CHARS)
        )
        with progress_bar(total_docs, "prepare", "doc", show=progress) as bar:
            for key, chunk, (tokens, starts, mask) in _encode_in_order(tokenizer, jobs, writers, workers):
                writers[key].add(tokens, starts, mask)
                bar.update(len(chunk))
                bar.set_postfix(tokens=f"{sum(w.num_tokens for w in writers.values()):,}", refresh=False)
        entries = {key: writer.close() for key, writer in writers.items()}

        manifest = _manifest(split_docs, tokenizer, tmp, dtype, shard_tokens, names, folders, entries,
                             report, source_configs)
        seconds = time.perf_counter() - start
        manifest["seconds"] = round(seconds, 3)
        manifest["tokens_per_second"] = round(manifest["totals"]["tokens"] / max(seconds, 1e-9), 1)
        extra = dict(extra_manifest or {})
        if before_commit is not None:
            extra.update(before_commit(tmp, manifest) or {})
        for key, value in extra.items():
            if key in manifest:
                raise ValueError(f"extra_manifest may not replace the manifest key {key!r}")
            manifest[key] = value
        # Written last: a folder with a manifest is complete.
        _write_file(tmp / MANIFEST_FILE, (json.dumps(manifest, indent=2, default=str) + "\n").encode())
        _commit(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    totals = manifest["totals"]
    logger.info(
        "prepared %s, %d tokens (%s) in %.1f s (%.0f tokens/s) -> %s",
        plural(totals["documents"], "document"), totals["tokens"],
        ", ".join(f"{s} {manifest['splits'][s]['tokens']}" for s in SPLITS),
        seconds, manifest["tokens_per_second"], out_dir,
    )
    return manifest


def check_out_dir(out_dir: str | Path, overwrite: bool) -> None:
    """Refuse an output folder that is in the way.

    Args:
        out_dir: the folder ``ava prepare`` will create.
        overwrite: whether an existing prepared folder may be replaced (``--force``).

    Raises:
        AvaDataError: ``out_dir`` is a file; or a non-empty folder without ``overwrite``; or a
            non-empty folder that is not a prepared folder (never deleted, even with ``overwrite``).
        AvaOutputError: the folder that would hold ``out_dir`` cannot be written.
    """
    out_dir = Path(out_dir).expanduser()
    check_output_dir(out_dir.parent, "--out")  # the folder is built beside it, then renamed into place
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise AvaDataError(f"--out {out_dir} is a file; choose a folder path")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST_FILE).is_file():
        raise AvaDataError(
            f"--out {out_dir} is a non-empty folder that is not a prepared folder (no {MANIFEST_FILE}); "
            "choose another --out (it is never replaced, even with --force)"
        )
    if not overwrite:
        raise AvaDataError(f"--out {out_dir} already holds a prepared folder; pass --force to replace it or choose another --out")


class _ShardWriter:
    """Appends whole documents of one split and source to shard files, cutting at ``shard_tokens``."""

    def __init__(self, root: Path, rel_dir: str, dtype: np.dtype, shard_tokens: int, has_mask: bool) -> None:
        self.root = root
        self.rel_dir = rel_dir
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.has_mask = has_mask
        self.entries: list[dict[str, Any]] = []
        self.num_tokens = 0
        self._files: tuple[Any, Any] | None = None  # open (tokens, mask) files of the current shard
        self._starts: list[np.ndarray] = []
        self._shard_tokens = 0

    def add(self, tokens: np.ndarray, starts: np.ndarray, mask: np.ndarray | None) -> None:
        """Append a chunk of whole documents.

        Args:
            tokens: ``(N,)`` ids of the chunk's documents, each followed by EOS.
            starts: ``(D,)`` offset of each document in ``tokens``.
            mask: ``(N,)`` uint8 loss mask, or None when the source has none.
        """
        ends = np.append(starts[1:], tokens.size)  # (D,) offset after each document
        first = 0
        while first < starts.size:
            room = self.shard_tokens - self._shard_tokens
            base = int(starts[first])
            # Documents first..last-1 fit into the room left in this shard.
            last = int(np.searchsorted(ends, base + room, side="right"))
            if last <= first:
                if self._shard_tokens:
                    self._finish_shard()
                    continue
                last = first + 1  # a document longer than a shard gets a shard of its own
            stop = int(ends[last - 1])
            self._append(tokens[base:stop], starts[first:last] - base, None if mask is None else mask[base:stop])
            first = last

    def _append(self, tokens: np.ndarray, starts: np.ndarray, mask: np.ndarray | None) -> None:
        if self._files is None:
            index = len(self.entries)
            path = self.root / self._name(index, "tokens.bin")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._files = (open(path, "wb"), open(self.root / self._name(index, "mask.bin"), "wb") if self.has_mask else None)
        tokens_file, mask_file = self._files
        tokens_file.write(np.ascontiguousarray(tokens, dtype=self.dtype).data)
        if mask_file is not None:
            mask_file.write(np.ascontiguousarray(mask, dtype=np.uint8).data)
        self._starts.append(starts.astype(np.int64) + self._shard_tokens)
        self._shard_tokens += int(tokens.size)
        self.num_tokens += int(tokens.size)

    def _finish_shard(self) -> None:
        assert self._files is not None
        index = len(self.entries)
        for handle in self._files:
            if handle is not None:
                _close_synced(handle)
        starts = np.concatenate(self._starts)
        handle = open(self.root / self._name(index, "docs.npy"), "wb")
        np.save(handle, starts)
        _close_synced(handle)
        self.entries.append({
            "tokens_file": self._name(index, "tokens.bin"),
            "docs_file": self._name(index, "docs.npy"),
            "mask_file": self._name(index, "mask.bin") if self.has_mask else None,
            "num_tokens": self._shard_tokens,
            "num_documents": int(starts.size),
        })
        self._files, self._starts, self._shard_tokens = None, [], 0

    def _name(self, index: int, suffix: str) -> str:
        return f"{self.rel_dir}/{index:05d}.{suffix}"

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; the shard entries for the manifest."""
        if self._files is not None:
            self._finish_shard()
        return self.entries


def _chunks(docs: Sequence[Document], chunk_chars: int) -> Iterator[list[Document]]:
    """Consecutive runs of documents holding about ``chunk_chars`` characters each."""
    chunk: list[Document] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc.text)
        if chars >= chunk_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _encode_in_order(
    tokenizer: AvaTokenizer,
    jobs: Iterable[tuple[tuple[str, str], list[Document]]],
    writers: Mapping[tuple[str, str], _ShardWriter],
    workers: int,
) -> Iterator[tuple[tuple[str, str], list[Document], tuple[np.ndarray, np.ndarray, np.ndarray | None]]]:
    """Encode chunks on ``workers`` threads, ``workers`` + 1 in flight, yielding them in order."""
    pending: deque[tuple[tuple[str, str], list[Document], Future]] = deque()
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ava-prepare") as pool:
        try:
            for key, chunk in jobs:
                writer = writers[key]
                pending.append((key, chunk, pool.submit(_encode_chunk, tokenizer, chunk, key[1],
                                                        writer.dtype, writer.has_mask)))
                if len(pending) > workers:
                    key0, chunk0, future = pending.popleft()
                    yield key0, chunk0, future.result()
            while pending:
                key0, chunk0, future = pending.popleft()
                yield key0, chunk0, future.result()
        finally:
            for _, _, future in pending:
                future.cancel()


def _encode_chunk(
    tokenizer: AvaTokenizer, docs: list[Document], source_name: str, dtype: np.dtype, has_mask: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Tokens (in the folder's ``dtype``), document starts and loss mask of a chunk.

    A source with loss masks gets one for every chunk (all ones where no document has segments).
    """
    stream = tokenize_documents(tokenizer, docs, source_name)
    mask = None
    if has_mask:
        mask = stream.loss_mask if stream.loss_mask is not None else np.ones(len(stream), np.uint8)
    return stream.tokens.astype(dtype, copy=False), stream.doc_starts, mask


def _manifest(
    split_docs: SplitDocuments,
    tokenizer: AvaTokenizer,
    folder: Path,
    dtype: np.dtype,
    shard_tokens: int,
    names: list[str],
    folders: Mapping[str, str],
    entries: Mapping[tuple[str, str], list[dict[str, Any]]],
    report: DataReport | None,
    source_configs: Mapping[str, Any] | None,
) -> dict[str, Any]:
    from .. import __version__

    splits: dict[str, Any] = {}
    for split in SPLITS:
        sources = {}
        for name in names:
            shards = entries[(split, name)]
            sources[name] = {
                "documents": sum(s["num_documents"] for s in shards),
                "tokens": sum(s["num_tokens"] for s in shards),
                "has_mask": any(s["mask_file"] is not None for s in shards),
                "shards": shards,
            }
        splits[split] = {
            "documents": sum(s["documents"] for s in sources.values()),
            "tokens": sum(s["tokens"] for s in sources.values()),
            "sources": sources,
        }
    stats = dict(split_docs.stats or {})
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ava_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": _sha256(folder / TOKENIZER_FILE)},
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "pad_id": tokenizer.pad_id,
        "dtype": dtype.name,
        "shard_tokens": shard_tokens,
        "sources": {
            name: {
                "weight": float(split_docs.weights.get(name, 1.0)),
                "folder": folders[name],
                "config": (source_configs or {}).get(name),
            }
            for name in names
        },
        "splits": splits,
        "totals": {
            "documents": sum(s["documents"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
        },
        "report": report.to_dict() if report is not None else {},
        "dedup": stats.get("dedup"),
        "stats": stats,
    }


def _folder_names(names: Sequence[str]) -> dict[str, str]:
    """A distinct, filesystem-safe folder name per source name."""
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "source"
        folder, n = base, 1
        while folder.lower() in used:
            n += 1
            folder = f"{base}_{n}"
        used.add(folder.lower())
        out[name] = folder
    return out


def _close_synced(handle: Any) -> None:
    handle.flush()
    os.fsync(handle.fileno())
    handle.close()


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        _close_synced(handle)


def _commit(tmp: Path, out_dir: Path) -> None:
    """Move the complete folder ``tmp`` to ``out_dir``, replacing what is there only after that."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}-{secrets.token_hex(3)}")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# prepare_corpus: config → folder
# --------------------------------------------------------------------------------------------


def prepare_corpus(
    data: DataConfig,
    out_dir: str | Path,
    seed: int,
    *,
    workers: int | None = None,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    tokenizer_path: str | Path | None = None,
    profile: bool = True,
    overwrite: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Read, split and tokenize a ``data`` config into a prepared folder.

    The same documents and split as training from ``data.sources`` (``collect_documents``), the
    tokenizer loaded from ``data.tokenizer.path`` or trained on the train split
    (``build_tokenizer``), then :func:`write_prepared`. With ``profile``, the data profile
    (``profile.json`` and ``profile.png``, see ``data/profile.py``) is written into the folder
    before it is committed.

    Args:
        data: the ``data`` section (``data.prepared`` must not be set).
        out_dir: the folder to create (see :func:`write_prepared`).
        seed: the run seed (document subset and train/validation split).
        workers: encode chunks in flight; None = :data:`DEFAULT_WORKERS`.
        shard_tokens: largest shard, in tokens.
        tokenizer_path: a ``tokenizer.json`` to use instead of ``data.tokenizer.path``.
        profile: also write the data profile (lengths, tokens per source, duplicates).
        overwrite: replace an existing prepared folder.
        progress: show a progress bar; None = when stderr is a terminal.

    Returns:
        The manifest, with ``"collect_seconds"``, ``"tokenizer_seconds"``, ``"tokenizer_source"``,
        ``"seed"``, ``"data_config"`` and (with ``profile``) ``"profile"`` (its file names) added.

    Raises:
        AvaDataError: ``data.prepared`` is set, ``out_dir`` is in the way, or the data is unusable.
    """
    from .datasets import build_tokenizer
    from .pipeline import collect_documents

    if data.prepared is not None:
        raise AvaDataError(
            f"data.prepared is set ({data.prepared}): the config already reads prepared shards; "
            "remove data.prepared and set data.sources to prepare them"
        )
    out_dir = Path(out_dir).expanduser()
    check_out_dir(out_dir, overwrite)  # before minutes of reading and tokenizer training
    if tokenizer_path is not None:
        data = data.model_copy(update={"tokenizer": data.tokenizer.model_copy(update={"path": str(tokenizer_path)})})

    report = DataReport()
    start = time.perf_counter()
    split_docs = collect_documents(data, seed, report)
    collect_seconds = time.perf_counter() - start
    start = time.perf_counter()
    tokenizer, tokenizer_source = build_tokenizer(data, split_docs.all_train())
    tokenizer_seconds = time.perf_counter() - start
    report.log()
    manifest = write_prepared(
        out_dir, split_docs, tokenizer, workers=workers, shard_tokens=shard_tokens, report=report,
        source_configs=_source_configs(data, list(split_docs.names)), overwrite=overwrite,
        progress=progress, before_commit=_profile_writer(split_docs, report) if profile else None,
        extra_manifest={
            "tokenizer_source": tokenizer_source,
            "collect_seconds": round(collect_seconds, 3),
            "tokenizer_seconds": round(tokenizer_seconds, 3),
            "seed": seed,
            "data_config": data.model_dump(mode="json"),
        },
    )
    return manifest


def _source_configs(data: DataConfig, names: list[str]) -> dict[str, Any]:
    """The ``data.sources`` entry of each collected source (None for the embedded corpus)."""
    from .readers import source_name

    by_name = {source_name(s, i): s.model_dump(mode="json") for i, s in enumerate(data.sources)}
    return {name: by_name.get(name) for name in names}


def _profile_writer(
    split_docs: SplitDocuments, report: DataReport
) -> Callable[[Path, dict[str, Any]], dict[str, Any]]:
    """A ``before_commit`` hook writing ``profile.json``/``.png`` (``data/profile.py``) into the folder."""

    def write(folder: Path, manifest: dict[str, Any]) -> dict[str, Any]:
        from .profile import profile_documents, write_profile

        docs: list[Document] = []
        token_counts: dict[str, int] = {}
        for name in split_docs.names:
            source_docs = [*split_docs.train.get(name, ()), *split_docs.val.get(name, ())]
            docs.extend(source_docs)
            # The profile groups documents by their own source_name ("" for the embedded corpus).
            key = source_docs[0].source_name if source_docs else name
            token_counts[key] = sum(manifest["splits"][split]["sources"][name]["tokens"] for split in SPLITS)
        profile = profile_documents(docs, token_counts=token_counts, report=report,
                                    dedup=(split_docs.stats or {}).get("dedup"))
        json_path, png_path = write_profile(profile, folder)
        return {"profile": {"json": json_path.name, "png": png_path.name}}

    return write
