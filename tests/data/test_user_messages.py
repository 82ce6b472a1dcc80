"""Wording of user-facing messages: a stray file in a folder source, counts with their plurals,
rows skipped under ``bad_rows: skip`` on the "read" lines, and a missing path vs a run folder
without a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from Ava.config import DataConfig, SourceConfig
from Ava.config.checkpoint_layout import resolve_checkpoint
from Ava.data.dedup import DedupStats
from Ava.data.pipeline import collect_documents
from Ava.data.readers import read_source
from Ava.data.records import DataReport, plural
from Ava.errors import AvaCheckpointError, AvaDataError


def _folder(tmp_path: Path, n: int = 3) -> Path:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(n):
        (folder / f"part{i}.jsonl").write_text(json.dumps({"text": f"document {i}"}) + "\n", encoding="utf-8")
    return folder


def test_stray_file_of_another_format_suggests_a_glob_or_moving_it(tmp_path: Path):
    folder = _folder(tmp_path)
    (folder / "notes.md").write_text("# notes\n", encoding="utf-8")
    with pytest.raises(AvaDataError) as err:
        read_source(SourceConfig(path=str(folder)))
    message = str(err.value)
    assert "notes.md" in message and "\n" not in message
    assert f"path: {folder}/*.jsonl" in message
    assert "move notes.md out of" in message
    assert "would apply to every file" in message


def test_stray_file_without_the_text_field_suggests_moving_it(tmp_path: Path):
    folder = _folder(tmp_path)
    (folder / "z_other.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    with pytest.raises(AvaDataError) as err:
        read_source(SourceConfig(path=str(folder)))
    message = str(err.value)
    assert "z_other.jsonl" in message and "no field 'text'" in message and "\n" not in message
    assert "move z_other.jsonl out of" in message


def test_stray_file_in_a_subfolder_gets_a_recursive_glob(tmp_path: Path):
    folder = _folder(tmp_path)
    (folder / "sub").mkdir()
    (folder / "sub" / "more.jsonl").write_text(json.dumps({"text": "more"}) + "\n", encoding="utf-8")
    (folder / "data.bin").write_bytes(b"\x00\x01")
    with pytest.raises(AvaDataError, match=r"path: .*/mixed/\*\*/\*\.jsonl"):
        read_source(SourceConfig(path=str(folder)))


def test_single_file_and_glob_sources_get_no_stray_file_hint(tmp_path: Path):
    folder = _folder(tmp_path, n=1)
    (folder / "part0.jsonl").write_text(json.dumps({"body": "x"}) + "\n", encoding="utf-8")
    for path in (folder / "part0.jsonl", folder / "*.jsonl", folder):
        with pytest.raises(AvaDataError) as err:
            read_source(SourceConfig(path=str(path)))
        assert "does not belong" not in str(err.value)


def test_plural():
    assert plural(1, "document") == "1 document"
    assert plural(0, "document") == "0 documents"
    assert plural(2, "layer") == "2 layers"
    assert plural(2, "entry", "entries") == "2 entries"
    stats = DedupStats(mode="exact", threshold=0.8, documents_in=1)
    assert "1 document," in stats.summary()


def test_read_lines_use_plurals_and_count_skipped_rows(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    path = tmp_path / "one.jsonl"
    path.write_text('{"text": "hello"}\nnot json\n{"body": "x"}\n', encoding="utf-8")
    data = DataConfig(sources=[SourceConfig(path=str(path), bad_rows="skip")], val_fraction=0)
    with caplog.at_level("INFO", logger="Ava.data"):
        collect_documents(data, seed=0, report=DataReport())
    assert "read 1 document from" in caplog.text
    assert "; 2 skipped (bad_rows: skip)" in caplog.text
    assert "documents: 1 read (2 rows/files skipped, bad_rows: skip)" in caplog.text
    assert "from 1 source" in caplog.text and "1 source(s)" not in caplog.text


def test_clean_read_line_has_no_skipped_count(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    folder = _folder(tmp_path, n=2)
    with caplog.at_level("INFO", logger="Ava.data"):
        read_source(SourceConfig(path=str(folder)))
    assert "read 2 documents from" in caplog.text and "skipped" not in caplog.text


def test_missing_path_and_run_folder_without_checkpoint_differ(tmp_path: Path):
    with pytest.raises(AvaCheckpointError, match="does not exist") as missing:
        resolve_checkpoint(tmp_path / "runs" / "typo")
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("model: {}\n", encoding="utf-8")
    with pytest.raises(AvaCheckpointError, match="run folder holds no checkpoint yet") as empty_run:
        resolve_checkpoint(run)
    assert str(missing.value) != str(empty_run.value)
    assert "does not exist" not in str(empty_run.value)
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(AvaCheckpointError, match="is a file"):
        resolve_checkpoint(file)


def test_a_run_without_latest_lists_its_checkpoints(tmp_path):
    from Ava.config.checkpoint_layout import resolve_checkpoint

    run = tmp_path / "run"
    (run / "checkpoints" / "step_20").mkdir(parents=True)
    (run / "checkpoints" / "step_20" / "model.safetensors").write_bytes(b"x")
    (run / "config.yaml").write_text("model: {}\n")
    with pytest.raises(AvaCheckpointError, match=r"checkpoints/latest is missing; pass one of its checkpoint "
                                                 r"folders \(.*/checkpoints/step_20\)"):
        resolve_checkpoint(run)
