"""Readers: every format, compression, folders and globs, names, encodings, and every bad input
with its file and line, raised or counted."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest
import zstandard

import Ava.data.text_files as text_files
from Ava.config import DataConfig, SourceConfig
from Ava.data import Document, load_documents, read_source
from Ava.data.readers import iter_documents, iter_rows, resolve_files, source_name, source_names
from Ava.data.records import DataReport
from Ava.errors import AvaDataError


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _texts(path: Path, **source) -> list[str]:
    return [d.text for d in read_source(SourceConfig(path=str(path), **source))]


def _skipping(path: Path, **source) -> tuple[list[Document], dict[str, int]]:
    """Read under bad_rows: skip; returns the documents and the report's counts for the source."""
    report = DataReport()
    config = SourceConfig(path=str(path), bad_rows="skip", **source)
    docs = list(iter_documents(config, report, "s"))
    return docs, report.to_dict().get("s", {})


# ---------------------------------------------------------------------------------------------
# files, folders, globs, names
# ---------------------------------------------------------------------------------------------


def test_txt_file_is_one_document(tmp_path: Path):
    f = _write(tmp_path / "a.txt", "Hello\nwörld\n")
    assert read_source(SourceConfig(path=str(f))) == [
        Document("a/a.txt", "Hello\nwörld\n", str(f), source_name="a")
    ]


def test_txt_bom_is_stripped(tmp_path: Path):
    f = _write(tmp_path / "bom.txt", b"\xef\xbb\xbfHi")
    assert _texts(f) == ["Hi"]


def test_folder_is_read_recursively_in_sorted_order(tmp_path: Path):
    _write(tmp_path / "d" / "b.txt", "B")
    _write(tmp_path / "d" / "sub" / "a.txt", "A")
    _write(tmp_path / "d" / "a.txt", "first")
    _write(tmp_path / "d" / "c.jsonl", '{"text": "C1"}\n{"text": "C2"}\n')
    _write(tmp_path / "d" / ".DS_Store", b"\x00\x01")  # hidden files are skipped
    _write(tmp_path / "d" / ".git" / "HEAD", "ref")  # and hidden folders
    docs = read_source(SourceConfig(path=str(tmp_path / "d")))
    assert [(d.name, d.text, d.source_name) for d in docs] == [
        ("d/a.txt", "first", "d"), ("d/b.txt", "B", "d"), ("d/c.jsonl:1", "C1", "d"),
        ("d/c.jsonl:2", "C2", "d"), ("d/sub/a.txt", "A", "d"),
    ]
    assert resolve_files(str(tmp_path / "d"))[-1] == (tmp_path / "d" / "sub" / "a.txt", "sub/a.txt")


def test_glob(tmp_path: Path):
    _write(tmp_path / "x" / "one.txt", "1")
    _write(tmp_path / "x" / "deep" / "two.txt", "2")
    _write(tmp_path / "x" / "skip.md", "not matched")
    docs = read_source(SourceConfig(path=str(tmp_path / "x" / "**" / "*.txt")))
    assert [(d.name, d.text) for d in docs] == [("x/deep/two.txt", "2"), ("x/one.txt", "1")]


def test_glob_matching_nothing(tmp_path: Path):
    pattern = str(tmp_path / "*.txt")
    with pytest.raises(AvaDataError, match=r"matches no file") as err:
        read_source(SourceConfig(path=pattern))
    assert repr(pattern) in str(err.value)


def test_missing_path(tmp_path: Path):
    with pytest.raises(AvaDataError, match=r"does not exist"):
        read_source(SourceConfig(path=str(tmp_path / "nope.txt")))


