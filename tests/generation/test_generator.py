"""Text generation: KV cache equivalence, seeded sampling, filters."""

import torch

from Ava.generation import TextGenerator
from Ava.generation.generator import sample_next_token


def test_greedy_with_and_without_cache_is_identical(trained_run):
    trainer, _ = trained_run
    gen = TextGenerator(trainer.model, trainer.data.tokenizer)
    prompt = trainer.data.tokenizer.encode("The king")
    cached = gen.generate_ids(prompt, 30, temperature=0, use_cache=True)
    uncached = gen.generate_ids(prompt, 30, temperature=0, use_cache=False)
    assert cached == uncached and len(cached) > 0


def test_seeded_sampling_is_reproducible(trained_run):
    trainer, _ = trained_run
    gen = TextGenerator(trainer.model, trainer.data.tokenizer)
    a = gen.generate("The", max_new_tokens=20, temperature=1.0, top_k=20, seed=3)
    b = gen.generate("The", max_new_tokens=20, temperature=1.0, top_k=20, seed=3)
    assert a == b and a.startswith("The")


def test_top_k_and_top_p_filter_the_candidates():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    g = torch.Generator().manual_seed(0)
    assert {sample_next_token(logits, 1.0, 2, None, g) for _ in range(200)} == {0, 1}
    # top-p 0.7: softmax mass of token 0 is 0.64 < 0.7, so tokens 0 and 1 remain
    assert {sample_next_token(logits, 1.0, None, 0.7, g) for _ in range(200)} == {0, 1}
    assert sample_next_token(logits, 0.0, None, None, g) == 0
