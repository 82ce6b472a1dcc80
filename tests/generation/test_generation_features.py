"""Batched, streamed, stopped and beam-searched generation on a tiny trained model and a crafted one."""

import math

import pytest
import torch

from Ava.config import ModelConfig
from Ava.generation import TextGenerator
from Ava.generation.sampling import SamplingParams
from Ava.models import EnhancedMoEModel

PROMPTS = ["The king", "ROMEO:\nThe moon loves", "A", "Sweet love and the crown"]


@pytest.fixture(scope="module")
def gen(trained_run):
    trainer, _ = trained_run
    return TextGenerator(trainer.model, trainer.data.tokenizer)


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_greedy_equals_one_by_one(gen, use_cache):
    params = SamplingParams(temperature=0, eos_id=gen.tokenizer.eos_id)
    batched = gen.generate_batch(PROMPTS, 12, params, use_cache=use_cache)
    for prompt, out in zip(PROMPTS, batched):
        alone = gen.generate_batch([prompt], 12, params, use_cache=use_cache)[0]
        assert out.token_ids == alone.token_ids and out.text == alone.text
    assert len({tuple(o.token_ids) for o in batched}) > 1  # the rows really differ


def test_seeded_batched_sampling_is_reproducible_and_seed_dependent(gen):
    params = SamplingParams(temperature=1.0, top_k=40, eos_id=None)
    a = gen.generate_batch(PROMPTS, 16, params, seed=7)
    b = gen.generate_batch(PROMPTS, 16, params, seed=7)
    c = gen.generate_batch(PROMPTS, 16, params, seed=8)
    assert a == b and a != c


def test_stop_string_stops_and_cuts_before_it(gen):
    params = SamplingParams(temperature=0, eos_id=None)
    full = gen.generate_batch(["The king"], 24, params)[0]
    stop = full.text[6:9]
    assert len(stop) == 3
    cut = full.text.index(stop)
    stopped = gen.generate_batch(["The king"], 24, SamplingParams(temperature=0, stop_strings=(stop,)))[0]
    assert stopped.text == full.text[:cut] and stopped.finish_reason == "stop_string"
    assert len(stopped.token_ids) < len(full.token_ids)
    assert gen.generate("The king", 24, temperature=0, stop_strings=[stop]) == "The king" + full.text[:cut]


def test_streaming_pieces_concatenate_to_the_full_output(gen):
    params = SamplingParams(temperature=0.9, top_p=0.95, stop_strings=("\n\n",), eos_id=gen.tokenizer.eos_id)
    pieces = list(gen.stream("ROMEO:", 40, params=params, seed=5))
    full = gen.generate_batch(["ROMEO:"], 40, params, seed=5)[0]
    assert "".join(pieces) == full.text and len(pieces) > 1
    seen = []
    text = gen.generate("ROMEO:", 40, temperature=0.9, top_p=0.95, seed=5, stop_strings=["\n\n"], on_text=seen.append)
    assert "".join(seen) == full.text and text == "ROMEO:" + full.text


def test_streaming_never_splits_a_multibyte_character(gen):
    tok = gen.tokenizer
    # force generation to emit the bytes of "é" one token at a time: a prompt then fixed ids
    ids = tok.encode("é€")
    text = []
    from Ava.generation.streaming import TextTracker

    tracker = TextTracker(lambda i: tok.decode(i, skip_special_tokens=True))
    for t in ids:
        text.append(tracker.add(t))
    text.append(tracker.finish())
    assert "".join(text) == "é€" and all("\ufffd" not in piece for piece in text)


def test_no_repeat_ngram_and_repetition_penalty_in_generation(gen):
    out = gen.generate_batch(["The king"], 40, SamplingParams(temperature=0, no_repeat_ngram_size=2))[0]
    ids = gen.tokenizer.encode("The king") + out.token_ids
    bigrams = list(zip(ids, ids[1:]))
    assert len(bigrams) == len(set(bigrams))
    plain = gen.generate_batch(["The king"], 40, SamplingParams(temperature=0))[0].token_ids
    penalised = gen.generate_batch(["The king"], 40, SamplingParams(temperature=0, repetition_penalty=3.0))[0]
    assert len(set(penalised.token_ids)) >= len(set(plain))


def test_beam_search_cache_reordering_matches_recomputation(gen):
    params = SamplingParams(eos_id=None)
    prompt = gen.tokenizer.encode("The king")
    cached = gen.beam_search_ids(prompt, 3, 10, params, use_cache=True)
    uncached = gen.beam_search_ids(prompt, 3, 10, params, use_cache=False)
    assert [h.token_ids for h in cached] == [h.token_ids for h in uncached]
    greedy = gen.generate_ids(prompt, 10, temperature=0)
    assert gen.beam_search_ids(prompt, 1, 10, params)[0].token_ids == greedy
    # the best beam is at least as likely as greedy
    assert gen.sequence_logprob(prompt, cached[0].token_ids) >= gen.sequence_logprob(prompt, greedy) - 1e-4


def _bigram_model(logprob_table: torch.Tensor) -> EnhancedMoEModel:
    """A real EnhancedMoEModel whose next-token distribution depends only on the last token.

    Attention and MLP outputs are zeroed, so the residual stream is the embedding: token i is the
    one-hot e_i, the final RMSNorm scales it to sqrt(D)·e_i, and lm_head[j, i] = table[i, j]/sqrt(D).
    """
    V, D = logprob_table.shape[0], 32
    cfg = ModelConfig(vocab_size=V, hidden_size=D, num_layers=2, num_heads=2, num_experts=4,
                      max_seq_len=32, moe={"top_k": 2, "moe_intermediate_size": 32})
    model = EnhancedMoEModel(cfg).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
        model.embed_tokens.weight.copy_(torch.eye(V, D))
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, :V] = logprob_table.t() / math.sqrt(D)
    return model


def test_beam_search_finds_a_more_likely_sequence_than_greedy():
    V = 16
    table = torch.full((V, V), 1e-6)
    table[1, 2], table[1, 3] = 0.55, 0.45  # greedy takes 2 ...
    table[2, 4:] = 1.0 / 12  # ... whose continuations are all unlikely
    table[3, 4] = 0.99  # while 3 leads to a near-certain continuation
    table[4:, 5] = 1.0
    table = table / table.sum(-1, keepdim=True)
    gen = TextGenerator(_bigram_model(table.log()), tokenizer=None)
    greedy = gen.generate_ids([1], 2, temperature=0)
    beam = gen.beam_search_ids([1], num_beams=2, max_new_tokens=2, params=SamplingParams())[0]
    assert greedy[0] == 2 and beam.token_ids == [3, 4]
    lp_greedy, lp_beam = gen.sequence_logprob([1], greedy), gen.sequence_logprob([1], beam.token_ids)
    assert lp_beam > lp_greedy + 1.5
    assert math.isclose(beam.sum_logprob, lp_beam, abs_tol=1e-3)
    assert math.isclose(lp_beam, float(table[1, 3].log() + table[3, 4].log()), abs_tol=1e-3)
