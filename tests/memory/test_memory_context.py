"""The replay memory as cross-attention context (memory.context_items): retrieval by key, the
context's shape and mask, self-exclusion, validation under the context, old states, config errors."""

import pytest
import torch
import yaml

from Ava.config import EnhancedTrainingConfig, ModelConfig
from Ava.config.training_sections import MemoryConfig
from Ava.errors import AvaConfigError
from Ava.evaluation.validation import validation_loss
from Ava.memory import EpisodicMemory, ReplayMemory
from Ava.memory.episodic_memory import mean_input_embeddings
from Ava.models import EnhancedMoEModel

KEYS = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]  # item i's key


def _store(keys=KEYS, first: int = 0) -> EpisodicMemory:
    """Items whose tokens all equal 10 × (first + i) and whose embedding is (first + i, first + i, first + i)."""
    n = len(keys)
    ids = (10 * torch.arange(first, first + n)).unsqueeze(1).expand(n, 4).clone()
    memory = EpisodicMemory(capacity=16)
    memory.push({"input_ids": ids, "labels": ids.clone()}, torch.ones(n),
                torch.arange(first, first + n, dtype=torch.float32).unsqueeze(1).expand(n, 3),
                keys=torch.tensor(keys))
    return memory


def test_each_row_gets_its_own_nearest_items_by_cosine():
    memory = _store()
    queries = torch.tensor([[2.0, 0.1], [0.1, 3.0], [-5.0, -0.2]])
    assert memory.nearest_by_key(queries, 2).tolist() == [[0, 2], [1, 2], [3, 1]]
    # an excluded id per row (a replayed row's own item), and the same tokens as a row
    got = memory.nearest_by_key(queries, 2, exclude_ids_B=torch.tensor([0, -1, -1]),
                                input_ids_BT=torch.tensor([[1, 1, 1, 1], [10, 10, 10, 10], [5, 5, 5, 5]]))
    assert got.tolist() == [[2, 1], [2, 0], [3, 1]]
    assert memory.nearest_by_key(queries[:1], 6).tolist() == [[0, 2, 1, 3, -1, -1]]  # fewer items: -1


def test_context_is_B_by_k_by_D_with_missing_items_masked():
    memory = _store(KEYS[:2])
    context_BKD, mask_BK = memory.context_for(torch.tensor([[0.0, 1.0], [1.0, 0.2]]), 3)
    assert context_BKD.shape == (2, 3, 3) and mask_BK.tolist() == [[True, True, False]] * 2
    assert context_BKD[:, :, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]  # item embeddings, nearest first
    empty_BKD, empty_BK = EpisodicMemory(4).context_for(torch.ones(2, 2), 3)
    assert not empty_BK.any() and empty_BK.shape == (2, 3)


def test_items_without_a_key_are_never_context_and_old_states_load():
    memory = _store(KEYS[:2])
    state = memory.state_dict()
    del state["keys"]  # a store saved before retrieval keys existed
    old = EpisodicMemory(16)
    old.load_state_dict(state)
    assert old.keys_NE.shape == (2, 0) and not old.context_for(torch.ones(1, 2), 2)[1].any()
    ids = torch.full((1, 4), 7)
    old.push({"input_ids": ids, "labels": ids}, torch.ones(1), torch.full((1, 3), 9.0), keys=torch.ones(1, 2))
    assert torch.isnan(old.keys_NE[:2]).all() and old.nearest_by_key(torch.ones(1, 2), 3).tolist() == [[2, -1, -1]]
    restored = EpisodicMemory(16)
    restored.load_state_dict(old.state_dict())
    assert torch.equal(restored.keys_NE[2:], old.keys_NE[2:])


def _tiny_model(every: int = 1) -> EnhancedMoEModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_experts=4, max_seq_len=16,
                      cross_attention={"every": every}, moe={"top_k": 2})
    return EnhancedMoEModel(cfg)


def test_a_replayed_row_never_gets_its_own_item_and_keys_are_stored_with_the_rows():
    model = _tiny_model()
    replay = ReplayMemory(MemoryConfig(enabled=True, replay_ratio=0.5, context_items=2, retrieval="importance"), 0)
    ids = torch.arange(16).view(2, 8) + 1
    batch = replay.mix({"input_ids": ids, "labels": ids.clone()}, 0)
    assert replay.context(batch, model) == (None, None)  # empty memory: no context
    keys = replay._keys_BE
    assert torch.allclose(keys, mean_input_embeddings(model, ids))
    replay.store.push(batch, torch.tensor([1.0, 2.0]), torch.tensor([[1.0] * 32, [2.0] * 32]), keys=keys)
    assert torch.equal(replay.store.keys_NE, keys)
    fresh = torch.arange(16).view(2, 8) + 30
    batch = replay.mix({"input_ids": fresh, "labels": fresh.clone()}, 0)
    replayed = int(replay._replayed_ids[0])
    context_BKD, mask_BK = replay.context(batch, model)
    assert context_BKD.shape == (2, 2, 32)
    assert mask_BK.tolist() == [[True, True], [True, False]]  # the replayed row: only the other item
    assert context_BKD[1, 0, 0].item() == {0: 2.0, 1: 1.0}[replayed]


def test_validation_runs_with_the_memorys_context():
    model = _tiny_model()
    for layer in model.layers:
        torch.nn.init.constant_(layer.cross_attn.gate, 1.0)  # an open gate: the context changes the output
    replay = ReplayMemory(MemoryConfig(enabled=True, context_items=2), 0)
    ids = torch.randint(0, 64, (3, 8), generator=torch.Generator().manual_seed(1))
    replay.store.push({"input_ids": ids, "labels": ids}, torch.ones(3), torch.randn(3, 32),
                      keys=mean_input_embeddings(model, ids))
    val = [torch.randint(0, 64, (8,), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    plain = validation_loss(model, val, batch_size=2)["loss"]
    with_context = validation_loss(model, val, batch_size=2,
                                   extra_inputs=lambda batch: replay.validation_context(batch, model))["loss"]
    assert with_context != plain
    off = ReplayMemory(MemoryConfig(enabled=True, context_items=0), 0)
    off.store = replay.store
    assert validation_loss(model, val, batch_size=2,
                           extra_inputs=lambda batch: off.validation_context(batch, model))["loss"] == plain


@pytest.mark.parametrize("setting, match", [
    ({"memory": {"context_items": 2}, "model": {"cross_attention": {"every": 1}}},
     "memory.context_items: 2 reads the replay memory's items, and memory.enabled is false"),
    ({"memory": {"enabled": True, "context_items": 2}},
     "memory.context_items: 2 is the context of the cross-attention blocks"),
    ({"memory": {"enabled": True, "context_items": 2}, "model": {"num_layers": 2, "cross_attention": {"every": 3}}},
     "memory.context_items: 2 is the context of the cross-attention blocks"),
    ({"memory": {"enabled": True, "context_items": 2},
      "model": {"hidden_size": 64, "cross_attention": {"every": 1, "context_size": 32}}},
     "model.cross_attention.context_size: 32"),
])
def test_context_items_without_what_they_need_is_a_one_line_error(tmp_path, setting, match):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(setting))
    with pytest.raises(AvaConfigError, match=match) as err:
        EnhancedTrainingConfig.from_yaml(path)
    assert "\n" not in str(err.value)
    good = {"memory": {"enabled": True, "context_items": 2}, "model": {"cross_attention": {"every": 1}}}
    path.write_text(yaml.safe_dump(good))
    assert EnhancedTrainingConfig.from_yaml(path).memory.context_items == 2