def test_source_names(tmp_path: Path):
    (tmp_path / "wiki dump").mkdir()
    cases = {
        str(tmp_path / "news.jsonl.gz"): "news",
        str(tmp_path / "notes.v2.txt"): "notes.v2",
        str(tmp_path / "wiki dump"): "wiki_dump",  # folder name, made filesystem-safe
        str(tmp_path / "corpus" / "**" / "*.parquet"): "corpus",  # the glob's fixed folder
    }
    for path, expected in cases.items():
        assert source_name(SourceConfig(path=path), 3) == expected
    assert source_name(SourceConfig(path="x.txt", name="my/wiki: en"), 0) == "my_wiki_en"
    assert source_name(SourceConfig(path="x.txt", name="..."), 4) == "source4"
    same = [SourceConfig(path="a/train.jsonl"), SourceConfig(path="b/train.jsonl")]
    with pytest.raises(AvaDataError, match=r"data\.sources\[0\].*data\.sources\[1\].*both named 'train'"):
        source_names(same)
    assert source_names([same[0], SourceConfig(path="b/train.jsonl", name="b")]) == ["train", "b"]


def test_explicit_format_overrides_extension(tmp_path: Path):
    f = _write(tmp_path / "data.log", '{"text": "row"}\n')
    assert _texts(f, format="jsonl") == ["row"]
    assert _texts(f, format="txt") == ['{"text": "row"}\n']


def test_unknown_extension_names_file_and_fix(tmp_path: Path):
    f = _write(tmp_path / "data.dat", "a,b\n")
    with pytest.raises(AvaDataError) as err:
        read_source(SourceConfig(path=str(f)))
    assert str(f) in str(err.value) and "format" in str(err.value) and ".jsonl" in str(err.value)


def test_txt_row_uses_text_field(tmp_path: Path):
    # A folder mixing .txt and JSONL with another text_field still reads the text files.
    _write(tmp_path / "m" / "a.txt", "plain")
    _write(tmp_path / "m" / "b.jsonl", '{"body": "json"}\n')
    assert _texts(tmp_path / "m", text_field="body") == ["plain", "json"]


def test_iter_rows_streams_rows_with_names_and_locations(tmp_path: Path):
    f = _write(tmp_path / "r.jsonl", '{"text": "a", "n": 1}\n\n{"text": "b", "n": 2}\n')
    rows = iter_rows(SourceConfig(path=str(f)), DataReport(), "src")
    first = next(rows)
    assert (first.fields, first.name, first.location) == ({"text": "a", "n": 1}, "src/r.jsonl:1", f"{f}:1")
    assert [r.name for r in rows] == ["src/r.jsonl:3"]


# ---------------------------------------------------------------------------------------------
# JSONL and bad rows
# ---------------------------------------------------------------------------------------------


def test_jsonl_one_document_per_line_with_text_field(tmp_path: Path):
    rows = [{"body": "first", "id": 1}, {"body": "sécond 🙂", "id": 2}]
    f = _write(tmp_path / "rows.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    docs = read_source(SourceConfig(path=str(f), text_field="body"))
    assert [(d.name, d.text, d.source) for d in docs] == [
        ("rows/rows.jsonl:1", "first", f"{f}:1"), ("rows/rows.jsonl:2", "sécond 🙂", f"{f}:2"),
    ]


def test_jsonl_crlf_and_no_final_newline(tmp_path: Path):
    f = _write(tmp_path / "w.jsonl", b'{"text": "a"}\r\n{"text": "b"}')
    assert _texts(f) == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('{"text": "ok"}\n{"text": "broken"\n', r"bad\.jsonl:2: malformed JSON"),
        ('{"text": "ok"}\n\n{"body": "x", "id": 3}\n', r"bad\.jsonl:3: no field 'text' \(fields: 'body', 'id'\)"),
        ('{"text": 42}\n', r"bad\.jsonl:1: field 'text' is int, not a string"),
        ('["text"]\n', r"bad\.jsonl:1: expected a JSON object, got an array"),
    ],
)
def test_jsonl_row_errors_name_file_and_line(tmp_path: Path, content: str, pattern: str):
    f = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(AvaDataError, match=pattern) as err:
        read_source(SourceConfig(path=str(f)))
    assert "bad_rows: skip" in str(err.value)


