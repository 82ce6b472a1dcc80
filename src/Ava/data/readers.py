"""Reading text sources into documents.

A source (``data.sources[i]``) is a file, a folder (read recursively, in sorted order) or a glob
pattern. Each file is read as ``txt`` (the whole file is one document) or ``jsonl`` (one document
per line, from ``text_field``). Every problem is raised as :class:`AvaDataError` naming the file,
the line (and byte offset for undecodable bytes) and the fix; nothing is dropped silently.
"""

from __future__ import annotations

import glob
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ..config import DataConfig, SourceConfig
from ..errors import AvaDataError
from .records import Document

logger = logging.getLogger(__name__)

_FORMAT_BY_SUFFIX = {".txt": "txt", ".jsonl": "jsonl"}
_GLOB_MAGIC = ("*", "?", "[")


def read_source(source: SourceConfig) -> list[Document]:
    """Read every document of one source.

    Args:
        source: the source config (``path`` is a file, folder or glob; ``format`` auto/txt/jsonl).

    Returns:
        The documents, files in sorted path order, JSONL lines in file order.

    Raises:
        AvaDataError: missing path, glob matching no file, unknown extension with ``format: auto``,
            undecodable bytes, malformed JSONL row, empty file or no documents at all.
    """
    files = _resolve_files(source.path)
    documents: list[Document] = []
    for file, name in files:
        fmt = _file_format(file, source.format)
        if fmt == "txt":
            documents.append(_read_txt(file, name))
        else:
            documents.extend(_read_jsonl(file, name, source.text_field))
    if not documents:
        raise AvaDataError(
            f"data source {source.path!r} holds no documents (every file is empty or every JSONL "
            f"row has empty {source.text_field!r}); add text or remove the source from data.sources"
        )
    logger.info("read %d documents from %s (%d files)", len(documents), source.path, len(files))
    return documents


def load_documents(data: DataConfig, seed: int = 0) -> list[Document]:
    """All documents of a data config: its sources, or the embedded corpus when it has none.

    Args:
        data: the ``data`` config section.
        seed: seed of the shuffle that picks ``data.max_documents`` documents.

    Returns:
        The documents sorted by name (then text), at most ``data.max_documents`` of them, chosen
        by a deterministic shuffle so the subset does not favour the first files.
    """
    if data.sources:
        documents = [doc for source in data.sources for doc in read_source(source)]
    else:
        # Imported here: corpus.py imports Document from this module.
        from .corpus import embedded_corpus

        documents = embedded_corpus(cache_dir=data.cache_dir)
    documents = sorted(documents, key=lambda d: (d.name, d.text))
    if data.max_documents is not None and len(documents) > data.max_documents:
        order = list(range(len(documents)))
        random.Random(seed).shuffle(order)
        keep = sorted(order[: data.max_documents])
        logger.info("using %d of %d documents (data.max_documents)", len(keep), len(documents))
        documents = [documents[i] for i in keep]
    return documents


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------


def _resolve_files(pattern: str) -> list[tuple[Path, str]]:
    """Expand a source path to ``(file, name)`` pairs in sorted order."""
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
            raise AvaDataError(f"data source folder {pattern!r} holds no files; add .txt/.jsonl files to it")
        return [(p, p.relative_to(path).as_posix()) for p in files]
    if any(ch in pattern for ch in _GLOB_MAGIC):
        matches = sorted(Path(m) for m in glob.glob(str(path), recursive=True))
        files = [p for p in matches if p.is_file()]
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


def _glob_root(pattern: Path) -> Path:
    """The leading part of a glob pattern without wildcards (names are relative to it)."""
    parts: list[str] = []
    for part in pattern.parts:
        if any(ch in part for ch in _GLOB_MAGIC):
            break
        parts.append(part)
    return Path(*parts) if parts else Path(".")


def _relative_name(file: Path, root: Path) -> str:
    try:
        return file.relative_to(root).as_posix()
    except ValueError:
        return file.as_posix()


def _file_format(file: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    found = _FORMAT_BY_SUFFIX.get(file.suffix.lower())
    if found is None:
        raise AvaDataError(
            f"{file}: cannot tell the format from the extension {file.suffix or '(none)'!r} "
            "(auto knows .txt and .jsonl); set format: txt or format: jsonl on this source"
        )
    return found


def _decode(raw: bytes, file: Path, line_offset: int = 0, byte_offset: int = 0) -> str:
    """Strict UTF-8 decode; errors name the file, line and byte offset."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = line_offset + raw.count(b"\n", 0, err.start) + 1
        raise AvaDataError(
            f"{file}:{line}: invalid UTF-8 at byte offset {byte_offset + err.start} "
            f"({raw[err.start:err.start + 4]!r}); convert the file to UTF-8 "
            "(e.g. iconv -f latin1 -t utf-8)"
        ) from None


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as err:
        raise AvaDataError(f"{file}: cannot read ({err.strerror}); check the path and permissions") from None


def _read_txt(file: Path, name: str) -> Document:
    raw = _read_bytes(file)
    if raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 BOM is an encoding marker, not text
        raw = raw[3:]
    text = _decode(raw, file)
    if not text.strip():
        raise AvaDataError(f"{file}: empty file (no text); add text or remove it from the source")
    return Document(name=name, text=text, source=str(file))


def _read_jsonl(file: Path, name: str, text_field: str) -> list[Document]:
    raw = _read_bytes(file)
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    if not raw.strip():
        raise AvaDataError(f"{file}: empty file (no JSON lines); add rows or remove it from the source")
    documents: list[Document] = []
    empty_rows = 0
    offset = 0
    for lineno, line_bytes in enumerate(raw.split(b"\n"), start=1):
        start, offset = offset, offset + len(line_bytes) + 1
        if not line_bytes.strip():
            continue  # blank lines (e.g. a trailing newline) are not rows
        line = _decode(line_bytes, file, line_offset=lineno - 1, byte_offset=start)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise AvaDataError(
                f"{file}:{lineno}: malformed JSON ({err.msg} at column {err.colno}); "
                "each line must be one JSON object, e.g. {\"text\": \"...\"}"
            ) from None
        if not isinstance(row, dict):
            raise AvaDataError(
                f"{file}:{lineno}: expected a JSON object, got {type(row).__name__}; "
                "each line must be one JSON object, e.g. {\"text\": \"...\"}"
            )
        if text_field not in row:
            fields = ", ".join(repr(k) for k in row) or "none"
            raise AvaDataError(
                f"{file}:{lineno}: no field {text_field!r} (fields: {fields}); "
                "set text_field on this source to the field that holds the text"
            )
        value = row[text_field]
        if not isinstance(value, str):
            raise AvaDataError(
                f"{file}:{lineno}: field {text_field!r} is {type(value).__name__}, not a string; "
                "fix the row or point text_field at a text field"
            )
        if not value:
            empty_rows += 1
            continue
        documents.append(Document(name=f"{name}:{lineno}", text=value, source=f"{file}:{lineno}"))
    if empty_rows:
        logger.warning("%s: skipped %d rows with empty %r", file, empty_rows, text_field)
    return documents
