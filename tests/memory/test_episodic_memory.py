"""The replay store and mixer of memory/episodic_memory.py on hand-made rows and vectors."""

from types import SimpleNamespace

import pytest
import torch

from Ava.config.training_sections import MemoryConfig
from Ava.memory import EpisodicMemory, ReplayMemory
from Ava.memory.episodic_memory import replay_rows


def _rows(first: int, count: int, T: int = 4) -> dict[str, torch.Tensor]:
    """``count`` rows whose tokens all equal their row number (first, first + 1, ...)."""
    ids = torch.arange(first, first + count).unsqueeze(1).expand(count, T).clone()
    return {"input_ids": ids, "labels": ids.clone()}


def _push(memory: EpisodicMemory, first: int, importance: list[float], vectors=None) -> torch.Tensor:
    n = len(importance)
    vectors = torch.zeros(n, 2) if vectors is None else torch.tensor(vectors, dtype=torch.float32)
    return memory.push(_rows(first, n), torch.tensor(importance), vectors)


def _tokens(memory: EpisodicMemory) -> list[int]:
    return memory.rows["input_ids"][:, 0].tolist()


def test_eviction_keeps_the_highest_importance_items():
    memory = EpisodicMemory(capacity=4)
    _push(memory, 0, [5.0, 1.0, 3.0])
    _push(memory, 10, [2.0, 9.0, 0.5, 4.0])
    assert len(memory) == 4
    assert sorted(memory.importance_N.tolist()) == [3.0, 4.0, 5.0, 9.0]
    assert _tokens(memory) == [0, 2, 11, 13]  # kept in push order, with their own rows
    _push(memory, 20, [float("nan"), 3.0])  # NaN is never stored; a tie keeps the older item
    assert _tokens(memory) == [0, 2, 11, 13]


def test_rescoring_a_stored_item_changes_what_is_evicted():
    memory = EpisodicMemory(capacity=2)
    ids = _push(memory, 0, [5.0, 4.0])
    memory.update(ids[:1], torch.tensor([0.1]))
    _push(memory, 10, [1.0])
    assert _tokens(memory) == [1, 10]


def test_cosine_retrieval_returns_the_nearest_directions():
    memory = EpisodicMemory(capacity=8)
    ids = _push(memory, 0, [1.0] * 4, [[1.0, 0.0], [0.0, 1.0], [10.0, 1.0], [-1.0, 0.0]])
    got = memory.nearest(torch.tensor([1.0, 0.05]), 2, "cosine")
    assert got.tolist() == [ids[2].item(), ids[0].item()]  # (10, 1) is the closest direction, then (1, 0)


def test_euclidean_retrieval_returns_the_nearest_points():
    memory = EpisodicMemory(capacity=8)
    ids = _push(memory, 0, [1.0] * 4, [[1.0, 0.0], [0.0, 1.0], [10.0, 1.0], [-1.0, 0.0]])
    got = memory.nearest(torch.tensor([0.0, 0.9]), 3, "euclidean")
    assert got.tolist() == [ids[1].item(), ids[0].item(), ids[3].item()]
    assert memory.nearest(torch.tensor([0.0, 0.9]), 3, "euclidean", exclude_from=ids[1].item()).tolist() == [0]


def test_importance_sampling_is_seeded_and_prefers_important_items():
    def draws(seed: int) -> list[int]:
        memory = EpisodicMemory(capacity=4, seed=seed)
        _push(memory, 0, [100.0, 1.0, 1.0, 1.0])
        return [memory.sample_by_importance(1).item() for _ in range(50)]

    assert draws(3) == draws(3)
    assert draws(3).count(0) > 40  # p = 100/103 each draw
    memory = EpisodicMemory(capacity=4)
    _push(memory, 0, [-2.0, 0.0, 1.0])  # surprise scores may be negative
    assert sorted(memory.sample_by_importance(3).tolist()) == [0, 1, 2]