def test_jsonl_bad_rows_skip_counts_every_row(tmp_path: Path):
    f = _write(tmp_path / "mixed.jsonl", "\n".join([
        '{"text": "good one"}',
        '{"text": "broken"',
        '"just a string"',
        '{"body": "no text field"}',
        '{"text": null}',
        '{"text": "   "}',
        '{"text": "good two"}',
    ]) + "\n")
    docs, counts = _skipping(f)
    assert [(d.name, d.text) for d in docs] == [("s/mixed.jsonl:1", "good one"), ("s/mixed.jsonl:7", "good two")]
    assert counts == {
        "skipped rows (malformed JSON)": 1, "skipped rows (not an object)": 1,
        "skipped rows (missing field)": 1, "skipped rows (non-text field)": 1, "empty rows": 1,
    }


def test_empty_files_and_sources_without_documents(tmp_path: Path):
    with pytest.raises(AvaDataError, match=r"empty\.txt: empty file"):
        read_source(SourceConfig(path=str(_write(tmp_path / "empty.txt", "  \n"))))
    with pytest.raises(AvaDataError, match=r"empty\.jsonl: empty file"):
        read_source(SourceConfig(path=str(_write(tmp_path / "empty.jsonl", "\n"))))
    with pytest.raises(AvaDataError, match=r"zero\.csv: empty file"):
        read_source(SourceConfig(path=str(_write(tmp_path / "zero.csv", b""))))
    blank_rows = _write(tmp_path / "blank.jsonl", '{"text": ""}\n{"text": ""}\n')
    with pytest.raises(AvaDataError, match=r"holds no documents \(2 empty rows\)"):
        read_source(SourceConfig(path=str(blank_rows)))
    (tmp_path / "emptydir").mkdir()
    with pytest.raises(AvaDataError, match=r"holds no files"):
        read_source(SourceConfig(path=str(tmp_path / "emptydir")))


def test_empty_files_are_counted_under_skip(tmp_path: Path):
    _write(tmp_path / "e" / "a.txt", "text")
    _write(tmp_path / "e" / "b.txt", "")
    _write(tmp_path / "e" / "c.jsonl", "\n\n")
    _write(tmp_path / "e" / "d.json", "[]")
    docs, counts = _skipping(tmp_path / "e")
    assert [d.text for d in docs] == ["text"] and counts == {"skipped files (empty)": 3}


# ---------------------------------------------------------------------------------------------
# JSON and CSV
# ---------------------------------------------------------------------------------------------


def test_json_array_and_object_holding_one_list(tmp_path: Path):
    f = _write(tmp_path / "a.json", json.dumps([{"text": "one"}, {"text": "two", "x": [1]}]))
    assert [(d.name, d.source) for d in read_source(SourceConfig(path=str(f)))] == [
        ("a/a.json:row 0", f"{f}:row 0"), ("a/a.json:row 1", f"{f}:row 1"),
    ]
    g = _write(tmp_path / "b.json", json.dumps({"version": "1.0", "data": [{"text": "inner"}]}))
    assert _texts(g) == ["inner"]


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ('[{"text": "a"},\n {"text": }]', r"bad\.json:2: malformed JSON \(Expecting value at column 11\)"),
        ('"text"', r"bad\.json: expected a JSON array of objects, got a string"),
        ('{"a": [], "b": []}', r"bad\.json: expected a JSON array of objects, got an object \(keys: 'a', 'b'\)"),
        ('[{"text": "a"}, 3]', r"bad\.json:row 1: expected a JSON object, got a number"),
    ],
)
def test_json_errors(tmp_path: Path, content: str, pattern: str):
    f = _write(tmp_path / "bad.json", content)
    with pytest.raises(AvaDataError, match=pattern):
        read_source(SourceConfig(path=str(f)))


