"""Opening one file of a source: decompression (gz, zst), the encoding decided from its head,
binary data refused, lines split in the file's encoding and decoded under its ``encoding_errors``.
``_File`` carries what the readers in ``readers.py`` need (row names, the bad-row policy).
"""

from __future__ import annotations

import gzip
import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import zstandard

from ..config import SourceConfig
from ..errors import AvaDataError
from .encoding_detector import decode_bytes, encoding_label, is_wide, looks_binary, resolve_encoding
from .records import DataReport, Row

logger = logging.getLogger(__name__)

_HEAD_BYTES = 64 * 1024  # what the encoding is decided from
_CHUNK_BYTES = 1 << 20
_ZSTD_MAX_WINDOW = 1 << 31  # files written with `zstd --long=31`


# ---------------------------------------------------------------------------------------------
# the file and its bytes
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _File:
    """One file of a source being read, with what its rows and errors need."""

    path: Path
    prefix: str  # row-name prefix: "<source name>/<relative name>"
    suffix: str  # the format's suffix (".tsv"), compression suffix removed
    compression: str | None  # ".gz", ".zst" or None
    source: SourceConfig
    report: DataReport
    source_name: str
    columns: list[str] | None  # columns needed when known (text_field alone), else None = all

    def row(self, fields: dict[str, Any], where: str | None = None) -> Row:
        """A row at ``where`` (``"12"``, ``"row 3"``; None = the whole file)."""
        if where is None:
            return Row(fields, self.prefix, str(self.path))
        return Row(fields, f"{self.prefix}:{where}", f"{self.path}:{where}")

    def bad_row(self, where: str, kind: str, message: str) -> None:
        """Count a bad row under ``bad_rows: skip``, else raise naming the file and line/row."""
        location = f"{self.path}:{where}"
        if self.source.bad_rows == "skip":
            self.report.add(self.source_name, f"skipped rows ({kind})", location)
            return
        raise AvaDataError(
            f"{location}: {message} (or set bad_rows: skip on this source to count and skip such rows)"
        )

    def empty(self) -> None:
        """Count an empty file under ``bad_rows: skip``, else raise."""
        if self.source.bad_rows == "skip":
            self.report.add(self.source_name, "skipped files (empty)", str(self.path))
            return
        raise AvaDataError(
            f"{self.path}: empty file (no text or rows); add data or remove it from the source "
            "(or set bad_rows: skip on this source to count and skip empty files)"
        )

    def decode(self, raw: bytes, encoding: str, line: int | None, offset: int) -> str | None:
        """:func:`decode_bytes` under this source's ``encoding_errors``."""
        return decode_bytes(
            raw, encoding, self.source.encoding_errors, file=self.path, report=self.report,
            source_name=self.source_name, line=line, byte_offset=offset,
        )



def _open_binary(file: _File) -> BinaryIO:
    """The file's decompressed bytes as a stream that supports ``peek``."""
    if file.compression == ".gz":
        return gzip.open(file.path, "rb")  # type: ignore[return-value]
    if file.compression == ".zst":
        decompressor = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
        # read_across_frames: `zstd -T0`/pzstd output is several concatenated frames.
        reader = decompressor.stream_reader(open(file.path, "rb"), read_across_frames=True, closefd=True)
        return io.BufferedReader(reader, buffer_size=_CHUNK_BYTES)  # type: ignore[arg-type]
    return open(file.path, "rb")


# ---------------------------------------------------------------------------------------------
# text files: encoding, lines
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    """An open text file whose encoding is decided."""

    stream: BinaryIO  # positioned after ``head``
    head: bytes  # the first bytes after the BOM
    start: int  # byte offset of head[0] in the (decompressed) file: the BOM's length
    encoding: str
    empty: bool  # nothing but white space


@contextmanager
def _open_text(file: _File) -> Iterator[_Text]:
    """Open a text file: decompress, decide the encoding from its head, refuse binary data."""
    with _open_binary(file) as stream:
        head = stream.read(_HEAD_BYTES)  # buffered readers: short only at the end
        detected = resolve_encoding(head, file.source.encoding, file=file.path)
        if not is_wide(detected.encoding) and looks_binary(head):
            raise AvaDataError(
                f"{file.path}: looks like a binary file, not text (NUL or control bytes in its first "
                f"{len(head)} bytes); remove it from the source or set format: to its real format "
                "(a UTF-16 file without a BOM needs encoding: utf-16-le)"
            )
        if detected.encoding != "utf-8":
            logger.info(
                "%s: reading as %s (%s, confidence %.2f)",
                file.path, encoding_label(detected.encoding), detected.reason, detected.confidence,
            )
        body = head[detected.bom_length:]
        empty = len(head) < _HEAD_BYTES and not str(body, detected.encoding, "replace").strip()
        yield _Text(stream, body, detected.bom_length, detected.encoding, empty)


def _read_whole(file: _File) -> str | None:
    """A whole text file decoded; None when it is empty or skipped (both counted)."""
    with _open_text(file) as text:
        raw = b"" if text.empty else text.head + text.stream.read()
    content = file.decode(raw, text.encoding, None, text.start)
    if content is not None and not content.strip():
        file.empty()
        return None
    return content


def _lines(text: _Text) -> Iterator[tuple[int, int, bytes]]:
    """``(line number, byte offset, bytes)`` of each line, the newline included, read in chunks.

    The newline is ``"\\n"`` in the file's encoding; for UTF-16/32 a match must start on a code
    unit boundary (``0A 00`` can also be the tail of one character and the head of the next).
    """
    newline = "\n".encode(text.encoding)
    unit = len(newline)
    buf, start, search, offset, lineno = text.head, 0, 0, text.start, 0
    while True:
        pos = buf.find(newline, search)
        if pos < 0:
            # Read at least as much as is buffered, so a very long line costs O(n), not O(n²).
            chunk = text.stream.read(max(_CHUNK_BYTES, len(buf) - start))
            if not chunk:
                break
            search = max(0, min(search, len(buf) - unit + 1) - start)
            buf, start = buf[start:] + chunk, 0
            continue
        if (pos - start) % unit:
            search = pos + 1
            continue
        end = pos + unit
        lineno += 1
        yield lineno, offset, buf[start:end]
        offset += end - start
        start = search = end
    if start < len(buf):
        yield lineno + 1, offset, buf[start:]


class _DecodedLines:
    """The decoded lines of a text file (undecodable ones skipped under ``skip``), and the number
    of the line handed out last."""

    def __init__(self, file: _File, text: _Text) -> None:
        self._file, self._text, self.lineno = file, text, 0

    def __iter__(self) -> Iterator[str]:
        for lineno, offset, raw in _lines(self._text):
            self.lineno = lineno
            line = self._file.decode(raw, self._text.encoding, lineno, offset)
            if line is not None:
                yield line