@pytest.mark.parametrize("ratio, rows, want", [(0.25, 8, 2), (0.3, 8, 2), (0.5, 5, 3), (0.1, 4, 0), (0.9, 2, 1)])
def test_replay_count_is_the_rounded_share_leaving_a_fresh_row(ratio, rows, want):
    assert replay_rows(ratio, rows) == want


def _observe(replay: ReplayMemory, batch: dict[str, torch.Tensor]) -> None:
    """What the trainer does after a backward, with uniform logits and constant hidden states."""
    B, T = batch["input_ids"].shape
    replay._hidden_BTD = torch.ones(B, T, 3)  # what capture() keeps during the forward
    replay.observe(SimpleNamespace(logits=torch.zeros(B, T, 64)), batch["labels"], model=None)


def test_mixed_batches_replace_the_configured_share_of_rows_with_stored_ones():
    replay = ReplayMemory(MemoryConfig(enabled=True, capacity=16, replay_ratio=0.25), seed=0)
    first = {**_rows(0, 8, T=6), "source": torch.zeros(8, dtype=torch.long)}
    assert replay.mix(first, step=0) is first  # empty memory: nothing replaced
    _observe(replay, first)
    assert len(replay.store) == 8
    fresh = {**_rows(100, 8, T=6), "source": torch.ones(8, dtype=torch.long)}
    mixed = replay.mix(fresh, step=1)
    assert mixed["input_ids"].shape == (8, 6)
    assert torch.equal(mixed["input_ids"][:6], fresh["input_ids"][:6])  # the first rows stay fresh
    replayed = mixed["input_ids"][6:, 0].tolist()
    assert len(set(replayed)) == 2 and all(0 <= t < 8 for t in replayed)  # 2 = round(0.25 × 8) stored rows
    assert mixed["source"].tolist() == [1] * 6 + [0] * 2  # replayed rows keep their source
    assert replay.metrics()["memory/replayed"] == 2


def test_stored_rows_fit_batches_of_another_length():
    memory = EpisodicMemory(capacity=4)
    rows = {"input_ids": torch.tensor([[5, 6, 7]]), "labels": torch.tensor([[5, 6, 7]]),
            "position_ids": torch.tensor([[0, 1, 2]]), "document_ids": torch.tensor([[0, 0, 0]])}
    ids = memory.push(rows, torch.tensor([1.0]), torch.zeros(1, 2))
    keys = ["input_ids", "labels", "position_ids", "document_ids"]
    longer = memory.rows_for(ids, 5, keys)
    assert longer["input_ids"].tolist() == [[5, 6, 7, 0, 0]]
    assert longer["labels"].tolist() == [[5, 6, 7, -100, -100]]
    assert longer["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert longer["document_ids"].tolist() == [[0, 0, 0, 1, 1]]
    assert memory.rows_for(ids, 2, keys)["input_ids"].tolist() == [[5, 6]]


def test_state_round_trip_restores_contents_and_sampling():
    memory = EpisodicMemory(capacity=4, seed=1)
    _push(memory, 0, [3.0, 1.0, 2.0], [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    memory.sample_by_importance(2)
    copy = EpisodicMemory(capacity=4, seed=99)
    copy.load_state_dict(memory.state_dict())
    assert torch.equal(copy.rows["input_ids"], memory.rows["input_ids"])
    assert torch.equal(copy.embeddings_ND, memory.embeddings_ND)
    assert [copy.sample_by_importance(2).tolist() for _ in range(5)] == \
        [memory.sample_by_importance(2).tolist() for _ in range(5)]


def test_row_losses_match_the_mean_loss_and_mark_rows_without_targets():
    from Ava.losses.language_modeling import causal_lm_loss, causal_lm_row_losses

    torch.manual_seed(0)
    logits, labels = torch.randn(3, 5, 11), torch.randint(0, 11, (3, 5))
    rows = causal_lm_row_losses(logits, labels)
    assert torch.allclose(rows.mean(), causal_lm_loss(logits, labels))
    assert torch.allclose(rows[1], causal_lm_loss(logits[1:2], labels[1:2]))
    labels[2, 1:] = -100
    assert torch.isnan(causal_lm_row_losses(logits, labels)[2])
