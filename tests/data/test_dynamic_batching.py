"""Unpacked rows (data.packing: false) and the micro-batch plans of dynamic batching."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from Ava.data.dynamic_batching import fixed_padding_share, plan_epoch, row_stats
from Ava.data.mixture import MixtureDataset
from Ava.data.packing import IGNORE_INDEX, TokenStream
from Ava.data.rows import RowDataset, pad_rows
from Ava.errors import AvaConfigError, AvaDataError


def chat_stream(n_docs: int, seed: int, max_len: int = 300, source: str = "chat") -> TokenStream:
    """Documents of varied lengths (a chat mix: mostly short, some long), each ending in EOS (id 0),
    the first third of each document a prompt (loss mask 0)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(3.5, 0.9, n_docs).astype(np.int64), 3, max_len)
    tokens, masks, starts, pos = [], [], [], 0
    for n in lengths:
        ids = rng.integers(2, 200, n)
        ids[-1] = 0
        mask = np.ones(n, np.uint8)
        mask[: n // 3] = 0
        tokens.append(ids)
        masks.append(mask)
        starts.append(pos)
        pos += n
    return TokenStream(np.concatenate(tokens).astype(np.uint16), np.array(starts, np.int64),
                       np.concatenate(masks), source)


def test_rows_are_documents_truncated_with_their_loss_mask_and_counts():
    stream = TokenStream(np.arange(1, 13, dtype=np.uint16), np.array([0, 3, 4]),
                         np.array([0, 1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1], np.uint8))
    rows = RowDataset(stream, seq_len=5)
    # doc 1 (one token, nothing to predict) is left out; doc 2 (8 tokens) is truncated to 5
    assert len(rows) == 2 and rows.truncated == 1 and rows.dropped == 1
    assert rows.lengths.tolist() == [3, 5]
    first, second = rows[0], rows[1]
    assert first["input_ids"].tolist() == [1, 2, 3]
    assert first["labels"].tolist() == [IGNORE_INDEX, 2, 3]
    assert second["input_ids"].tolist() == [5, 6, 7, 8, 9]
    assert second["labels"].tolist() == [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9]
    assert second["position_ids"].tolist() == [0, 1, 2, 3, 4]
    for i in range(len(rows)):  # the precomputed counts are what the loss averages over
        assert rows.loss_tokens[i] == int((rows[i]["labels"][1:] != IGNORE_INDEX).sum())
    assert rows[2]["input_ids"].tolist() == first["input_ids"].tolist()  # indices wrap around


def test_rows_without_any_label_are_one_line_error():
    stream = TokenStream(np.arange(1, 7, dtype=np.uint16), np.array([0, 3]), np.zeros(6, np.uint8))
    with pytest.raises(AvaDataError, match=r"^the train split has no row with a token to predict within "
                                           r"data\.seq_len=4; raise data\.seq_len or check") as err:
        RowDataset(stream, seq_len=4)
    assert "\n" not in str(err.value)


def test_pad_rows_right_pads_without_labels_and_keeps_positions():
    stream = chat_stream(6, 0, max_len=40)
    rows = RowDataset(stream, seq_len=64)
    batch = pad_rows([rows[i] for i in range(4)], pad_id=1)
    T = int(rows.lengths[:4].max())
    assert batch["input_ids"].shape == (4, T) and batch["source"].shape == (4,)
    for b in range(4):
        n = int(rows.lengths[b])
        assert torch.equal(batch["input_ids"][b, :n], rows[b]["input_ids"])
        assert (batch["input_ids"][b, n:] == 1).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert batch["position_ids"][b].tolist() == list(range(T))
        assert (batch["document_ids"][b, :n] == 0).all() and (batch["document_ids"][b, n:] == 1).all()


@pytest.mark.parametrize("budget", [128, 300, 1000])
def test_token_budget_is_respected_and_every_row_is_planned_once(budget):
    rows = RowDataset(chat_stream(400, 1), seq_len=128)
    plan = plan_epoch(rows, seed=3, epoch=0, rows=8, max_tokens=budget)
    planned = [i for unit in plan.units for i in unit]
    assert sorted(planned) == list(range(len(rows)))
    for unit in plan.units:
        lengths = rows.lengths[unit]
        assert len(unit) * lengths.max() <= budget
    assert plan.lengths.tolist() == rows.lengths[planned].tolist()
    assert sum(plan.unit_loss_tokens(u) for u in range(len(plan))) == int(rows.loss_tokens.sum())


def test_budget_below_the_longest_row_is_one_line_error():
    rows = RowDataset(chat_stream(50, 2), seq_len=128)
    with pytest.raises(AvaConfigError, match=r"^data\.max_tokens_per_batch=64 is below the longest row \(128 "
                                             r"tokens\); raise it to at least data\.seq_len$"):
        plan_epoch(rows, seed=0, epoch=0, rows=8, max_tokens=64)


def test_plans_are_seeded_shuffled_and_change_with_the_epoch():
    rows = RowDataset(chat_stream(300, 4), seq_len=128)
    a = plan_epoch(rows, seed=0, epoch=0, rows=8, max_tokens=512)
    assert a.units == plan_epoch(rows, seed=0, epoch=0, rows=8, max_tokens=512).units
    b = plan_epoch(rows, seed=0, epoch=1, rows=8, max_tokens=512)
    c = plan_epoch(rows, seed=1, epoch=0, rows=8, max_tokens=512)
    assert a.units != b.units and a.units != c.units
    # epoch 1's indices carry the epoch (as the packed sampler's do)
    assert min(i for u in b.units for i in u) >= len(rows)
    # the units are shuffled across buckets: not in length order
    longest = [int(rows.lengths[np.asarray(u) % len(rows)].max()) for u in a.units]
    assert longest != sorted(longest)


def test_loader_order_does_not_depend_on_the_number_of_workers():
    rows = RowDataset(chat_stream(120, 5), seq_len=96)
    plan = plan_epoch(rows, seed=7, epoch=0, rows=4, max_tokens=400)

    def read(workers):
        loader = DataLoader(rows, batch_sampler=plan.units, num_workers=workers, collate_fn=pad_rows)
        return [b["input_ids"] for b in loader]

    serial, parallel = read(0), read(2)
    assert len(serial) == len(plan)
    assert all(torch.equal(a, b) for a, b in zip(serial, parallel, strict=True))


def test_dynamic_batches_pad_far_less_than_fixed_size_batches_on_varied_chat_rows():
    rows = RowDataset(chat_stream(2000, 6), seq_len=256)
    plan = plan_epoch(rows, seed=0, epoch=0, rows=16, max_tokens=16 * 256 // 4)
    fixed = fixed_padding_share(plan.order_lengths, 16)
    dynamic = plan.padding_share()
    assert fixed > 0.4  # varied lengths: a fixed batch pads to its longest row
    assert dynamic < 0.05 and dynamic < fixed / 10
    fixed_plan = plan_epoch(rows, seed=0, epoch=0, rows=16, max_tokens=None)
    assert abs(fixed_plan.padding_share() - fixed) < 1e-12


def test_fixed_rows_plan_follows_the_seeded_epoch_order():
    rows = RowDataset(chat_stream(50, 8), seq_len=64)
    plan = plan_epoch(rows, seed=0, epoch=0, rows=8, max_tokens=None)
    assert len(plan) == 6 and all(len(u) == 8 for u in plan.units)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(0)).tolist()
    assert [i for u in plan.units for i in u] == order[:48]


def test_mixture_of_row_sources_reports_row_stats():
    a, b = RowDataset(chat_stream(60, 9), seq_len=64), RowDataset(chat_stream(20, 10, source="b"), seq_len=64)
    mix = MixtureDataset([a, b], [1.0, 1.0], seed=0, names=["a", "b"])
    idx = np.arange(len(mix))
    lengths, loss = row_stats(mix, idx)
    for i in idx[:30]:
        sample = mix[int(i)]
        assert lengths[i] == sample["input_ids"].shape[0]
        assert loss[i] == int((sample["labels"][1:] != IGNORE_INDEX).sum())
    plan = plan_epoch(mix, seed=0, epoch=0, rows=4, max_tokens=256)
    assert all(len(u) * lengths[np.asarray(u)].max() <= 256 for u in plan.units)


def test_chat_source_unpacked_through_the_pipeline(tmp_path):
    from Ava.config import DataConfig
    from Ava.data import prepare_data

    _write_chat(tmp_path / "chat.jsonl", 60, 0)
    data = DataConfig(sources=[{"path": str(tmp_path / "chat.jsonl"), "chat": {}}], seq_len=96, packing=False,
                      tokenizer={"vocab_size": 300}, val_fraction=0.1)
    prepared = prepare_data(data, seed=0)
    train = prepared.train
    assert isinstance(train, RowDataset) and isinstance(prepared.val, RowDataset)
    assert prepared.stats["train_windows"] == len(train) == 54 - train.dropped and prepared.stats["packing"] is False
    assert train.truncated > 0 and train.lengths.max() == 96 and train.lengths.min() < 96
    row = train[0]
    eos = prepared.tokenizer.eos_id
    # one conversation per row, starting at position 0, the prompt without labels
    assert row["position_ids"][0] == 0 and row["labels"][0] == IGNORE_INDEX
    if train.lengths[0] < 96:
        assert row["input_ids"][-1] == eos and (row["input_ids"][:-1] != eos).all()


def _write_chat(path, rows, seed):
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud ember quill lumen".split()
    with path.open("w") as f:
        for _ in range(rows):
            messages = [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(rng.randint(2, 10)))},
                        {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(rng.randint(1, 60)))}]
            f.write(json.dumps({"messages": messages}) + "\n")


def test_prepared_shards_give_the_rows_of_the_in_memory_path(tmp_path):
    from Ava.config import DataConfig, TokenizerConfig
    from Ava.data import prepare_corpus, prepare_data

    _write_chat(tmp_path / "chat.jsonl", 40, 1)
    common = {"seq_len": 96, "packing": False, "val_fraction": 0.1}
    data = DataConfig(sources=[{"path": str(tmp_path / "chat.jsonl"), "chat": {}}], tokenizer={"vocab_size": 300},
                      **common)
    prepare_corpus(data, tmp_path / "prepared", seed=0, workers=1, profile=False, progress=False)
    tokenizer = str(tmp_path / "prepared" / "tokenizer.json")
    in_memory = prepare_data(data.model_copy(update={"tokenizer": TokenizerConfig(path=tokenizer)}), seed=0)
    from_shards = prepare_data(DataConfig(prepared=str(tmp_path / "prepared"), **common), seed=0)
    assert isinstance(from_shards.train, RowDataset)
    assert from_shards.train.lengths.tolist() == in_memory.train.lengths.tolist()
    for i in range(len(in_memory.train)):
        a, b = in_memory.train[i], from_shards.train[i]
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
