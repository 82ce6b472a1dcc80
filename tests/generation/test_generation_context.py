"""TextGenerator with a cross-attention context: passed at the prefill and every decoding step,
with and without the KV cache, one row per prompt; and MemoryContext's retrieval for prompts."""

import pytest
import torch

from Ava.config import ModelConfig
from Ava.generation import TextGenerator
from Ava.generation.sampling import SamplingParams
from Ava.memory import EpisodicMemory, MemoryContext
from Ava.memory.episodic_memory import mean_input_embeddings
from Ava.models import EnhancedMoEModel

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def model() -> EnhancedMoEModel:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, num_experts=4, max_seq_len=32,
                      cross_attention={"every": 1}, moe={"top_k": 2})
    model = EnhancedMoEModel(cfg).eval()
    for layer in model.layers:
        torch.nn.init.constant_(layer.cross_attn.gate, 2.0)  # an open gate: the context matters
    return model


def test_the_context_reaches_every_decoding_step_with_and_without_the_cache(model):
    generator = TextGenerator(model, None)
    prompts = [[3, 4, 5], [7, 8]]
    context = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(0)) * 4
    mask = torch.tensor([[True, True, False], [True, False, False]])
    calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs.get("context")), with_kwargs=True)
    try:
        cached = generator.generate_ids_batch(prompts, 6, GREEDY, context=context, context_mask=mask)
    finally:
        handle.remove()
    assert len(calls) == 6 and all(c is not None and c.shape == (2, 3, 32) for c in calls)
    uncached = generator.generate_ids_batch(prompts, 6, GREEDY, use_cache=False, context=context, context_mask=mask)
    assert cached == uncached
    plain = generator.generate_ids_batch(prompts, 6, GREEDY)
    assert cached != plain
    # one prompt alone gets the same tokens as in the batch (its own context row)
    assert generator.generate_ids(prompts[1], 6, temperature=0, context=context[1:], context_mask=mask[1:]) == cached[1]


def test_a_context_for_another_batch_or_mode_is_refused(model):
    generator = TextGenerator(model, None)
    with pytest.raises(ValueError, match=r"expected \(2, S, C\)"):
        generator.generate_ids_batch([[1], [2]], 2, GREEDY, context=torch.zeros(1, 2, 32))
    with pytest.raises(ValueError, match="not by speculative decoding"):
        generator.generate_ids_batch([[1]], 2, GREEDY, context=torch.zeros(1, 2, 32), speculative=True)


def test_memory_context_gives_each_prompt_its_nearest_items(model):
    prompts = [[3, 4, 5, 6], [40, 41, 42]]
    keys = mean_input_embeddings(model, torch.tensor([[40, 41, 42]]))
    other = mean_input_embeddings(model, torch.tensor([[3, 4, 5, 6]]))
    store = EpisodicMemory(8)
    ids = torch.zeros(2, 4, dtype=torch.long)
    store.push({"input_ids": ids, "labels": ids}, torch.ones(2), torch.stack([torch.full((32,), 1.0),
                                                                             torch.full((32,), 2.0)]),
               keys=torch.cat([keys, other]))
    context, mask = MemoryContext(store, 2)(model, prompts)
    assert context.shape == (2, 2, 32) and mask.all()
    assert context[:, 0, 0].tolist() == [2.0, 1.0]  # prompt 0 is nearest item 1, prompt 1 item 0
    with pytest.raises(ValueError, match="k must be at least 1"):
        MemoryContext(store, 0)
