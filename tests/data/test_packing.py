"""Split by document, packing with EOS, fixed windows."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from Ava.data import Document, PackedDataset, pack_documents, split_documents
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
    assert ds[0].dtype == torch.int64 and ds[0].shape == (5,)
    assert ds[1].tolist() == [5, 6, 7, 8, 9]
    assert ds[-1].tolist() == [15, 16, 17, 18, 19]
    assert torch.cat([ds[i] for i in range(len(ds))]).tolist() == list(range(20))
    with pytest.raises(IndexError):
        ds[4]
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch.shape == (2, 5) and batch.dtype == torch.int64


def test_packed_dataset_too_short_says_what_to_do():
    with pytest.raises(AvaDataError, match=r"val split has 3 tokens.*lower data.seq_len or add data"):
        PackedDataset(np.arange(3), seq_len=4, split="val")
