"""Self-speculative decoding with the MTP heads: same output as greedy, fewer main forwards."""

import math

import pytest
import torch

from Ava.cli.main import main
from Ava.config import ModelConfig
from Ava.data import AvaTokenizer
from Ava.errors import AvaConfigError
from Ava.generation import TextGenerator
from Ava.generation.sampling import SamplingParams
from Ava.generation.speculative import MTPDrafter, forward_with_hidden
from Ava.models import EnhancedMoEModel
from Ava.utils.checkpoint import TOKENIZER_FILE

CYCLE = "abcdefghijk."  # 12 distinct characters, one byte-level token each


def _tokenizer() -> AvaTokenizer:
    return AvaTokenizer.train([CYCLE], vocab_size=258, min_frequency=1000)  # bytes + 2 specials, no merges


def _model(num_heads: int, vocab: int = 258, seed: int = 0) -> EnhancedMoEModel:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4,
                      max_seq_len=64, moe={"top_k": 2, "moe_intermediate_size": 32},
                      mtp={"num_heads": num_heads, "loss_weight": 1.0})
    return EnhancedMoEModel(cfg).eval()


def _train_on_cycle(model: EnhancedMoEModel, tok: AvaTokenizer, steps: int = 80) -> EnhancedMoEModel:
    """A few steps on the repeating text: the main head and every MTP depth learn it."""
    stream = torch.tensor(tok.encode(CYCLE * 8))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        offsets = torch.randint(0, len(CYCLE), (8,), generator=gen)
        ids = torch.stack([stream[o:o + 16] for o in offsets])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def tok() -> AvaTokenizer:
    return _tokenizer()


@pytest.fixture(scope="module", params=[1, 2], ids=["D1", "D2"])
def trained(request, tok) -> TextGenerator:
    return TextGenerator(_train_on_cycle(_model(request.param), tok), tok)


class _ForwardCounter:
    """Counts calls of the main model's forward."""

    def __init__(self, model: EnhancedMoEModel) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, *_):
        self.calls += 1


def _greedy_and_speculative(gen: TextGenerator, prompt: list[int], n: int, **kw) -> tuple[list[int], list[int]]:
    plain = gen.generate_ids(prompt, n, temperature=0, **kw)
    spec = gen.generate_ids(prompt, n, temperature=0, speculative=True, **kw)
    return plain, spec


# -- same output as greedy -------------------------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 2])
def test_random_model_output_equals_greedy(num_heads):
    gen = TextGenerator(_model(num_heads, vocab=61), None)
    g = torch.Generator().manual_seed(1)
    for length, n in [(1, 17), (3, 1), (10, 2), (40, 9)]:
        prompt = torch.randint(0, 61, (length,), generator=g).tolist()
        plain, spec = _greedy_and_speculative(gen, prompt, n)
        assert spec == plain and len(spec) == n


def test_trained_model_output_equals_greedy_and_saves_forwards(trained, tok):
    depth = trained.model.config.mtp.num_heads
    for prompt_text in ("abc", "k.ab", "jjj", "hello world", "."):
        prompt = tok.encode(prompt_text)
        for n in (1, 2, 3, 4, 7, 30):  # every remainder modulo D + 1: the last block overshoots
            counter = _ForwardCounter(trained.model)
            try:
                plain = trained.generate_ids(prompt, n, temperature=0)
                plain_calls = counter.calls
                spec = trained.generate_ids(prompt, n, temperature=0, speculative=True)
                spec_calls = counter.calls - plain_calls
            finally:
                counter.handle.remove()
            assert spec == plain and len(spec) == n, (prompt_text, n)
            stats = trained.speculative_stats
            assert spec_calls == stats.forwards and stats.tokens == n
            assert plain_calls == n
    # on the learned cycle the heads draft the continuation and the main model accepts it
    trained.generate_ids(tok.encode("abcd"), 40, temperature=0, speculative=True)
    stats = trained.speculative_stats
    assert stats.acceptance_rate > 0.8 and stats.mean_accepted > 0.8 * depth
    assert stats.forwards <= math.ceil(40 / (depth + 1)) + 3 < 40