def test_json_non_objects_counted_under_skip(tmp_path: Path):
    f = _write(tmp_path / "n.json", '[{"text": "a"}, 3, null, {"text": "b"}]')
    docs, counts = _skipping(f)
    assert [d.name for d in docs] == ["s/n.json:row 0", "s/n.json:row 3"]
    assert counts == {"skipped rows (not an object)": 2}


def test_csv_header_quoted_newlines_and_row_lines(tmp_path: Path):
    f = _write(tmp_path / "q.csv", 'id,text\n1,"first, with comma"\n2,"two\nlines"\n\n3,"say ""hi"""\n')
    docs = read_source(SourceConfig(path=str(f)))
    assert [(d.name, d.text, d.source) for d in docs] == [
        ("q/q.csv:2", "first, with comma", f"{f}:2"),
        ("q/q.csv:3", "two\nlines", f"{f}:3"),
        ("q/q.csv:6", 'say "hi"', f"{f}:6"),
    ]
    rows = list(iter_rows(SourceConfig(path=str(f)), DataReport(), "q"))
    assert rows[0].fields == {"id": "1", "text": "first, with comma"}


def test_tsv_is_tab_separated(tmp_path: Path):
    f = _write(tmp_path / "t.tsv", "text\tlabel\nhello, world\t1\n")
    assert _texts(f) == ["hello, world"]


def test_csv_without_the_column_names_file_and_columns(tmp_path: Path):
    f = _write(tmp_path / "c.csv", "title,body\nx,y\n")
    for policy in ("error", "skip"):  # a whole-file problem: raised under skip too
        with pytest.raises(AvaDataError, match=r"c\.csv: no column 'text' \(columns: 'title', 'body'\); set text_field"):
            read_source(SourceConfig(path=str(f), bad_rows=policy))


def test_csv_wrong_field_count(tmp_path: Path):
    f = _write(tmp_path / "w.csv", "text,id\nok,1\nextra,2,3\nshort\nfine,4\n")
    with pytest.raises(AvaDataError, match=r"w\.csv:3: 3 fields, but the header has 2"):
        read_source(SourceConfig(path=str(f)))
    docs, counts = _skipping(f)
    assert [d.text for d in docs] == ["ok", "fine"] and counts == {"skipped rows (wrong field count)": 2}


# ---------------------------------------------------------------------------------------------
# compression
# ---------------------------------------------------------------------------------------------


def _compress(path: Path, data: bytes) -> Path:
    if path.suffix == ".gz":
        return _write(path, gzip.compress(data))
    # Two frames, as `zstd -T0` or pzstd write them.
    half = len(data) // 2
    cctx = zstandard.ZstdCompressor()
    return _write(path, cctx.compress(data[:half]) + cctx.compress(data[half:]))


@pytest.mark.parametrize("compression", [".gz", ".zst"])
def test_compressed_jsonl_txt_csv(tmp_path: Path, compression: str):
    jsonl = _compress(tmp_path / f"data.jsonl{compression}", b'{"text": "j1"}\n{"text": "j2"}\n')
    txt = _compress(tmp_path / f"notes.txt{compression}", "caf\xe9 notes\n".encode("latin-1"))
    csv_file = _compress(tmp_path / f"x.csv{compression}", b"text\nc1\nc2\n")
    docs = read_source(SourceConfig(path=str(jsonl)))
    assert [(d.name, d.text, d.source_name) for d in docs] == [
        (f"data/data.jsonl{compression}:1", "j1", "data"), (f"data/data.jsonl{compression}:2", "j2", "data"),
    ]
    assert _texts(txt) == ["café notes\n"]
    assert _texts(csv_file) == ["c1", "c2"]


