"""Reading data sources into rows and documents.

A source (``data.sources[i]``) is a file, a folder (read recursively in sorted order, hidden files
skipped) or a glob. Each file is read in its format, by extension with ``format: auto``:

- txt (.txt): the whole file is one row, ``{text_field: contents}``; row name ``a.txt``.
- jsonl (.jsonl, .ndjson): one JSON object per line, blank lines are not rows; ``a.jsonl:12``.
- json (.json): the elements of the top-level array of objects, or of the one list inside a
  top-level object (``{"version": 1, "data": [...]}``); ``a.json:row 0``.
- csv (.csv, .tsv = tab-separated): the header row names the columns; ``a.csv:12``.
- parquet (.parquet): table rows, streamed by record batch; ``a.parquet:row 0``.
- arrow (.arrow, .feather, .ipc): rows of an Arrow IPC file or stream; ``a.arrow:row 0``.

Line numbers are 1-based (a CSV record's is the line it starts on), ``row N`` is the 0-based index.
A file may be compressed, ``.gz`` or ``.zst`` (``data.jsonl.gz``); the format is then the suffix
before it. Parquet compresses internally and takes no outer compression. Only JSON (one value) and
txt (one document) files are read whole; the others are streamed.

Names: a row's name is ``<source name>/<file name relative to the source root>[:line | :row N]``,
so documents of different sources never share a name, and names never depend on where the data
lives; its location is the same with the real path (for messages).

Policies (every problem names the file and the line/row, and the fix):

- ``bad_rows: error`` raises at the first bad row (malformed JSON, not an object, a CSV record
  with the wrong number of fields, a missing or non-text field); ``skip`` counts it in the
  :class:`DataReport` as ``"skipped rows (<why>)"``. Empty files follow the same policy
  (``"skipped files (empty)"``); empty-text rows are always counted (``"empty rows"``).
- Whole-file problems raise under every policy: a binary file, a JSON document that does not
  parse or is not a list of objects, a missing column in a CSV/Parquet/Arrow file read for
  ``text_field`` alone, a corrupt compressed stream, an unreadable Parquet/Arrow file.
- Text encodings: see :mod:`.encoding_detector` (files are opened, decoded and split into lines
  in :mod:`.text_files`); the encoding is decided once per file from its first 64 KiB, and
  ``encoding_errors`` (strict/replace/skip) applies per line (JSONL, CSV) or per file (txt, JSON).
  A CSV line skipped as undecodable is left out of the record it is in.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import zstandard

from ..config import DataConfig, SourceConfig
from ..errors import AvaDataError
from .arrow_reader import check_columns, iter_arrow_rows, iter_parquet_rows
from .columns import row_to_document
from .corpus import embedded_corpus
from .records import DataReport, Document, Row, plural
from .text_files import _DecodedLines, _File, _open_binary, _open_text, _read_whole

logger = logging.getLogger(__name__)

CORPUS_SOURCE_NAME = "shakespeare"
_FORMAT_BY_SUFFIX = {
    ".txt": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv",
    ".tsv": "csv", ".parquet": "parquet", ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
}
_COMPRESSIONS = (".gz", ".zst")
_GLOB_MAGIC = ("*", "?", "[")
_UNSAFE_NAME = re.compile(r"[^\w.-]+")
_JSON_ROW = 'each line must be one JSON object, e.g. {"text": "..."}'


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------


def source_name(source: SourceConfig, index: int) -> str:
    """The name of a source in row names, logs, token accounting and shard folders.

    Args:
        source: the source.
        index: its position in ``data.sources`` (the name of last resort is ``source<index>``).

    Returns:
        ``source.name``, else the file's name without format/compression suffixes
        (``wiki.jsonl.gz`` → ``wiki``), the folder's name, or a glob's fixed leading folder
        (``data/wiki/*.jsonl`` → ``wiki``); made filesystem-safe (runs of characters other than
        letters, digits, ``.``, ``_`` and ``-`` become ``_``).
    """
    if source.name:
        raw = source.name
    else:
        path = Path(source.path).expanduser()
        if _is_glob(source.path):
            root = _glob_root(path)
            raw = (root if root.name else root.resolve()).name
        elif path.is_dir():
            raw = (path if path.name else path.resolve()).name
        else:
            raw = _strip_data_suffixes(path.name)
    return _UNSAFE_NAME.sub("_", raw).strip("._") or f"source{index}"


def source_names(sources: Sequence[SourceConfig]) -> list[str]:
    """:func:`source_name` of each source, checked to be distinct.

    Raises:
        AvaDataError: two sources with the same name (their documents and shards would mix).
    """
    names = [source_name(source, i) for i, source in enumerate(sources)]
    for i, name in enumerate(names):
        if name in names[:i]:
            first = names.index(name)
            raise AvaDataError(
                f"data.sources[{first}] ({sources[first].path!r}) and data.sources[{i}] "
                f"({sources[i].path!r}) are both named {name!r}; set a distinct name: on one of them"
            )
    return names


def resolve_files(pattern: str) -> list[tuple[Path, str]]:
    """Expand a source path to its files.

    Args:
        pattern: a file, a folder (read recursively; hidden files and folders are skipped) or a
            glob (``**`` matches folders recursively).

    Returns:
        ``(file, name)`` pairs in sorted path order; ``name`` is relative to the folder, or to
        the glob's fixed leading folder (the file name for a single file).

    Raises:
        AvaDataError: the path does not exist, the folder holds no files, or the glob matches
            no file.
    """
    path = Path(pattern).expanduser()
    if path.is_file():
        return [(path, path.name)]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            # Hidden files (.DS_Store, .gitkeep) are never data.
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise AvaDataError(f"data source folder {pattern!r} holds no files; add data files to it")
        return [(p, p.relative_to(path).as_posix()) for p in files]
    if _is_glob(pattern):
        files = sorted(p for p in map(Path, glob.glob(str(path), recursive=True)) if p.is_file())
        if not files:
            raise AvaDataError(
                f"data source glob {pattern!r} matches no file (relative to {Path.cwd()}); "
                "fix the pattern in data.sources"
            )
        root = _glob_root(path)
        return [(p, _relative_name(p, root)) for p in files]
    raise AvaDataError(
        f"data source {pattern!r} does not exist (relative to {Path.cwd()}); "
        "fix data.sources[].path or create the file"
    )


def iter_rows(source: SourceConfig, report: DataReport, name: str) -> Iterator[Row]:
    """Stream the rows of a source, file by file in sorted order, each file in its format.

    Args:
        source: the source config.
        report: where skipped rows/files and replaced bytes are counted.
        name: the source's name (:func:`source_name`); it prefixes the row names.

    Yields:
        The rows, in file order.

    Raises:
        AvaDataError: see the module docstring; every message names the file and line/row.
    """
    for path, relative in resolve_files(source.path):
        yield from _file_rows(source, report, name, path, relative)


def iter_documents(source: SourceConfig, report: DataReport, name: str) -> Iterator[Document]:
    """Stream the documents of a source: its rows rendered by ``row_to_document``.

    Rows that render to nothing (empty text, bad rows under ``bad_rows: skip``) are counted in
    ``report`` and left out. Arguments as :func:`iter_rows`. An error in one file of a folder
    that holds several says how to leave that file out (a glob matching the others, or moving
    it), since ``format:``/``text_field:`` on the source would apply to every file.
    """
    files = resolve_files(source.path)
    for path, relative in files:
        try:
            for row in _file_rows(source, report, name, path, relative):
                document = row_to_document(row, source, name, report)
                if document is not None:
                    yield document
        except AvaDataError as err:
            hint = _stray_file_hint(source.path, files, path)
            if hint is None:
                raise
            raise AvaDataError(f"{err}; {hint}") from None


def _file_rows(source: SourceConfig, report: DataReport, name: str, path: Path, relative: str) -> Iterator[Row]:
    """The rows of one file of a source, in its format."""
    columns = [source.text_field] if source.template is None and source.chat is None else None
    fmt, compression, suffix = _file_format(path, source.format)
    file = _File(path, f"{name}/{relative}", suffix, compression, source, report, name, columns)
    try:
        yield from _READERS[fmt](file)
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as err:
        raise AvaDataError(
            f"{path}: cannot read ({type(err).__name__}: {err}); check that the file is complete "
            "and readable (re-download or recompress it)"
        ) from None


def _data_suffix(path: Path) -> str:
    """``a.jsonl.gz`` → ``.jsonl.gz``, ``a.jsonl`` → ``.jsonl``, ``README`` → ``""``."""
    suffix = path.suffix.lower()
    if suffix in _COMPRESSIONS:
        return Path(path.stem).suffix.lower() + suffix
    return suffix


def _stray_file_hint(pattern: str, files: list[tuple[Path, str]], bad: Path) -> str | None:
    """How to leave ``bad`` out of a folder source holding other files (None: not such a source)."""
    folder = Path(pattern).expanduser()
    if _is_glob(pattern) or not folder.is_dir() or len(files) < 2:
        return None
    others = [(p, relative) for p, relative in files if p != bad]
    suffixes = [_data_suffix(p) for p, _ in others]
    common = max(set(suffixes), key=suffixes.count)
    relative = next(r for p, r in files if p == bad)
    move = f"move {relative} out of {pattern!r}"
    where = f"{len(others)} other file{'' if len(others) == 1 else 's'}"
    note = "format:/text_field: on the source would apply to every file"
    if common and common != _data_suffix(bad):
        nested = any("/" in r for _, r in others)
        glob_path = f"{pattern.rstrip('/')}/{'**/' if nested else ''}*{common}"
        return (f"if {relative} does not belong with the {where} in folder {pattern!r} ({note}), read "
                f"only the {common} files with path: {glob_path}, or {move}")
    return f"if {relative} does not belong with the {where} in folder {pattern!r} ({note}), {move}"


def read_source(source: SourceConfig, report: DataReport | None = None, name: str | None = None) -> list[Document]:
    """Read every document of one source.

    Args:
        source: the source config.
        report: where skipped rows and replaced bytes are counted; None = a report of its own,
            logged at the end.
        name: the source's name; None = :func:`source_name` ``(source, 0)``.

    Returns:
        The documents, files in sorted path order, rows in file order.

    Raises:
        AvaDataError: any reader error (see the module docstring), or no documents at all.
    """
    own_report = report is None
    report = DataReport() if report is None else report
    name = source_name(source, 0) if name is None else name
    documents = list(iter_documents(source, report, name))
    if own_report:
        report.log()
    if not documents:
        counted = ", ".join(f"{n} {kind}" for kind, n in report.to_dict().get(name, {}).items())
        raise AvaDataError(
            f"data source {source.path!r} holds no documents ({counted or 'no rows'}); add text or "
            "remove the source from data.sources"
        )
    skipped = report.skipped(name)
    logger.info("read %s from %s (source %s)%s", plural(len(documents), "document"), source.path, name,
                f"; {skipped} skipped (bad_rows: skip)" if skipped else "")
    return documents


def load_documents(data: DataConfig, seed: int = 0, report: DataReport | None = None) -> list[Document]:
    """All documents of a data config: its sources, or the embedded corpus when it has none.

    Args:
        data: the ``data`` config section.
        seed: seed of the shuffle that picks ``data.max_documents`` documents.
        report: where skipped rows and replaced bytes are counted; None = a report of its own,
            logged after reading.

    Returns:
        The documents sorted by name (then text), at most ``data.max_documents`` of them, chosen
        by a deterministic shuffle so the subset does not favour the first files. Each carries
        its ``source_name`` (``shakespeare`` for the embedded corpus, whose document names stay
        ``hamlet``, ``sonnets``, ...).

    Raises:
        AvaDataError: any reader error, or two sources with the same name.
    """
    if data.sources:
        own_report = report is None
        report = DataReport() if report is None else report
        names = source_names(data.sources)
        documents = [
            doc for source, name in zip(data.sources, names) for doc in read_source(source, report, name)
        ]
        if own_report:
            report.log()
    else:
        documents = [
            replace(doc, source_name=CORPUS_SOURCE_NAME) for doc in embedded_corpus(cache_dir=data.cache_dir)
        ]
    documents = sorted(documents, key=lambda d: (d.name, d.text))
    if data.max_documents is not None and len(documents) > data.max_documents:
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        keep = sorted(order[: data.max_documents])
        logger.info("using %d of %s (data.max_documents)", len(keep), plural(len(documents), "document"))
        documents = [documents[i] for i in keep]
    return documents


# ---------------------------------------------------------------------------------------------
# paths and formats of files
# ---------------------------------------------------------------------------------------------


def _is_glob(pattern: str) -> bool:
    return any(ch in pattern for ch in _GLOB_MAGIC)


def _glob_root(pattern: Path) -> Path:
    """The leading part of a glob pattern without wildcards (names are relative to it)."""
    parts: list[str] = []
    for part in pattern.parts:
        if _is_glob(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _relative_name(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.as_posix()


def _strip_data_suffixes(name: str) -> str:
    """``wiki.jsonl.gz`` → ``wiki``: a compression suffix, then a known format suffix."""
    path = Path(name)
    if path.suffix.lower() in _COMPRESSIONS:
        path = Path(path.stem)
    if path.suffix.lower() in _FORMAT_BY_SUFFIX:
        path = Path(path.stem)
    return path.name


def _file_format(path: Path, fmt: str) -> tuple[str, str | None, str]:
    """``(format, compression suffix or None, format suffix)`` of a file."""
    compression = path.suffix.lower() if path.suffix.lower() in _COMPRESSIONS else None
    suffix = Path(path.stem).suffix.lower() if compression else path.suffix.lower()
    if fmt != "auto":
        return fmt, compression, suffix
    found = _FORMAT_BY_SUFFIX.get(suffix)
    if found is None:
        known = ", ".join(_FORMAT_BY_SUFFIX)
        raise AvaDataError(
            f"{path}: cannot tell the format from the extension {suffix or '(none)'!r} (auto knows "
            f"{known}, optionally + .gz/.zst); set format: txt|jsonl|json|csv|parquet|arrow on this source"
        )
    return found, compression, suffix




# ---------------------------------------------------------------------------------------------
# formats
# ---------------------------------------------------------------------------------------------


def _read_txt(file: _File) -> Iterator[Row]:
    content = _read_whole(file)
    if content is not None:
        yield file.row({file.source.text_field: content})


def _read_jsonl(file: _File) -> Iterator[Row]:
    with _open_text(file) as text:
        if text.empty:
            file.empty()
            return
        lines = _DecodedLines(file, text)
        for line in lines:
            if not line or line.isspace():
                continue  # blank lines (e.g. a trailing newline) are not rows
            where = str(lines.lineno)
            try:
                fields = json.loads(line)
            except json.JSONDecodeError as err:
                message = f"malformed JSON ({err.msg} at column {err.colno}); {_JSON_ROW}"
                file.bad_row(where, "malformed JSON", message)
                continue
            if not isinstance(fields, dict):
                message = f"expected a JSON object, got {_json_kind(fields)}; {_JSON_ROW}"
                file.bad_row(where, "not an object", message)
                continue
            yield file.row(fields, where)


def _read_json(file: _File) -> Iterator[Row]:
    content = _read_whole(file)
    if content is None:
        return
    try:
        data = json.loads(content)
    except json.JSONDecodeError as err:
        raise AvaDataError(
            f"{file.path}:{err.lineno}: malformed JSON ({err.msg} at column {err.colno}); a .json source "
            "must be one JSON array of objects (use .jsonl for one object per line)"
        ) from None
    records = _json_records(file, data)
    if not records:
        file.empty()
    for index, fields in enumerate(records):
        where = f"row {index}"
        if isinstance(fields, dict):
            yield file.row(fields, where)
        else:
            file.bad_row(where, "not an object", f"expected a JSON object, got {_json_kind(fields)}; "
                         'the array must hold objects, e.g. [{"text": "..."}]')


def _json_records(file: _File, data: Any) -> list[Any]:
    """The record list of a JSON document: the array itself, or the one list in a top-level object."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            logger.info("%s: reading the records under key %r", file.path, lists[0])
            return data[lists[0]]
        keys = ", ".join(repr(k) for k in data) or "none"
        raise AvaDataError(
            f"{file.path}: expected a JSON array of objects, got an object (keys: {keys}) that does not "
            "hold exactly one list; make the file an array, or one object per line as .jsonl"
        )
    raise AvaDataError(
        f"{file.path}: expected a JSON array of objects, got {_json_kind(data)}; make the file an "
        'array such as [{"text": "..."}]'
    )


def _read_csv(file: _File) -> Iterator[Row]:
    delimiter = "\t" if file.suffix == ".tsv" else ","
    with _open_text(file) as text:
        lines = _DecodedLines(file, text)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next((r for r in reader if r), None)  # blank lines before the header are not rows
            if header is None:
                file.empty()
                return
            check_columns(file.path, header, file.columns)
            start = lines.lineno + 1
            for record in reader:
                where, start = str(start), lines.lineno + 1
                if not record:
                    continue  # a blank line
                if len(record) != len(header):
                    file.bad_row(where, "wrong field count",
                                 f"{len(record)} fields, but the header has {len(header)}; quote fields "
                                 f"that contain {delimiter!r}, quotes or newlines")
                    continue
                yield file.row(dict(zip(header, record)), where)
        except csv.Error as err:
            raise AvaDataError(
                f"{file.path}:{lines.lineno}: unreadable CSV ({err}); fix the file, or convert it to "
                "JSONL or Parquet"
            ) from None


def _read_parquet(file: _File) -> Iterator[Row]:
    if file.compression:
        raise AvaDataError(
            f"{file.path}: Parquet compresses internally and is read without an outer {file.compression}; "
            f"decompress it, or write it with pyarrow.parquet.write_table(..., compression='zstd')"
        )
    yield from _count_rows(file, iter_parquet_rows(file.path, file.prefix, file.columns))


def _read_arrow(file: _File) -> Iterator[Row]:
    with _open_binary(file) as stream:
        yield from _count_rows(file, iter_arrow_rows(file.path, file.prefix, file.columns, stream=stream))


def _count_rows(file: _File, rows: Iterator[Row]) -> Iterator[Row]:
    """Pass rows through; a file without any is empty."""
    empty = True
    for row in rows:
        empty = False
        yield row
    if empty:
        file.empty()


def _json_kind(value: Any) -> str:
    kinds = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


_READERS: dict[str, Callable[[_File], Iterator[Row]]] = {
    "txt": _read_txt, "jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv,
    "parquet": _read_parquet, "arrow": _read_arrow,
}
