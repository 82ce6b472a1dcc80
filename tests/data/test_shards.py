"""Prepared shards: exact round trip, cutting at document boundaries, validation, atomic writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from Ava.data import prepare, shards
from Ava.data.packing import tokenize_documents
from Ava.data.pipeline import SplitDocuments
from Ava.data.records import DataReport, Document
from Ava.data.prepare import write_prepared
from Ava.data.shards import load_prepared
from Ava.data.tokenizer import AvaTokenizer
from Ava.errors import AvaDataError
from tests.helpers import fake_play


@pytest.fixture(scope="module")
def tokenizer() -> AvaTokenizer:
    return AvaTokenizer.train([fake_play(seed) for seed in range(4)], vocab_size=400)


def _plain(name: str, seed: int, lines: int = 6) -> Document:
    return Document(name=name, text=fake_play(seed, num_lines=lines), source=f"{name}.txt", source_name="plays")


def _chat(name: str, seed: int) -> Document:
    prompt, answer = f"User: tell me about play {seed}\n", fake_play(seed, num_lines=2)
    return Document(name=name, text=prompt + answer, source="chat.jsonl", segments=((prompt, False), (answer, True)),
                    source_name="chat qa")


def _split_docs() -> SplitDocuments:
    """Two sources (one with loss masks, one with a name unfit for a folder), train and val."""
    plays = [_plain(f"p{i}", i, lines=3 + 2 * i) for i in range(7)]
    plays.append(Document(name="empty", text="", source="e.txt", source_name="plays"))
    chat = [_chat(f"c{i}", 50 + i) for i in range(4)] + [
        Document(name="plain-in-chat", text="no segments here", source="chat.jsonl", source_name="chat qa")
    ]
    return SplitDocuments(
        names=["plays", "chat qa"],
        train={"plays": plays[:6], "chat qa": chat[:4]},
        val={"plays": plays[6:], "chat qa": chat[4:]},
        weights={"plays": 2.0, "chat qa": 0.5},
        stats={"documents": 13, "dedup": {"exact_removed": 1}},
    )


def _joined(streams):
    """Concatenate shard streams back into one (tokens, doc starts, mask)."""
    tokens = np.concatenate([np.asarray(s.tokens) for s in streams])
    offsets = np.cumsum([0] + [len(s) for s in streams[:-1]])
    starts = np.concatenate([np.asarray(s.doc_starts) + o for s, o in zip(streams, offsets)])
    masks = [s.loss_mask for s in streams]
    mask = None if masks[0] is None else np.concatenate([np.asarray(m) for m in masks])
    return tokens, starts, mask


@pytest.mark.parametrize("shard_tokens", [prepare.DEFAULT_SHARD_TOKENS, 300])
def test_round_trip_equals_tokenize_documents(tmp_path: Path, tokenizer: AvaTokenizer, shard_tokens: int):
    split_docs = _split_docs()
    report = DataReport()
    report.add("plays", "malformed row", "p.jsonl:3")
    manifest = write_prepared(tmp_path / "prep", split_docs, tokenizer, workers=2, shard_tokens=shard_tokens,
                              report=report, extra_manifest={"seed": 7})
    corpus = load_prepared(tmp_path / "prep")
    assert corpus.manifest == json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["seed"] == 7 and manifest["report"] == {"plays": {"malformed row": 1}}
    assert corpus.source_names == ["plays", "chat qa"]
    assert corpus.weights == {"plays": 2.0, "chat qa": 0.5}
    assert corpus.tokenizer.tokenizer.to_str() == tokenizer.tokenizer.to_str()
    for split, by_source in (("train", split_docs.train), ("val", split_docs.val)):
        streams = corpus.streams(split)
        assert list(streams) == ["plays", "chat qa"]
        for name, docs in by_source.items():
            expected = tokenize_documents(tokenizer, docs, name)
            tokens, starts, mask = _joined(streams[name])
            np.testing.assert_array_equal(tokens, expected.tokens)
            np.testing.assert_array_equal(starts, expected.doc_starts)
            if expected.loss_mask is None:
                assert mask is None
            else:
                np.testing.assert_array_equal(mask, expected.loss_mask)
            entry = manifest["splits"][split]["sources"][name]
            assert entry["tokens"] == len(expected) and entry["documents"] == len(docs)
            assert entry["has_mask"] == (expected.loss_mask is not None)
            for s in streams[name]:
                assert isinstance(s.tokens, np.memmap) and s.tokens.dtype == np.uint16
                assert isinstance(s.doc_starts, np.memmap) and s.doc_starts.dtype == np.int64
                assert s.loss_mask is None or isinstance(s.loss_mask, np.memmap)
                assert s.source_name == name
                assert not s.tokens.flags.writeable
        assert corpus.num_tokens(split) == manifest["splits"][split]["tokens"]
        assert corpus.num_documents(split) == sum(len(d) for d in by_source.values())


def test_manifest_describes_the_folder(tmp_path: Path, tokenizer: AvaTokenizer):
    manifest = write_prepared(tmp_path / "prep", _split_docs(), tokenizer, shard_tokens=1000,
                              source_configs={"plays": {"path": "plays/*.txt"}})
    assert manifest["format"] == "ava-prepared" and manifest["format_version"] == shards.FORMAT_VERSION
    assert manifest["vocab_size"] == tokenizer.vocab_size and manifest["eos_id"] == tokenizer.eos_id
    assert manifest["dtype"] == "uint16" and manifest["shard_tokens"] == 1000
    assert manifest["tokenizer"]["file"] == "tokenizer.json"
    assert manifest["tokenizer"]["sha256"] == shards._sha256(tmp_path / "prep" / "tokenizer.json")
    assert manifest["sources"]["plays"] == {"weight": 2.0, "folder": "plays", "config": {"path": "plays/*.txt"}}
    assert manifest["sources"]["chat qa"]["folder"] == "chat_qa"
    assert manifest["dedup"] == {"exact_removed": 1}
    assert "seq_len" not in json.dumps(manifest)
    splits = manifest["splits"]
    assert manifest["totals"]["tokens"] == splits["train"]["tokens"] + splits["val"]["tokens"]
    assert manifest["totals"]["documents"] == 13
    shard = splits["train"]["sources"]["chat qa"]["shards"][0]
    assert shard["tokens_file"] == "train/chat_qa/00000.tokens.bin"
    assert shard["docs_file"] == "train/chat_qa/00000.docs.npy"
    assert shard["mask_file"] == "train/chat_qa/00000.mask.bin"
    assert splits["train"]["sources"]["plays"]["shards"][0]["mask_file"] is None
    files = sorted(str(p.relative_to(tmp_path / "prep")) for p in (tmp_path / "prep").rglob("*") if p.is_file())
    listed = {"manifest.json", "tokenizer.json"} | {
        f for split in splits.values() for src in split["sources"].values() for s in src["shards"]
        for f in (s["tokens_file"], s["docs_file"], s["mask_file"]) if f
    }
    assert set(files) == listed  # nothing else, no temporary files


def test_shards_are_cut_at_document_boundaries(tmp_path: Path, tokenizer: AvaTokenizer):
    split_docs = _split_docs()
    docs = split_docs.train["plays"]
    expected = tokenize_documents(tokenizer, docs)
    doc_lengths = np.diff(np.append(expected.doc_starts, len(expected)))
    limit = int(doc_lengths.max()) - 1  # the longest document does not fit a shard
    manifest = write_prepared(tmp_path / "prep", split_docs, tokenizer, shard_tokens=limit)
    streams = load_prepared(tmp_path / "prep").streams("train")["plays"]
    assert len(streams) > 2
    assert len(streams) == len(manifest["splits"]["train"]["sources"]["plays"]["shards"])
    eos = tokenizer.eos_id
    seen_docs = 0
    for s in streams:
        assert s.doc_starts[0] == 0 and s.tokens[-1] == eos  # whole documents only
        assert len(s) <= limit or s.num_documents == 1  # a too-long document is alone in its shard
        lengths = np.diff(np.append(np.asarray(s.doc_starts), len(s)))
        np.testing.assert_array_equal(lengths, doc_lengths[seen_docs:seen_docs + s.num_documents])
        seen_docs += s.num_documents
    assert seen_docs == len(docs)
    # Greedy filling: a shard is closed only when the next document does not fit.
    for s, nxt in zip(streams, streams[1:]):
        first_next = int(np.diff(np.append(np.asarray(nxt.doc_starts), len(nxt)))[0])
        assert len(s) + first_next > limit


def test_chunking_and_workers_do_not_change_the_files(tmp_path: Path, tokenizer: AvaTokenizer,
                                                     monkeypatch: pytest.MonkeyPatch):
    split_docs = _split_docs()
    write_prepared(tmp_path / "a", split_docs, tokenizer, workers=1, shard_tokens=500)
    monkeypatch.setattr(prepare, "CHUNK_CHARS", 700)  # many chunks per source and per shard
    write_prepared(tmp_path / "b", split_docs, tokenizer, workers=3, shard_tokens=500)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.*") if p.name != "manifest.json")
    files_b = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.*") if p.name != "manifest.json")
    assert files_a == files_b and len(files_a) > 6
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_uint32_ids_for_a_large_vocabulary(tmp_path: Path, tokenizer: AvaTokenizer, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(AvaTokenizer, "vocab_size", property(lambda self: 70_000))
    write_prepared(tmp_path / "prep", _split_docs(), tokenizer)
    monkeypatch.undo()
    corpus = load_prepared(tmp_path / "prep")
    stream = corpus.streams("train")["plays"][0]
    assert corpus.manifest["dtype"] == "uint32" and stream.tokens.dtype == np.uint32
    expected = tokenize_documents(tokenizer, _split_docs().train["plays"])
    np.testing.assert_array_equal(stream.tokens, expected.tokens)


def test_a_source_without_validation_documents_has_no_val_shards(tmp_path: Path, tokenizer: AvaTokenizer):
    split_docs = _split_docs()
    split_docs.val = {"plays": split_docs.val["plays"]}  # chat qa has only training documents
    write_prepared(tmp_path / "prep", split_docs, tokenizer)
    corpus = load_prepared(tmp_path / "prep")
    assert corpus.streams("val")["chat qa"] == []
    assert corpus.manifest["splits"]["val"]["sources"]["chat qa"] == {
        "documents": 0, "tokens": 0, "has_mask": False, "shards": []}
    with pytest.raises(AvaDataError, match="has no split 'test'; it has train, val"):
        corpus.streams("test")


def test_empty_train_split_is_refused(tmp_path: Path, tokenizer: AvaTokenizer):
    empty = SplitDocuments(names=["a"], train={"a": []}, val={"a": []}, weights={"a": 1.0})
    with pytest.raises(AvaDataError, match="train split holds no documents"):
        write_prepared(tmp_path / "prep", empty, tokenizer)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# output folder and atomicity
# --------------------------------------------------------------------------------------------


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


def test_a_crash_mid_write_leaves_no_folder(tmp_path: Path, tokenizer: AvaTokenizer, monkeypatch: pytest.MonkeyPatch):
    finish = prepare._ShardWriter._finish_shard
    calls = []

    def crash_on_third_shard(self):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # e.g. Ctrl-C half way
        finish(self)

    monkeypatch.setattr(prepare._ShardWriter, "_finish_shard", crash_on_third_shard)
    with pytest.raises(KeyboardInterrupt):
        write_prepared(tmp_path / "prep", _split_docs(), tokenizer, shard_tokens=300)
    assert _leftovers(tmp_path) == []  # neither prep/ nor a temporary folder


def test_the_manifest_is_written_last_into_a_temporary_folder(tmp_path: Path, tokenizer: AvaTokenizer,
                                                              monkeypatch: pytest.MonkeyPatch):
    seen = {}
    commit = prepare._commit

    def spy(tmp: Path, out_dir: Path) -> None:
        seen["tmp"] = tmp.name
        seen["out_exists"] = out_dir.exists()
        commit(tmp, out_dir)

    write_file = prepare._write_file

    def spy_write(path: Path, data: bytes) -> None:
        # the manifest is the last file written; every shard is already complete then
        seen["shards_before_manifest"] = len(list(path.parent.rglob("*.bin")))
        write_file(path, data)

    monkeypatch.setattr(prepare, "_commit", spy)
    monkeypatch.setattr(prepare, "_write_file", spy_write)
    write_prepared(tmp_path / "prep", _split_docs(), tokenizer)
    assert seen["tmp"].startswith("prep.tmp-") and not seen["out_exists"]
    assert seen["shards_before_manifest"] == 5  # 2 sources × 2 splits + 1 mask
    assert _leftovers(tmp_path) == ["prep"]


def test_killed_writer_leaves_only_an_incomplete_temporary_folder(tmp_path: Path, tokenizer: AvaTokenizer):
    # A SIGKILL cannot clean up: what stays behind must not look like a prepared folder.
    (tmp_path / "prep.tmp-123-abc" / "train").mkdir(parents=True)
    with pytest.raises(AvaDataError, match="not a prepared folder"):
        load_prepared(tmp_path / "prep.tmp-123-abc")
    write_prepared(tmp_path / "prep", _split_docs(), tokenizer)
    load_prepared(tmp_path / "prep")


def test_existing_output_needs_overwrite_and_survives_a_failed_overwrite(
    tmp_path: Path, tokenizer: AvaTokenizer, monkeypatch: pytest.MonkeyPatch
):
    out = tmp_path / "prep"
    first = write_prepared(out, _split_docs(), tokenizer)
    with pytest.raises(AvaDataError, match="already holds a prepared folder; pass --force"):
        write_prepared(out, _split_docs(), tokenizer)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(prepare, "_manifest", boom)
    with pytest.raises(OSError, match="disk full"):
        write_prepared(out, _split_docs(), tokenizer, overwrite=True, shard_tokens=100)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == ["prep"]
    assert load_prepared(out).manifest["created"] == first["created"]  # the old folder is intact

    second = write_prepared(out, _split_docs(), tokenizer, overwrite=True, shard_tokens=100)
    assert _leftovers(tmp_path) == ["prep"]
    assert load_prepared(out).manifest["shard_tokens"] == second["shard_tokens"] == 100


def test_output_folder_checks(tmp_path: Path, tokenizer: AvaTokenizer):
    (tmp_path / "empty").mkdir()
    write_prepared(tmp_path / "empty", _split_docs(), tokenizer)  # an empty folder is fine
    load_prepared(tmp_path / "empty")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("precious")
    for overwrite in (False, True):  # never deleted, even with --force
        with pytest.raises(AvaDataError, match=r"notes is a non-empty folder that is not a prepared folder"):
            write_prepared(other, _split_docs(), tokenizer, overwrite=overwrite)
    assert (other / "keep.txt").read_text() == "precious"
    (tmp_path / "file").write_text("x")
    with pytest.raises(AvaDataError, match="is a file"):
        write_prepared(tmp_path / "file", _split_docs(), tokenizer)


# --------------------------------------------------------------------------------------------
# validation of a prepared folder
# --------------------------------------------------------------------------------------------


@pytest.fixture
def prepared(tmp_path: Path, tokenizer: AvaTokenizer) -> Path:
    out = tmp_path / "prep"
    write_prepared(out, _split_docs(), tokenizer, shard_tokens=400)
    return out


def _edit_manifest(folder: Path, **changes) -> None:
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def test_missing_folder_and_missing_manifest(tmp_path: Path, prepared: Path):
    with pytest.raises(AvaDataError, match=r"nowhere does not exist; fix data.prepared or run `ava prepare"):
        load_prepared(tmp_path / "nowhere")
    (prepared / "manifest.json").unlink()
    with pytest.raises(AvaDataError) as err:
        load_prepared(prepared)
    assert str(err.value) == (
        f"{prepared} is not a prepared folder (no manifest.json); run `ava prepare CONFIG --out DIR`"
    )
    with pytest.raises(AvaDataError, match="is a file"):
        load_prepared(prepared / "tokenizer.json")


def test_bad_manifest(prepared: Path):
    (prepared / "manifest.json").write_text("{not json")
    with pytest.raises(AvaDataError, match=r"manifest.json is not valid JSON"):
        load_prepared(prepared)
    (prepared / "manifest.json").write_text('{"hello": 1}')
    with pytest.raises(AvaDataError, match=r"manifest.json is not an Ava prepared-data manifest"):
        load_prepared(prepared)


def test_format_version_mismatch(prepared: Path):
    _edit_manifest(prepared, format_version=99, ava_version="9.0")
    with pytest.raises(AvaDataError, match=r"has format version 99 \(written by Ava 9.0\); this Ava reads version 1"):
        load_prepared(prepared)


def test_tokenizer_hash_mismatch(prepared: Path, tokenizer: AvaTokenizer):
    AvaTokenizer.train([fake_play(9)], vocab_size=300).save(prepared / "tokenizer.json")
    with pytest.raises(AvaDataError, match=r"tokenizer.json does not match the sha256 in manifest.json"):
        load_prepared(prepared)
    (prepared / "tokenizer.json").unlink()
    with pytest.raises(AvaDataError, match=r"tokenizer.json is missing"):
        load_prepared(prepared)


def test_missing_and_truncated_shards(prepared: Path):
    shard = prepared / "train" / "plays" / "00001.tokens.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(AvaDataError) as err:
        load_prepared(prepared)
    assert f"shard file {shard} has {len(data) - 2} bytes, the manifest says {len(data)}" in str(err.value)
    shard.unlink()
    with pytest.raises(AvaDataError, match=rf"shard file {shard} is missing"):
        load_prepared(prepared)
    shard.write_bytes(data)
    mask = prepared / "train" / "chat_qa" / "00000.mask.bin"
    mask.write_bytes(mask.read_bytes() + b"\x01")
    with pytest.raises(AvaDataError, match=rf"shard file {mask} has"):
        load_prepared(prepared)


def test_damaged_document_offsets(prepared: Path):
    shard = json.loads((prepared / "manifest.json").read_text())["splits"]["train"]["sources"]["plays"]["shards"][0]
    docs = prepared / shard["docs_file"]
    docs.write_bytes(b"garbage")
    with pytest.raises(AvaDataError, match=rf"shard file {docs} is not a readable .npy file"):
        load_prepared(prepared)
    n = shard["num_documents"]
    assert n >= 2
    np.save(docs, np.arange(n, dtype=np.int64) * 10**9)
    with pytest.raises(AvaDataError, match=rf"shard file {docs} does not hold {n} document offsets"):
        load_prepared(prepared)
    np.save(docs, np.arange(n + 1, dtype=np.int64))
    with pytest.raises(AvaDataError, match=rf"shard file {docs} does not hold {n} document offsets"):
        load_prepared(prepared)
    os.remove(docs)
    with pytest.raises(AvaDataError, match=rf"shard file {docs} is missing"):
        load_prepared(prepared)


def test_progress_bar_counts_documents(tmp_path: Path, tokenizer: AvaTokenizer, capsys: pytest.CaptureFixture):
    write_prepared(tmp_path / "prep", _split_docs(), tokenizer, progress=True)
    err = capsys.readouterr().err
    assert "prepare: 100%" in err and "13/13" in err
