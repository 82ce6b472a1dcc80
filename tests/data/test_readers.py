"""Readers: txt/jsonl files, folders, globs, and every bad-input error with file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from Ava.config import DataConfig, SourceConfig
from Ava.data import Document, load_documents, read_source
from Ava.errors import AvaDataError


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def test_txt_file_is_one_document(tmp_path: Path):
    f = _write(tmp_path / "a.txt", "Hello\nwörld\n")
    assert read_source(SourceConfig(path=str(f))) == [Document("a.txt", "Hello\nwörld\n", str(f))]


def test_txt_bom_is_stripped(tmp_path: Path):
    f = _write(tmp_path / "bom.txt", b"\xef\xbb\xbfHi")
    assert read_source(SourceConfig(path=str(f)))[0].text == "Hi"


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path):
    _write(tmp_path / "d" / "b.txt", "B")
    _write(tmp_path / "d" / "sub" / "a.txt", "A")
    _write(tmp_path / "d" / "a.txt", "first")
    _write(tmp_path / "d" / "c.jsonl", '{"text": "C1"}\n{"text": "C2"}\n')
    _write(tmp_path / "d" / ".DS_Store", b"\x00\x01")  # hidden files are skipped
    docs = read_source(SourceConfig(path=str(tmp_path / "d")))
    assert [(d.name, d.text) for d in docs] == [
        ("a.txt", "first"), ("b.txt", "B"), ("c.jsonl:1", "C1"), ("c.jsonl:2", "C2"), ("sub/a.txt", "A"),
    ]


def test_glob(tmp_path: Path):
    _write(tmp_path / "x" / "one.txt", "1")
    _write(tmp_path / "x" / "deep" / "two.txt", "2")
    _write(tmp_path / "x" / "skip.md", "not matched")
    docs = read_source(SourceConfig(path=str(tmp_path / "x" / "**" / "*.txt")))
    assert [(d.name, d.text) for d in docs] == [("deep/two.txt", "2"), ("one.txt", "1")]


def test_glob_matching_nothing(tmp_path: Path):
    with pytest.raises(AvaDataError, match=r"matches no file"):
        read_source(SourceConfig(path=str(tmp_path / "*.txt")))


def test_missing_path(tmp_path: Path):
    with pytest.raises(AvaDataError, match=r"does not exist"):
        read_source(SourceConfig(path=str(tmp_path / "nope.txt")))


def test_jsonl_one_document_per_line_with_text_field(tmp_path: Path):
    rows = [{"body": "first", "id": 1}, {"body": "sécond 🙂", "id": 2}]
    f = _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    docs = read_source(SourceConfig(path=str(f), text_field="body"))
    assert [(d.name, d.text, d.source) for d in docs] == [
        ("rows.jsonl:1", "first", f"{f}:1"), ("rows.jsonl:2", "sécond 🙂", f"{f}:2"),
    ]


def test_explicit_format_overrides_extension(tmp_path: Path):
    f = _write(tmp_path / "data.log", '{"text": "row"}\n')
    assert [d.text for d in read_source(SourceConfig(path=str(f), format="jsonl"))] == ["row"]
    assert [d.text for d in read_source(SourceConfig(path=str(f), format="txt"))] == ['{"text": "row"}\n']


def test_unknown_extension_names_file_and_fix(tmp_path: Path):
    f = _write(tmp_path / "data.csv", "a,b\n")
    with pytest.raises(AvaDataError) as err:
        read_source(SourceConfig(path=str(f)))
    assert str(f) in str(err.value) and "format" in str(err.value)


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n\n{"body": "x", "id": 3}\n', r"bad\.jsonl:3: no field 'text' \(fields: 'body', 'id'\)"),
        ('{"text": 42}\n', r"bad\.jsonl:1: field 'text' is int, not a string"),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object"),
    ],
)
def test_jsonl_row_errors_name_file_and_line(tmp_path: Path, content: str, pattern: str):
    f = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(AvaDataError, match=pattern):
        read_source(SourceConfig(path=str(f)))


def test_invalid_utf8_names_line_and_byte_offset(tmp_path: Path):
    txt = _write(tmp_path / "latin.txt", b"line one\nline two caf\xe9\n")
    with pytest.raises(AvaDataError, match=r"latin\.txt:2: invalid UTF-8 at byte offset 21"):
        read_source(SourceConfig(path=str(txt)))
    jsonl = _write(tmp_path / "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(AvaDataError, match=r"latin\.jsonl:2: invalid UTF-8 at byte offset 28"):
        read_source(SourceConfig(path=str(jsonl)))


def test_empty_files_and_sources_without_documents(tmp_path: Path):
    with pytest.raises(AvaDataError, match=r"empty\.txt: empty file"):
        read_source(SourceConfig(path=str(_write(tmp_path / "empty.txt", "  \n"))))
    with pytest.raises(AvaDataError, match=r"empty\.jsonl: empty file"):
        read_source(SourceConfig(path=str(_write(tmp_path / "empty.jsonl", "\n"))))
    blank_rows = _write(tmp_path / "blank.jsonl", '{"text": ""}\n{"text": ""}\n')
    with pytest.raises(AvaDataError, match=r"holds no documents"):
        read_source(SourceConfig(path=str(blank_rows)))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(AvaDataError, match=r"holds no files"):
        read_source(SourceConfig(path=str(tmp_path / "emptydir")))


def test_load_documents_sources_and_max_documents(tmp_path: Path):
    for i in range(10):
        _write(tmp_path / "many" / f"doc{i}.txt", f"text {i}")
    _write(tmp_path / "extra.jsonl", '{"text": "j1"}\n{"text": "j2"}\n')
    data = DataConfig(sources=[{"path": str(tmp_path / "many")}, {"path": str(tmp_path / "extra.jsonl")}])
    docs = load_documents(data)
    assert len(docs) == 12 and [d.name for d in docs] == sorted(d.name for d in docs)

    capped = DataConfig(sources=data.sources, max_documents=4)
    first = load_documents(capped, seed=3)
    assert len(first) == 4 and first == load_documents(capped, seed=3)  # deterministic
    assert {d.name for d in first} <= {d.name for d in docs}
    subsets = {tuple(d.name for d in load_documents(capped, seed=s)) for s in range(6)}
    # A shuffle, not the first four by name, picks the subset (and it varies with the seed).
    assert len(subsets) > 1
