"""Parquet and Arrow IPC sources: streaming by record batch, column projection, bad files."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import zstandard

from Ava.config import SourceConfig
from Ava.data import read_source
from Ava.data.arrow_reader import iter_arrow_rows, iter_parquet_rows
from Ava.data.readers import iter_documents, iter_rows
from Ava.data.records import DataReport
from Ava.errors import AvaDataError

TABLE = pa.table({"id": list(range(10)), "text": [f"doc {i}" for i in range(10)], "lang": ["en"] * 10})


def _parquet(path: Path, table: pa.Table = TABLE, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **kwargs)
    return path


def _ipc_bytes(table: pa.Table, *, stream: bool) -> bytes:
    sink = pa.BufferOutputStream()
    writer = ipc.new_stream(sink, table.schema) if stream else ipc.new_file(sink, table.schema)
    with writer:
        for batch in table.to_batches(max_chunksize=3):  # several batches
            writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_parquet_rows_names_and_locations(tmp_path: Path):
    f = _parquet(tmp_path / "p.parquet")
    docs = read_source(SourceConfig(path=str(f)))
    assert [d.text for d in docs] == [f"doc {i}" for i in range(10)]
    assert (docs[3].name, docs[3].source, docs[3].source_name) == ("p/p.parquet:row 3", f"{f}:row 3", "p")


def test_only_the_text_column_is_read_without_a_template(tmp_path: Path):
    f = _parquet(tmp_path / "p.parquet")
    plain = next(iter_rows(SourceConfig(path=str(f)), DataReport(), "p"))
    assert plain.fields == {"text": "doc 0"}
    templated = SourceConfig(path=str(f), template={"prompt": "{lang}: ", "response": "{text}"})
    assert next(iter_rows(templated, DataReport(), "p")).fields == {"id": 0, "text": "doc 0", "lang": "en"}


def test_parquet_is_streamed_batch_by_batch_across_row_groups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    n = 2500
    table = pa.table({"text": [f"row {i}" for i in range(n)]})
    f = _parquet(tmp_path / "big.parquet", table, row_group_size=300)
    assert pq.ParquetFile(f).num_row_groups == 9
    pulled: list[int] = []
    original = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        for batch in original(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    rows = iter_parquet_rows(f, "big/big.parquet", ["text"], batch_rows=100)
    assert next(rows).fields == {"text": "row 0"}
    assert pulled == [100]  # one batch in memory, not the file
    rest = list(rows)
    assert [r.fields["text"] for r in rest] == [f"row {i}" for i in range(1, n)]
    assert rest[-1].name == f"big/big.parquet:row {n - 1}"
    assert sum(pulled) == n and max(pulled) <= 100 and len(pulled) >= n // 100


def test_parquet_without_the_column_names_file_and_columns(tmp_path: Path):
    f = _parquet(tmp_path / "p.parquet")
    for policy in ("error", "skip"):  # a whole-file problem: raised under skip too
        with pytest.raises(AvaDataError) as err:
            read_source(SourceConfig(path=str(f), text_field="body", bad_rows=policy))
        assert str(err.value).startswith(f"{f}: no column 'body' (columns: 'id', 'text', 'lang'); set text_field")


def test_parquet_null_text_is_a_bad_row(tmp_path: Path):
    f = _parquet(tmp_path / "n.parquet", pa.table({"text": ["a", None, "c"]}))
    with pytest.raises(AvaDataError, match=rf"{f}:row 1: field 'text' is NoneType"):
        read_source(SourceConfig(path=str(f)))
    report = DataReport()
    docs = list(iter_documents(SourceConfig(path=str(f), bad_rows="skip"), report, "n"))
    assert [d.text for d in docs] == ["a", "c"]
    assert report.to_dict() == {"n": {"skipped rows (non-text field)": 1}}


def test_bad_parquet_files(tmp_path: Path):
    junk = _write(tmp_path / "junk.parquet", b"PAR1 not really parquet")
    with pytest.raises(AvaDataError, match=r"junk\.parquet: not a readable Parquet file"):
        read_source(SourceConfig(path=str(junk)))
    gz = _write(tmp_path / "p.parquet.gz", gzip.compress(_parquet(tmp_path / "x" / "p.parquet").read_bytes()))
    with pytest.raises(AvaDataError, match=r"p\.parquet\.gz: Parquet compresses internally"):
        read_source(SourceConfig(path=str(gz)))
    empty = _parquet(tmp_path / "empty.parquet", TABLE.slice(0, 0))
    with pytest.raises(AvaDataError, match=r"empty\.parquet: empty file"):
        read_source(SourceConfig(path=str(empty)))
    report = DataReport()
    assert list(iter_rows(SourceConfig(path=str(empty), bad_rows="skip"), report, "e")) == []
    assert report.to_dict() == {"e": {"skipped files (empty)": 1}}


@pytest.mark.parametrize(
    ("name", "stream", "compress"),
    [
        ("t.arrow", False, None),
        ("t.arrows.arrow", True, None),  # stream format under .arrow
        ("t.ipc", True, None),
        ("t.arrow.gz", False, gzip.compress),  # IPC file format read without seeking
        ("t.arrow.zst", True, zstandard.ZstdCompressor().compress),
    ],
)
def test_arrow_ipc_file_and_stream_formats(tmp_path: Path, name: str, stream: bool, compress):
    data = _ipc_bytes(TABLE, stream=stream)
    f = _write(tmp_path / name, compress(data) if compress else data)
    docs = read_source(SourceConfig(path=str(f)))
    assert [d.text for d in docs] == [f"doc {i}" for i in range(10)]
    assert docs[9].name.endswith(f"{name}:row 9")


def test_feather_v2_with_lz4_compressed_batches(tmp_path: Path):
    f = tmp_path / "t.feather"
    feather.write_feather(TABLE, f, chunksize=4)  # v2 = IPC file format, lz4 by default
    rows = list(iter_arrow_rows(f, "t/t.feather", ["text"]))
    assert [r.fields for r in rows] == [{"text": f"doc {i}"} for i in range(10)]
    assert rows[5].location == f"{f}:row 5"


def test_bad_arrow_files(tmp_path: Path):
    f = _write(tmp_path / "t.arrow", _ipc_bytes(TABLE, stream=False))
    with pytest.raises(AvaDataError, match=r"t\.arrow: no column 'body' \(columns: 'id', 'text', 'lang'\)"):
        read_source(SourceConfig(path=str(f), text_field="body", bad_rows="skip"))
    v1 = _write(tmp_path / "old.feather", b"FEA1" + b"\x00" * 64)
    with pytest.raises(AvaDataError, match=r"old\.feather: feather version 1 is not supported"):
        read_source(SourceConfig(path=str(v1)))
    junk = _write(tmp_path / "junk.arrow", b"definitely not arrow data")
    with pytest.raises(AvaDataError, match=r"junk\.arrow: not a readable Arrow IPC file or stream"):
        read_source(SourceConfig(path=str(junk)))
