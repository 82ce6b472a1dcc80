"""Parquet and Arrow IPC sources (IPC file and stream format, feather v2), one record batch at a time.

Neither reader loads a whole file: Parquet is read with ``ParquetFile.iter_batches`` (only the
needed columns are decoded), Arrow IPC as a message stream. An IPC *file* is its magic bytes, an
IPC stream and a footer, so both IPC flavours are read by the stream reader after skipping the
magic; this needs no seeking and therefore also works on ``.arrow.gz`` / ``.arrow.zst``.

Rows are named ``<prefix>:row N`` with N the 0-based row index in the file (as in
``table.slice(N, 1)``); their location is ``<file>:row N``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from ..errors import AvaDataError
from .records import Row

BATCH_ROWS = 1024
_IPC_FILE_MAGIC = b"ARROW1"
_IPC_FILE_HEADER = 8  # the magic and 2 bytes of padding
_FEATHER_V1_MAGIC = b"FEA1"


def iter_parquet_rows(
    file: Path, prefix: str, columns: Sequence[str] | None = None, *, batch_rows: int = BATCH_ROWS
) -> Iterator[Row]:
    """Stream the rows of a Parquet file, ``batch_rows`` at a time.

    Args:
        file: the Parquet file (its pages carry their own compression; no outer .gz/.zst).
        prefix: row-name prefix, ``<source name>/<file name relative to the source root>``.
        columns: the columns to read; None = all.
        batch_rows: rows per record batch held in memory.

    Yields:
        One :class:`Row` per table row, in file order.

    Raises:
        AvaDataError: a missing column (a whole-file problem, raised under every ``bad_rows``
            policy, naming the columns the file has), or a file pyarrow cannot read.
    """
    try:
        with pq.ParquetFile(file) as parquet:
            check_columns(file, parquet.schema_arrow.names, columns)
            batches = parquet.iter_batches(batch_size=batch_rows, columns=columns)
            yield from _rows(batches, file, prefix)
    except pa.ArrowException as err:
        raise _unreadable(file, "Parquet file", err) from None


def iter_arrow_rows(
    file: Path, prefix: str, columns: Sequence[str] | None = None, *, stream: BinaryIO | None = None
) -> Iterator[Row]:
    """Stream the rows of an Arrow IPC file, IPC stream or feather (v2) file, batch by batch.

    Args:
        file: the file (names the rows and the errors).
        prefix: row-name prefix, ``<source name>/<file name relative to the source root>``.
        columns: the columns to read; None = all. (IPC has no column projection: each batch is
            read whole, then narrowed.)
        stream: the file's (decompressed) bytes, positioned at the start and supporting
            ``peek``; None = open ``file``.

    Yields:
        One :class:`Row` per table row, in file order.

    Raises:
        AvaDataError: a missing column (under every ``bad_rows`` policy), a feather v1 file, or
            data that is not Arrow IPC.
    """
    if stream is None:
        with open(file, "rb") as own:
            yield from iter_arrow_rows(file, prefix, columns, stream=own)
        return
    head = stream.peek(_IPC_FILE_HEADER)[:_IPC_FILE_HEADER]
    if head.startswith(_FEATHER_V1_MAGIC):
        raise AvaDataError(
            f"{file}: feather version 1 is not supported; rewrite it as version 2 (python -c \"import "
            "pyarrow.feather as f; f.write_feather(f.read_table('IN'), 'OUT.feather')\")"
        )
    if head.startswith(_IPC_FILE_MAGIC):
        stream.read(_IPC_FILE_HEADER)
    try:
        reader = ipc.open_stream(stream)
        check_columns(file, reader.schema.names, columns)
        batches = reader if columns is None else (batch.select(columns) for batch in reader)
        yield from _rows(batches, file, prefix)
    except pa.ArrowException as err:
        raise _unreadable(file, "Arrow IPC file or stream", err) from None


def check_columns(file: Path, available: Sequence[str], needed: Sequence[str] | None) -> None:
    """Raise one clear error when a needed column is missing from a file.

    Raises:
        AvaDataError: ``{file}: no column 'text' (columns: 'a', 'b'); set text_field ...``.
    """
    missing = [c for c in needed or () if c not in available]
    if missing:
        have = ", ".join(repr(c) for c in available) or "none"
        raise AvaDataError(
            f"{file}: no column {missing[0]!r} (columns: {have}); set text_field on this source to "
            "the column that holds the text"
        )


def _unreadable(file: Path, what: str, err: Exception) -> AvaDataError:
    return AvaDataError(
        f"{file}: not a readable {what} ({err}); check that it is complete, or set the source's "
        "format to the file's real format"
    )


def _rows(batches: Iterable[pa.RecordBatch], file: Path, prefix: str) -> Iterator[Row]:
    index = 0
    for batch in batches:
        for fields in batch.to_pylist():
            yield Row(fields, f"{prefix}:row {index}", f"{file}:row {index}")
            index += 1