def test_eos_inside_an_accepted_block_is_cut_exactly(trained, tok):
    prompt = tok.encode("abc")
    greedy = trained.generate_ids(prompt, 30, temperature=0)
    for offset in range(1, 6):  # EOS lands at every offset inside a drafted block
        eos = greedy[offset]
        plain, spec = _greedy_and_speculative(trained, prompt, 30, eos_id=eos)
        assert spec == plain == greedy[: greedy.index(eos)]


def test_logit_processors_act_on_every_verified_position(trained, tok):
    prompt = tok.encode("abcabc")
    for options in ({"repetition_penalty": 1.5}, {"no_repeat_ngram_size": 2}, {"no_repeat_ngram_size": 13}):
        plain, spec = _greedy_and_speculative(trained, prompt, 25, **options)
        assert spec == plain, options


def test_finish_reasons_stop_strings_and_context_match_greedy(trained, tok):
    prompts = ["abc", "fgh", "k." * 30]  # the last fills the 64-token context after 4 tokens
    for stop in ((), ("b",), ("gh",)):
        params = SamplingParams(temperature=0, stop_strings=stop, eos_id=tok.eos_id)
        plain = trained.generate_batch(prompts, 11, params)
        spec = trained.generate_batch(prompts, 11, params, speculative=True)
        assert spec == plain
    # "abc" → "defgh" (stop), "fgh" → "ijk.abcdefg" (no "gh" yet), then the context is full
    assert [o.finish_reason for o in spec] == ["stop_string", "length", "context"]
    # streamed pieces concatenate to the same text
    pieces = list(trained.stream("abc", 20, params=SamplingParams(temperature=0, stop_strings=("j",)),
                                 speculative=True))
    assert "".join(pieces) == trained.generate_batch(["abc"], 20, SamplingParams(temperature=0,
                                                                                 stop_strings=("j",)))[0].text
    assert trained.generate("abc", 9, temperature=0, speculative=True) == trained.generate("abc", 9, temperature=0)


# -- forward counting with crafted drafts ----------------------------------------------------


@pytest.mark.parametrize("num_heads", [1, 2, 3])
def test_perfect_drafts_need_one_forward_per_block(monkeypatch, num_heads):
    gen = TextGenerator(_model(num_heads, vocab=61), None)
    prompt = [5, 7, 11, 13]
    n = 20
    greedy = gen.generate_ids(prompt, n + num_heads, temperature=0)
    full = prompt + greedy

    def oracle(self, k):  # the main model's own continuation: every draft is accepted
        return full[len(self.tokens): len(self.tokens) + k]

    monkeypatch.setattr(MTPDrafter, "draft", oracle)
    counter = _ForwardCounter(gen.model)
    spec = gen.generate_ids(prompt, n, temperature=0, speculative=True)
    counter.handle.remove()
    assert spec == greedy[:n]
    # the prefill gives token 1, then each forward verifies a block of D drafts + 1 own token
    expected = 1 + math.ceil((n - 1) / (num_heads + 1))
    stats = gen.speculative_stats
    assert counter.calls == stats.forwards == expected < n
    assert stats.accepted == n - expected and stats.acceptance_rate == 1.0


def test_partially_right_drafts_roll_the_cache_back(monkeypatch):
    gen = TextGenerator(_model(3, vocab=61), None)
    prompt = [3, 1, 4, 1, 5]
    greedy = gen.generate_ids(prompt, 30, temperature=0)
    full = prompt + greedy

    def half_right(self, k):  # first draft right, the others wrong
        right = full[len(self.tokens): len(self.tokens) + k]
        return right[:1] + [(t + 1) % 61 for t in right[1:]]

    monkeypatch.setattr(MTPDrafter, "draft", half_right)
    for n in (2, 5, 24):
        assert gen.generate_ids(prompt, n, temperature=0, speculative=True) == greedy[:n]
    stats = gen.speculative_stats
    assert stats.mean_accepted == pytest.approx(1.0, abs=0.1) and stats.forwards == 1 + math.ceil(23 / 2)


# -- the drafter's caches are exact -----------------------------------------------------------


