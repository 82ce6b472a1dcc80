"""Split by document, packing with EOS, fixed windows."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from Ava.data import Document, PackedDataset, TokenStream, pack_documents, split_documents
from Ava.errors import AvaDataError


def _docs(n: int) -> list[Document]:
    return [Document(f"doc{i:02d}", f"text {i}", f"/x/doc{i:02d}") for i in range(n)]


def test_split_is_deterministic_by_document_and_order_independent():
    docs = _docs(40)
    train, val = split_documents(docs, 0.1, seed=7)
    assert len(val) == 4 and len(train) == 36
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert sorted(train + val, key=lambda d: d.name) == docs
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert split_documents(shuffled, 0.1, seed=7) == (train, val)
    assert split_documents(docs, 0.1, seed=8) != (train, val)  # the seed matters


def test_split_keeps_at_least_one_val_and_one_train_document():
    assert [len(s) for s in split_documents(_docs(2), 0.01, seed=0)] == [1, 1]
    assert [len(s) for s in split_documents(_docs(5), 0.95, seed=0)] == [1, 4]
    assert [len(s) for s in split_documents(_docs(1), 0.5, seed=0)] == [1, 0]
    assert [len(s) for s in split_documents(_docs(10), 0.0, seed=0)] == [10, 0]


def test_split_is_stable_when_documents_are_added():
    _, val = split_documents(_docs(100), 0.05, seed=1)
    _, val_more = split_documents(_docs(100) + [Document("zzz", "new", "/x/zzz")], 0.05, seed=1)
    assert {d.name for d in val} == {d.name for d in val_more}


def test_pack_documents_appends_eos_and_picks_dtype():
    packed = pack_documents([[5, 6, 7], [], [8]], eos_id=0)
    assert packed.tolist() == [5, 6, 7, 0, 0, 8, 0]
    assert packed.dtype == np.uint16
    big = pack_documents([[70000, 1]], eos_id=0)
    assert big.dtype == np.uint32 and big.tolist() == [70000, 1, 0]
    assert pack_documents([], eos_id=3).tolist() == []


def test_packed_dataset_windows():
    tokens = np.arange(23, dtype=np.uint16)
    ds = PackedDataset(tokens, seq_len=5)
    assert len(ds) == 4  # the 3-token tail is dropped
    ids = [ds[i]["input_ids"] for i in range(len(ds))]
    assert ids[0].dtype == torch.int64 and ids[0].shape == (5,)
    assert ids[1].tolist() == [5, 6, 7, 8, 9]
    assert ds[-1]["input_ids"].tolist() == [15, 16, 17, 18, 19]
    assert torch.cat(ids).tolist() == list(range(20))
    assert ds[4]["input_ids"].tolist() == ids[0].tolist()  # epoch 1, window 0 (epoch · len + i)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["input_ids"].shape == (2, 5) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["labels"], batch["input_ids"])  # no loss mask: every token is a label


def test_packed_dataset_over_shards_reads_each_shard_windows():
    streams = [TokenStream(np.arange(10, dtype=np.uint16), np.array([0], dtype=np.int64)),
               TokenStream(np.arange(100, 107, dtype=np.uint16), np.array([0, 4], dtype=np.int64))]
    ds = PackedDataset(streams, seq_len=3)
    assert len(ds) == 3 + 2 and ds.num_tokens == 17 and ds.num_documents == 3
    assert ds[3]["input_ids"].tolist() == [100, 101, 102]
    assert ds[4]["position_ids"].tolist() == [0, 0, 1]  # a document starts at 104


def test_packed_dataset_too_short_says_what_to_do():
    with pytest.raises(AvaDataError, match=r"val split has 3 tokens.*lower data.seq_len or add data"):
        PackedDataset(np.arange(3), seq_len=4, split="val")


# --- windows with document boundaries and loss masks ------------------------------------------


def test_window_sample_restarts_positions_per_document_and_masks_labels():
    from Ava.data.packing import window_sample

    stream = TokenStream(np.arange(12, dtype=np.uint16), np.array([0, 3, 9], dtype=np.int64),
                         np.array([0, 1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=np.uint8))
    s = window_sample(stream, 2, 8)
    assert s["input_ids"].tolist() == list(range(2, 10))
    assert s["position_ids"].tolist() == [0, 0, 1, 2, 3, 4, 5, 0]
    assert s["document_ids"].tolist() == [0, 1, 1, 1, 1, 1, 1, 2]
    assert s["labels"].tolist() == [2, -100, -100, 5, 6, 7, 8, 9]


def test_cut_rows_recomputes_positions():
    import torch

    from Ava.training.batch import cut_rows

    batch = {"input_ids": torch.arange(8)[None], "labels": torch.arange(8)[None],
             "position_ids": torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2]]),
             "document_ids": torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]]), "source": torch.tensor([1])}
    out = cut_rows(batch, 4)
    assert out["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]
    assert out["source"].tolist() == [1, 1]


def test_document_mask_isolates_documents_in_a_packed_row():
    import torch

    from Ava.config import ModelConfig
    from Ava.models import EnhancedMoEModel

    torch.manual_seed(0)
    model = EnhancedMoEModel(ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4,
                                         num_kv_heads=2, max_seq_len=16, num_experts=4)).eval()
    docs = torch.tensor([[0] * 5 + [1] * 7])
    pos = torch.tensor([list(range(5)) + list(range(7))])
    a = torch.randint(2, 64, (1, 12))
    b = a.clone()
    b[0, :5] = torch.randint(2, 64, (5,))  # change the first document only
    with torch.no_grad():
        la = model(a, position_ids=pos, document_ids=docs).logits
        lb = model(b, position_ids=pos, document_ids=docs).logits
        plain_a = model(a, position_ids=pos).logits
        plain_b = model(b, position_ids=pos).logits
    torch.testing.assert_close(la[0, 5:], lb[0, 5:], rtol=0, atol=1e-6)  # second document unchanged
    assert not torch.allclose(plain_a[0, 5:], plain_b[0, 5:], atol=1e-3)  # without the mask it leaks
