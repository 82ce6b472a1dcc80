"""Logits processors on hand-made logits: min-p, repetition penalty, no-repeat n-gram, top-k/p."""

import math

import pytest
import torch

from Ava.generation.sampling import (
    SamplingParams,
    apply_min_p,
    apply_no_repeat_ngram,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    banned_ngram_tokens,
    process_logits,
)
from Ava.generation.streaming import TextTracker

INF = float("-inf")


def test_min_p_keeps_tokens_above_the_scaled_max():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = apply_min_p(probs.log(), 0.35)  # threshold 0.175: keeps 0.5 and 0.3
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    assert torch.isfinite(apply_min_p(probs.log(), 0.09)).all()  # threshold 0.045 keeps all
    assert out[0, 0] == probs.log()[0, 0]


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 3.0, 0.5]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -2.0, 3.0, 0.5]]
    assert apply_repetition_penalty(logits, seen, 1.0) is logits


def test_no_repeat_ngram_bans_the_completing_token():
    # history 5 6 7 5 6: the bigram prefix (6,) was followed by 7, so 7 is banned for n=2;
    # for n=3 the prefix (5, 6) was followed by 7 too
    history = [5, 6, 7, 5, 6]
    assert banned_ngram_tokens(history, 2) == {7}
    assert banned_ngram_tokens(history, 3) == {7}
    assert banned_ngram_tokens(history, 4) == set()  # (7, 5, 6) never seen before
    assert banned_ngram_tokens([1, 2, 1], 1) == {1, 2}
    logits = torch.zeros(2, 10)
    out = apply_no_repeat_ngram(logits, [history, [1, 2, 3]], 2)
    assert out[0, 7] == INF and torch.isfinite(out[0, :7]).all() and torch.isfinite(out[1]).all()
    assert torch.isfinite(logits).all()  # input untouched


def test_top_k_and_top_p_batched():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 5.0, 0.0, 0.0]])
    assert torch.isfinite(apply_top_k(logits, 2)).sum(-1).tolist() == [2, 5]  # ties at the k-th stay
    kept = torch.isfinite(apply_top_p(logits, 0.7))
    assert kept[0].tolist() == [True, True, False, False, False]  # 0.64 < 0.7 → two tokens
    assert kept[1].tolist() == [False, False, True, False, False]


def test_process_logits_greedy_ignores_temperature_filters_but_keeps_penalties():
    params = SamplingParams(temperature=0, top_k=1, repetition_penalty=10.0)
    logits = torch.tensor([[2.0, 1.9]])
    out = process_logits(logits, params, seen_BV=torch.tensor([[True, False]]))
    assert out.argmax().item() == 1 and math.isclose(out[0, 0].item(), 0.2, rel_tol=1e-6)


def test_sampling_params_validate():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="empty"):
        SamplingParams(stop_strings=("",))


def test_text_tracker_holds_back_partial_characters_and_stop_prefixes():
    data = "héllo\n\nworld".encode()
    tracker = TextTracker(lambda ids: bytes(ids).decode("utf-8", errors="replace"), stop_strings=["\n\n"])
    pieces = [tracker.add(b) for b in data]
    assert pieces[1] == "" and pieces[2] == "é"  # the 2-byte é is emitted once complete
    assert "".join(pieces) == "héllo" and tracker.stopped and tracker.text == "héllo"