def test_corrupt_compressed_file(tmp_path: Path):
    f = _write(tmp_path / "bad.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 100)[:-30])
    with pytest.raises(AvaDataError, match=r"bad\.jsonl\.gz: cannot read \(EOFError"):
        read_source(SourceConfig(path=str(f)))
    g = _write(tmp_path / "fake.txt.zst", b"not zstd at all")
    with pytest.raises(AvaDataError, match=r"fake\.txt\.zst: cannot read"):
        read_source(SourceConfig(path=str(g)))


def test_long_lines_and_chunk_boundaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    rows = [{"text": "x" * n + "é"} for n in (0, 1, 5, 17, 3, 40, 2)]
    content = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    plain = _write(tmp_path / "p.jsonl", content)
    wide = _write(tmp_path / "w.jsonl", content.encode("utf-16"))
    expected = [r["text"] for r in rows]
    monkeypatch.setattr(text_files, "_HEAD_BYTES", 7)
    monkeypatch.setattr(text_files, "_CHUNK_BYTES", 5)
    assert _texts(plain) == expected
    assert _texts(wide, encoding="utf-16") == expected


# ---------------------------------------------------------------------------------------------
# encodings and binary files
# ---------------------------------------------------------------------------------------------


def test_binary_files_are_refused_under_every_policy(tmp_path: Path):
    png = _write(tmp_path / "image.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    rng = random.Random(0)
    noise = _write(tmp_path / "noise.jsonl", bytes(rng.randrange(256) for _ in range(2000)))
    for f in (png, noise):
        for policy in ("strict", "replace", "skip"):
            with pytest.raises(AvaDataError, match=rf"{f.name}: looks like a binary file, not text"):
                read_source(SourceConfig(path=str(f), encoding_errors=policy, bad_rows="skip"))


def test_invalid_utf8_names_line_and_byte_offset(tmp_path: Path):
    txt = _write(tmp_path / "latin.txt", b"line one\nline two caf\xe9\n")
    with pytest.raises(AvaDataError, match=r"latin\.txt:2: invalid UTF-8 at byte offset 21 \(b'\\xe9\\n'\)"):
        read_source(SourceConfig(path=str(txt), encoding="utf-8"))
    jsonl = _write(tmp_path / "latin.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(AvaDataError, match=r"latin\.jsonl:2: invalid UTF-8 at byte offset 28"):
        read_source(SourceConfig(path=str(jsonl), encoding="utf-8"))


def test_corrupt_bytes_in_a_utf8_file_are_reported_not_guessed(tmp_path: Path):
    # Mostly UTF-8 with one bad byte: auto keeps UTF-8 and reports the byte (no cp1252 mojibake).
    f = _write(tmp_path / "u.jsonl", '{"text": "déjà vu"}\n'.encode() * 3 + b'{"text": "x\xffy"}\n')
    with pytest.raises(AvaDataError, match=r"u\.jsonl:4: invalid UTF-8 at byte offset 77"):
        read_source(SourceConfig(path=str(f)))


def test_invalid_utf8_replace_and_skip_are_counted(tmp_path: Path):
    f = _write(tmp_path / "u.jsonl", b'{"text": "good"}\n{"text": "b\xff\xfed"}\n{"text": "c\xc3"}\n{"text": "end"}\n')
    report = DataReport()
    docs = read_source(SourceConfig(path=str(f), encoding="utf-8", encoding_errors="replace"), report, "u")
    assert [d.text for d in docs] == ["good", "b\ufffd\ufffdd", "c\ufffd", "end"]
    assert report.to_dict() == {"u": {"replaced bytes": 3}}
    assert report.examples[("u", "replaced bytes")] == [f"{f}:2", f"{f}:3"]

    report = DataReport()
    docs = read_source(SourceConfig(path=str(f), encoding="utf-8", encoding_errors="skip"), report, "u")
    assert [d.text for d in docs] == ["good", "end"]
    assert report.to_dict() == {"u": {"skipped rows (undecodable)": 2}}

    txt = _write(tmp_path / "t.txt", b"ok\nbad \xff\n")
    _, counts = _skipping(txt, encoding="utf-8", encoding_errors="skip")
    assert counts == {"skipped rows (undecodable)": 1}


def test_legacy_encodings_decoded_under_auto(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    french = "Le café était déjà plein. Noël à Zürich, une façade naïve, un résumé.\n" * 3
    latin1 = _write(tmp_path / "fr.txt", french.encode("latin-1"))
    cp1252 = _write(tmp_path / "q.jsonl", '{"text": "He said “hi” — it’s 5 €…"}\n'.encode("cp1252"))
    with caplog.at_level("INFO", logger="Ava.data.text_files"):
        assert _texts(latin1) == [french]
    assert f"{latin1}: reading as cp1252 (Western European text" in caplog.text
    assert _texts(cp1252) == ["He said “hi” — it’s 5 €…"]


def test_utf16_with_bom_txt_and_jsonl(tmp_path: Path):
    # "ਅĀ" is 05 0A 00 01 in UTF-16-LE: a 0A 00 pair that straddles two characters, not a newline.
    rows = ['{"text": "first ਅĀ"}', '{"text": "second"}']
    jsonl = _write(tmp_path / "w.jsonl", ("\n".join(rows) + "\n").encode("utf-16"))
    be = _write(tmp_path / "be.txt", b"\xfe\xff" + "Grüße\n".encode("utf-16-be"))
    docs = read_source(SourceConfig(path=str(jsonl)))
    assert [(d.name, d.text) for d in docs] == [("w/w.jsonl:1", "first ਅĀ"), ("w/w.jsonl:2", "second")]
    assert _texts(be) == ["Grüße\n"]


def test_explicit_encoding(tmp_path: Path):
    f = _write(tmp_path / "l.csv", "text\nna\xefve caf\xe9\n".encode("latin-1"))
    assert _texts(f, encoding="latin-1") == ["naïve café"]
    with pytest.raises(AvaDataError, match=r"l\.csv: unknown encoding 'latin-9000'"):
        read_source(SourceConfig(path=str(f), encoding="latin-9000"))


# ---------------------------------------------------------------------------------------------
# load_documents
# ---------------------------------------------------------------------------------------------


def test_load_documents_sources_and_max_documents(tmp_path: Path):
    for i in range(10):
        _write(tmp_path / "many" / f"doc{i}.txt", f"text {i}")
    _write(tmp_path / "extra.jsonl", '{"text": "j1"}\n{"text": "j2"}\n')
    data = DataConfig(sources=[{"path": str(tmp_path / "many")}, {"path": str(tmp_path / "extra.jsonl")}])
    docs = load_documents(data)
    assert len(docs) == 12 and [d.name for d in docs] == sorted(d.name for d in docs)
    assert {d.source_name for d in docs} == {"many", "extra"}

    capped = DataConfig(sources=data.sources, max_documents=4)
    first = load_documents(capped, seed=3)
    assert len(first) == 4 and first == load_documents(capped, seed=3)  # deterministic
    assert {d.name for d in first} <= {d.name for d in docs}
    subsets = {tuple(d.name for d in load_documents(capped, seed=s)) for s in range(6)}
    # A shuffle, not the first four by name, picks the subset (and it varies with the seed).
    assert len(subsets) > 1


def test_load_documents_names_unique_across_sources_and_shared_report(tmp_path: Path):
    _write(tmp_path / "a" / "part.jsonl", '{"text": "from a"}\n{"text": ""}\n')
    _write(tmp_path / "b" / "part.jsonl", '{"text": "from b"}\n')
    data = DataConfig(sources=[{"path": str(tmp_path / "a")}, {"path": str(tmp_path / "b"), "name": "bee"}])
    report = DataReport()
    docs = load_documents(data, report=report)
    assert [(d.name, d.source_name) for d in docs] == [("a/part.jsonl:1", "a"), ("bee/part.jsonl:1", "bee")]
    assert report.to_dict() == {"a": {"empty rows": 1}}


def test_load_documents_embedded_corpus_keeps_its_names(fake_cache: Path, fake_docs: dict[str, str]):
    docs = load_documents(DataConfig(cache_dir=str(fake_cache)))
    assert [d.name for d in docs] == sorted(fake_docs)
    assert {d.source_name for d in docs} == {"shakespeare"}