def test_cached_drafts_equal_the_full_mtp_forward():
    """Depth j's draft at position n-1 = ``return_mtp`` logits over t_0..t_n, d_1..d_{j-1}."""
    model = _model(3, vocab=61, seed=2)
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 61, (6,), generator=g).tolist()
    with torch.no_grad():
        _, _, hidden = forward_with_hidden(model, torch.tensor([tokens[:-1]]), None)
        drafter = MTPDrafter(model, tokens, hidden)
        seen: list[torch.Tensor] = []
        handle = model.lm_head.register_forward_hook(lambda _m, _a, out: seen.append(out))
        try:
            for step, k in enumerate([3, 1, 2, 3, 3, 2, 3]):
                seen.clear()
                drafts = drafter.draft(k)
                mine = list(seen)
                n = len(drafter.tokens) - 1
                for j in range(1, k + 1):
                    ext = torch.tensor([drafter.tokens + drafts[: j - 1]])
                    seen.clear()
                    ref = model(ext, return_mtp=True).mtp_logits[j - 1][0, n - 1]
                    torch.testing.assert_close(mine[j - 1][0], ref, rtol=1e-4, atol=1e-5)
                    assert drafts[j - 1] == int(ref.argmax())
                # accept a varying number of (arbitrary) tokens; h^0 of their positions from a full pass
                accepted = torch.randint(0, 61, (1 + step % 3,), generator=g).tolist()
                new_tokens = drafter.tokens + accepted
                _, _, full_hidden = forward_with_hidden(model, torch.tensor([new_tokens[:-1]]), None)
                drafter.commit(accepted, full_hidden[:, n:])
        finally:
            handle.remove()


# -- options and errors ----------------------------------------------------------------------


def test_model_without_mtp_heads_is_a_clear_error(tok):
    gen = TextGenerator(_model(0), tok)
    with pytest.raises(AvaConfigError, match=r"model\.mtp\.num_heads is 0"):
        gen.generate("abc", 5, temperature=0, speculative=True)
    with pytest.raises(AvaConfigError, match=r"model\.mtp\.num_heads is 0"):
        gen.generate_ids([1, 2], 5, temperature=0, speculative=True)


def test_cache_off_and_beams_are_rejected(tok):
    gen = TextGenerator(_model(1), tok)
    with pytest.raises(AvaConfigError, match="KV cache"):
        gen.generate("abc", 5, temperature=0, speculative=True, use_cache=False)
    with pytest.raises(AvaConfigError, match="beam"):
        gen.generate("abc", 5, temperature=0, speculative=True, num_beams=2)


def test_sampling_decodes_plainly(tok):
    gen = TextGenerator(_model(2), tok)
    gen.generate_ids([66, 67], 4, temperature=0, speculative=True)
    assert gen.speculative_stats is not None
    spec = gen.generate("abc", 12, temperature=1.0, top_k=20, seed=4, speculative=True)
    assert gen.speculative_stats is None
    assert spec == gen.generate("abc", 12, temperature=1.0, top_k=20, seed=4)


def test_cli_speculative_flag(trained, tok, tmp_path, capsys):
    folder = trained.model.save_pretrained(tmp_path / "model")
    tok.save(folder / TOKENIZER_FILE)
    args = ["generate", str(folder), "--prompt", "abc", "--temperature", "0", "--max-new-tokens", "15"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main([*args, "--speculative"]) == 0
    captured = capsys.readouterr()
    # (endswith: an earlier test in the session may have routed the INFO log to stdout)
    assert captured.out.endswith(plain) and "drafts accepted" in captured.err
    assert main(["generate", str(folder), "--prompt", "abc", "--speculative", "--no-cache"]) == 2
    assert "KV cache" in capsys.readouterr().err


def test_summary_counts_in_the_singular_for_one():
    from Ava.generation.speculative import SpeculativeStats

    one = SpeculativeStats(steps=1, drafted=1, accepted=1, tokens=1, forwards=1).summary()
    assert one.startswith("1 token in 1 main forward (") and "1/1 draft accepted" in one and one.endswith("1 step")
    two = SpeculativeStats(steps=2, drafted=2, accepted=1, tokens=3, forwards=2).summary()
    assert two.startswith("3 tokens in 2 main forwards (") and "1/2 drafts accepted" in two
