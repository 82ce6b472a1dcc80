"""Streaming data: worker-independent order, exact resume, weighted interleaving, validation
held out, loss masks kept, endless passes, and the errors a user can cause."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pytest
import torch

from Ava.config import DataConfig
from Ava.data import readers
from Ava.data.packing import IGNORE_INDEX, PackedDataset
from Ava.data.records import DataReport, Document
from Ava.data.tokenizer import AvaTokenizer
from Ava.data_streaming import (
    StreamBatcher, StreamCursor, StreamingDataset, interleave, is_validation, open_streaming, source_counts,
)
from Ava.errors import AvaConfigError, AvaDataError

SEQ_LEN = 16
CHUNK = 8
SEED = 7
_WORDS = "the of and river stone light quiet morning sound window paper garden music over under again".split()


@pytest.fixture(autouse=True)
def _no_tokenizer_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # HF tokenizers warns when a process forks after its thread pool ran (DataLoader workers).
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")


def _text(tag: str, i: int, rng: random.Random) -> str:
    # A marker per document ("[alpha007]") tells in decoded windows where the text came from.
    return f"[{tag}{i:03d}] " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(4, 14)))


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("streaming")
    rng = random.Random(0)
    return {
        "alpha": _write(root / "alpha.jsonl", [{"text": _text("alpha", i, rng)} for i in range(30)]),
        "beta": _write(root / "beta.jsonl", [{"text": _text("beta", i, rng)} for i in range(12)]),
        "qa": _write(root / "qa.jsonl", [
            {"instruction": f"Question zebra {i} " + " ".join(rng.choice(_WORDS) for _ in range(5)),
             "output": f"reply mango {i} " + " ".join(rng.choice(_WORDS) for _ in range(5))}
            for i in range(12)
        ]),
    }


@pytest.fixture(scope="module")
def tokenizer(corpus) -> AvaTokenizer:
    texts = [line for path in corpus.values() for line in path.read_text().splitlines()]
    return AvaTokenizer.train(texts, vocab_size=300)


def _data(*sources: dict, val_fraction: float = 0.0, **kw) -> DataConfig:
    return DataConfig(sources=list(sources), streaming=True, val_fraction=val_fraction, seq_len=SEQ_LEN,
                      tokenizer={"vocab_size": 300}, **kw)


def _batches(batcher: StreamBatcher, n: int) -> list[tuple[dict[str, torch.Tensor], StreamCursor]]:
    stream = iter(batcher)
    try:
        return list(itertools.islice(stream, n))
    finally:
        stream.close()  # stops the workers


def _assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for (batch_a, cursor_a), (batch_b, cursor_b) in zip(a, b):
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            assert torch.equal(batch_a[key], batch_b[key]), key
        assert cursor_a == cursor_b


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_batches_do_not_depend_on_the_worker_count(corpus, tokenizer):
    data = _data({"path": str(corpus["alpha"]), "weight": 2}, {"path": str(corpus["beta"])}, val_fraction=0.2)
    dataset = StreamingDataset(data, tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    runs = {w: _batches(StreamBatcher(dataset, 5, num_workers=w), 30) for w in (0, 1, 2, 3)}
    for w in (1, 2, 3):
        _assert_same(runs[0], runs[w])
    batch, cursor = runs[0][0]
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (5, SEQ_LEN), "labels": (5, SEQ_LEN), "position_ids": (5, SEQ_LEN),
        "document_ids": (5, SEQ_LEN), "source": (5,),
    }
    assert all(v.dtype == torch.int64 for v in batch.values())
    # 30 batches run past the end of both sources: the stream goes on (pass 1, 2, ...).
    assert runs[0][-1][1].documents["beta"] > 12
    # Cursors move forward, chunk by chunk.
    positions = [(c.chunk, c.window) for _, c in runs[0]]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_chunk_items_arrive_in_chunk_order_for_any_worker_count(corpus, tokenizer):
    data = _data({"path": str(corpus["alpha"])})
    dataset = StreamingDataset(data, tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK, start_chunk=5)
    for workers in (0, 1, 2, 3):
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        chunks = [int(item["chunk"]) for item in itertools.islice(loader, 7)]
        assert chunks == list(range(5, 12)), workers


def test_resume_from_a_cursor_gives_the_uninterrupted_batches(corpus, tokenizer):
    data = _data({"path": str(corpus["alpha"]), "weight": 3}, {"path": str(corpus["beta"])}, val_fraction=0.1)
    dataset = StreamingDataset(data, tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    full = _batches(StreamBatcher(dataset, 5, num_workers=2), 24)
    cursors = [c for _, c in full]
    mid_chunk = [k for k, c in enumerate(cursors[:-1]) if c.window > 0]
    boundary = [k for k, c in enumerate(cursors[:-1]) if c.window == 0]
    picks = sorted({mid_chunk[0], mid_chunk[len(mid_chunk) // 2], *boundary[:1], len(cursors) - 4})
    for k in picks:
        saved = json.loads(json.dumps(cursors[k].to_dict()))  # as a checkpoint stores it
        resumed = _batches(StreamBatcher(dataset, 5, num_workers=2, cursor=StreamCursor.from_dict(saved)),
                           len(full) - k - 1)
        _assert_same(resumed, full[k + 1:])
    # The cursor names the next unconsumed window: after a chunk's last window, the next chunk.
    first_chunk = next(iter(dataset))
    windows = first_chunk["input_ids"].shape[0]
    ones = _batches(StreamBatcher(dataset, 1, num_workers=0), windows)
    assert [(c.chunk, c.window) for _, c in ones] == [(0, w) for w in range(1, windows)] + [(1, 0)]
    # The same through state_dict / load_state_dict.
    batcher = StreamBatcher(dataset, 5, num_workers=0)
    batcher.load_state_dict(cursors[10].to_dict())
    _assert_same(_batches(batcher, 3), full[11:14])
    assert batcher.state_dict() == cursors[13].to_dict()


def test_round_robin_follows_the_weights_exactly(corpus, tokenizer):
    assert interleave([3, 1], 0, 8) == [0, 0, 0, 1, 0, 0, 0, 1]
    assert source_counts([3, 1], 1000) == [750, 250]
    assert source_counts([0.1, 0.2], 30) == [10, 20]  # exact arithmetic, no float drift
    weights = [0.7, 1.3, 2.9]
    for n in (0, 1, 5, 17, 100, 333):
        order = interleave(weights, 0, n)
        assert source_counts(weights, n) == [order.count(s) for s in range(3)]
        assert interleave(weights, n, n + 40) == interleave(weights, 0, n + 40)[n:]
    data = _data({"path": str(corpus["alpha"]), "weight": 3}, {"path": str(corpus["beta"]), "weight": 1})
    dataset = StreamingDataset(data, tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    for chunk in range(4):
        names = [d.source_name for d in dataset.documents_of_chunk(chunk)]
        assert (names.count("alpha"), names.count("beta")) == (6, 2)
    assert dataset.documents_before(4) == {"alpha": 24, "beta": 8}
    batches = _batches(StreamBatcher(dataset, 4, num_workers=0), 40)
    cursor = batches[-1][1]
    assert cursor.documents == {"alpha": 6 * cursor.chunk, "beta": 2 * cursor.chunk}
    sources = torch.cat([b["source"] for b, _ in batches])
    share = (sources == 0).float().mean().item()
    assert 0.6 < share < 0.9  # windows by majority source: roughly 3:1


class _CharTokenizer:
    """One token per character (ids = code points), EOS 0: token counts known in advance."""

    eos_id = 0
    vocab_size = 256

    def encode_batch(self, texts):
        return [[ord(ch) for ch in text] for text in texts]


def test_a_window_belongs_to_the_source_holding_most_of_its_tokens(corpus):
    dataset = StreamingDataset(_data({"path": str(corpus["alpha"])}, {"path": str(corpus["beta"])}),
                               _CharTokenizer(), SEQ_LEN, SEED, chunk_documents=3)
    docs = [Document("a", "a" * 20, "a"), Document("b", "b" * 6, "b"), Document("c", "c" * 30, "c")]
    # 59 tokens (each document + EOS): window 0 is 16 "a"; window 1 is 4 "a" + EOS of source 0 and
    # "bbbbbb" + EOS + "cccc" of source 1; window 2 is 16 "c". The tail (11 tokens) is dropped.
    item = dataset.pack(0, docs, [0, 1, 1], [0, 0])
    assert item["input_ids"].shape == (3, SEQ_LEN) and int(item["tokens"]) == 59
    kind = {ord("a"): "a", ord("b"): "b", ord("c"): "c", 0: ""}
    label = {"".join(sorted({kind[t] for t in row})): int(src) for row, src in
             zip(item["input_ids"].tolist(), item["source"])}
    assert label == {"a": 0, "abc": 1, "c": 1}


def test_validation_documents_never_reach_training(corpus, tokenizer):
    data = _data({"path": str(corpus["alpha"])}, {"path": str(corpus["beta"])}, val_fraction=0.3)
    names = readers.source_names(data.sources)
    docs = [d for s, n in zip(data.sources, names) for d in readers.iter_documents(s, DataReport(), n)]
    val = {d.text.split()[0] for d in docs if is_validation(SEED, d.name, 0.3)}
    train = {d.text.split()[0] for d in docs} - val
    assert len(val) >= 5 and len(train) >= 20
    dataset = StreamingDataset(data, tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    chunk_markers = {d.text.split()[0] for c in range(8) for d in dataset.documents_of_chunk(c)}
    assert chunk_markers == train  # 64 documents: every training document, no validation one
    text = "".join(tokenizer.decode(row.tolist()) for b, _ in _batches(StreamBatcher(dataset, 8, 0), 20)
                   for row in b["input_ids"])
    assert not [m for m in val if m in text]
    assert sum(m in text for m in train) > len(train) // 2


def test_template_loss_masks_survive(corpus, tokenizer):
    source = {"path": str(corpus["qa"]), "template": {"prompt": "{instruction}\n", "response": "{output}"}}
    dataset = StreamingDataset(_data(source), tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    batches = _batches(StreamBatcher(dataset, 4, num_workers=0), 10)
    masked_any = False
    for batch, _ in batches:
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            masked = labels == IGNORE_INDEX
            masked_any |= bool(masked.any())
            assert torch.equal(labels[~masked], ids[~masked])
            assert "mango" not in tokenizer.decode(ids[masked].tolist())  # responses carry loss
            assert "zebra" not in tokenizer.decode(ids[~masked].tolist())  # prompts never do
    assert masked_any


def test_sources_restart_deterministically(corpus, tokenizer):
    data = _data({"path": str(corpus["beta"])})  # 12 documents, chunks of 8
    dataset = StreamingDataset(data, tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    stream = [d.text for c in range(6) for d in dataset.documents_of_chunk(c)]
    one_pass = [line and json.loads(line)["text"] for line in corpus["beta"].read_text().splitlines()]
    assert stream == one_pass * 4
    items = list(itertools.islice(iter(dataset), 6))
    assert [item["passes"].tolist() for item in items] == [[0], [1], [1], [2], [3], [3]]
    again = list(itertools.islice(iter(StreamingDataset(data, tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)), 6))
    for a, b in zip(items, again):
        assert all(torch.equal(a[k], b[k]) for k in ("input_ids", "labels", "source", "chunk"))
    # Windows are shuffled within a chunk by (seed, chunk): another seed, another order.
    other = next(iter(StreamingDataset(data, tokenizer, SEQ_LEN, SEED + 1, chunk_documents=CHUNK)))
    assert sorted(map(tuple, other["input_ids"].tolist())) == sorted(map(tuple, items[0]["input_ids"].tolist()))
    assert not torch.equal(other["input_ids"], items[0]["input_ids"])


def test_bad_rows_are_counted_once_across_workers_and_passes(tmp_path, corpus, tokenizer):
    rows = corpus["beta"].read_text().splitlines()
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(rows[:5] + ["{not json"] + rows[5:]) + "\n")
    dataset = StreamingDataset(_data({"path": str(path), "bad_rows": "skip"}), tokenizer, SEQ_LEN, SEED,
                               chunk_documents=CHUNK)
    batcher = StreamBatcher(dataset, 4, num_workers=2)
    batches = _batches(batcher, 40)
    assert batches[-1][1].chunk >= 6  # three passes read
    assert batcher.report.total() == 1
    assert "bad.jsonl:6" in batcher.report.summary()[0]


def test_open_streaming(corpus):
    data = _data({"path": str(corpus["alpha"]), "weight": 2}, {"path": str(corpus["beta"])}, val_fraction=0.3)
    prepared = open_streaming(data, SEED, eval_windows=4, chunk_documents=CHUNK)
    assert isinstance(prepared.train, StreamingDataset)
    assert prepared.tokenizer.vocab_size <= 300 and prepared.stats["tokenizer_source"] == "trained"
    assert prepared.source_names == ["alpha", "beta"]
    stats = prepared.stats
    assert stats["streaming"] is True and stats["train_tokens"] == 0 and stats["train_windows"] == 0
    assert stats["val_windows"] == len(prepared.val) >= 4
    assert stats["sources"]["alpha"]["weight"] == 2
    val_text = "".join(prepared.tokenizer.decode(prepared.val[i]["input_ids"].tolist())
                       for i in range(len(prepared.val)))
    names = readers.source_names(data.sources)
    docs = {d.text.split()[0]: d for s, n in zip(data.sources, names)
            for d in readers.iter_documents(s, DataReport(), n)}
    markers = [m for m in docs if m in val_text]
    assert markers and all(is_validation(SEED, docs[m].name, 0.3) for m in markers)
    # Batches come from the returned dataset directly.
    batch, _ = _batches(StreamBatcher(prepared.train, 2, 0), 1)[0]
    assert int(batch["input_ids"].max()) < prepared.tokenizer.vocab_size
    assert open_streaming(data.model_copy(update={"val_fraction": 0.0}), SEED, eval_windows=4).val is None
    assert isinstance(open_streaming(_data({"path": str(corpus["beta"])}, val_fraction=0.3), SEED,
                                     eval_windows=2).val, PackedDataset)


def test_errors(tmp_path, corpus, tokenizer):
    with pytest.raises(AvaDataError, match="data.streaming reads data.sources; add sources"):
        StreamingDataset(DataConfig(streaming=True), tokenizer, SEQ_LEN, SEED)
    with pytest.raises(AvaDataError, match="add sources"):
        open_streaming(DataConfig(streaming=True, seq_len=SEQ_LEN), SEED, eval_windows=1)
    with pytest.raises(AvaDataError, match="data.dedup"):
        open_streaming(_data({"path": str(corpus["beta"])}, dedup="exact"), SEED, eval_windows=1)

    # A source whose only document is a validation document: no training documents.
    only = _write(tmp_path / "only.jsonl", [{"text": "a lone document of text"}])
    seed = next(s for s in range(100) if is_validation(s, "only/only.jsonl:1", 0.5))
    data = _data({"path": str(corpus["beta"])}, {"path": str(only)}, val_fraction=0.5)
    dataset = StreamingDataset(data, tokenizer, SEQ_LEN, seed, chunk_documents=CHUNK)
    for workers in (0, 1):
        with pytest.raises(AvaDataError, match=r"'only'.*no training documents.*lower data.val_fraction") as err:
            _batches(StreamBatcher(dataset, 2, num_workers=workers), 5)
        assert "\n" not in str(err.value)  # one line, also from a worker process
    with pytest.raises(AvaDataError, match="no training documents"):
        open_streaming(data, seed, eval_windows=1)

    # A config error met while reading in a worker keeps its type.
    broken = {"path": str(corpus["qa"]), "template": {"prompt": "{instruction", "response": "{output}"}}
    dataset = StreamingDataset(_data(broken), tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    with pytest.raises(AvaConfigError) as err:
        _batches(StreamBatcher(dataset, 2, num_workers=1), 1)
    assert "\n" not in str(err.value)

    # Chunks that never fill a window: an error after a whole pass, not an endless wait.
    dataset = StreamingDataset(_data({"path": str(corpus["beta"])}), tokenizer, 4096, SEED, chunk_documents=2)
    with pytest.raises(AvaDataError, match="lower data.seq_len or use larger chunks"):
        _batches(StreamBatcher(dataset, 2, num_workers=0), 1)

    # A cursor that does not fit the data.
    dataset = StreamingDataset(_data({"path": str(corpus["beta"])}), tokenizer, SEQ_LEN, SEED, chunk_documents=CHUNK)
    with pytest.raises(AvaDataError, match="changed since the checkpoint"):
        _batches(StreamBatcher(dataset, 2, 0, cursor=StreamCursor(1, 10_000)), 1)
    with pytest.raises(AvaDataError, match="not written by a data.streaming run"):
        StreamCursor.from_dict({"epoch": 3})
