"""Multiple choice as lm-evaluation-harness scores it: the context/continuation split, the three
accuracies (acc, acc_norm per character, acc_per_token), windows for long items, row checks."""

import json
import math

import pytest
import torch

from Ava.errors import AvaDataError
from Ava.evaluation import (
    METRICS,
    ChoiceScore,
    choice_loglikelihoods,
    continuation_loglikelihood,
    encode_pair,
    predictions,
    read_multiple_choice,
    score_multiple_choice,
    split_context,
)


def _model_and_tokenizer(trained_run):
    trainer, _ = trained_run
    return trainer.model.eval(), trainer.data.tokenizer


def _manual_sum(model, context_ids, continuation_ids) -> float:
    """The harness's computation, by hand: one forward of (context + continuation)[:-1]."""
    ids = context_ids + continuation_ids
    logprobs = model(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
    return sum(logprobs[len(context_ids) - 1 + i, t].item() for i, t in enumerate(continuation_ids))


# --------------------------------------------------------------------------------------------
# context / continuation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("question", "choice", "expected"), [
    ("Q: x? A: ", "y", ("Q: x? A:", " y")),     # trailing space moves into the continuation
    ("Q: x? A:", "y", ("Q: x? A:", " y")),      # the harness's target_delimiter " "
    ("Q: x? A:\n", "y", ("Q: x? A:", "\ny")),   # any trailing whitespace, as the harness
    ("Q: x? A:  ", "y", ("Q: x? A:", "  y")),
    ("Q: x? A:", " y", ("Q: x? A:", " y")),     # a choice with its own space gets no other
    ("", "y", ("", "y")),
])
def test_trailing_whitespace_of_the_context_moves_into_the_continuation(question, choice, expected):
    assert split_context(question, choice) == expected


def test_encode_pair_splits_the_joint_encoding_after_the_context(trained_run):
    _, tok = _model_and_tokenizer(trained_run)
    context, continuation = "KING:\nThe king", " loves the stars."
    ctx, cont = encode_pair(tok, context, continuation)
    assert ctx == tok.encode(context) and ctx + cont == tok.encode(context + continuation)
    # the question with a trailing space is scored exactly as the one without + " choice"
    assert encode_pair(tok, *split_context("KING:\nThe king ", "loves the stars.")) == (ctx, cont)
    assert encode_pair(tok, "", "the stars") == ([tok.eos_id], tok.encode("the stars"))


def test_choice_loglikelihood_is_the_harness_sum_over_the_continuation(trained_run):
    model, tok = _model_and_tokenizer(trained_run)
    question, choices = "KING:\nThe king loves ", ["the stars.", "qxz zjv wkkp."]
    scores = choice_loglikelihoods(model, tok, question, choices)
    for choice, score in zip(choices, scores):
        ctx, cont = tok.encode("KING:\nThe king loves"), tok.encode("KING:\nThe king loves " + choice)
        cont = cont[len(ctx):]
        assert score.loglikelihood == pytest.approx(_manual_sum(model, ctx, cont), abs=1e-4)
        assert (score.tokens, score.chars, score.truncated) == (len(cont), len(choice), False)
        assert score.value("acc_norm") == pytest.approx(score.loglikelihood / len(choice))
        assert score.value("acc_per_token") == pytest.approx(score.loglikelihood / len(cont))
    assert scores[0].loglikelihood > scores[1].loglikelihood


# --------------------------------------------------------------------------------------------
# the three accuracies
# --------------------------------------------------------------------------------------------


# Each question: choices (their lengths matter for acc_norm) and per choice (sum, tokens).
# Q1: acc → 0 (-2 > -5); acc_norm → 1 (-2/1 < -5/10); acc_per_token → 0 (-2/1 > -5/2)
# Q2: acc → 0 (-3 > -4); acc_norm → 0 (-3/5 > -4/5); acc_per_token → 1 (-3/1 < -4/4)
# Q3: a tie on every metric → the first choice
_QUESTIONS = [
    ({"question": "q1", "choices": ["a", "bbbbbbbbbb"], "answer": 1}, [(-2.0, 1), (-5.0, 2)]),
    ({"question": "q2", "choices": ["ccccc", "ddddd"], "answer": 1}, [(-3.0, 1), (-4.0, 4)]),
    ({"question": "q3", "choices": ["ee", "ff"], "answer": 0}, [(-1.0, 1), (-1.0, 1)]),
]


def _fixed_scores(question, choices):
    table = {row["question"]: given for row, given in _QUESTIONS}
    return [ChoiceScore(ll, n, len(c), False) for c, (ll, n) in zip(choices, table[question])]


def test_acc_acc_norm_and_acc_per_token_follow_their_definitions(trained_run):
    model, tok = _model_and_tokenizer(trained_run)
    rows = [row for row, _ in _QUESTIONS]
    result = score_multiple_choice(model, tok, rows, score_fn=_fixed_scores)
    picks = [item["predicted"] for item in result["items"]]
    assert picks == [{"acc": 0, "acc_norm": 1, "acc_per_token": 0},
                     {"acc": 0, "acc_norm": 0, "acc_per_token": 1},
                     {"acc": 0, "acc_norm": 0, "acc_per_token": 0}]
    # answers 1, 1, 0: acc right on Q3 only; acc_norm on Q1 and Q3; acc_per_token on Q2 and Q3
    assert result["acc"] == pytest.approx(1 / 3)
    assert result["acc_norm"] == pytest.approx(2 / 3) and result["acc_per_token"] == pytest.approx(2 / 3)
    assert result["correct"] == {"acc": 1, "acc_norm": 2, "acc_per_token": 2} and result["questions"] == 3
    # the harness's mean_stderr: sample standard deviation / sqrt(n)
    assert result["acc_stderr"] == pytest.approx(math.sqrt((2 * (1 / 3) ** 2 + (2 / 3) ** 2) / 2) / math.sqrt(3))
    assert result["items"][0]["loglikelihoods"] == [-2.0, -5.0] and result["items"][0]["chars"] == [1, 10]
    assert set(METRICS) == {"acc", "acc_norm", "acc_per_token"}


def test_acc_norm_divides_by_characters_not_tokens():
    short_many_tokens = ChoiceScore(-6.0, tokens=6, chars=3, truncated=False)  # per char -2, per token -1
    long_few_tokens = ChoiceScore(-8.0, tokens=2, chars=8, truncated=False)   # per char -1, per token -4
    assert predictions([short_many_tokens, long_few_tokens]) == {"acc": 0, "acc_norm": 1, "acc_per_token": 0}


# --------------------------------------------------------------------------------------------
# items longer than the window
# --------------------------------------------------------------------------------------------


def test_a_context_too_long_for_the_window_is_cut_from_the_left(trained_run):
    model, tok = _model_and_tokenizer(trained_run)
    window = model.config.max_seq_len
    ctx = tok.encode("ROMEO:\nThe king loves the stars. " * 40)
    assert len(ctx) > 2 * window
    cont = tok.encode(" the moon")
    total, truncated = continuation_loglikelihood(model, ctx, cont)
    ids = (ctx + cont)[-(window + 1):]  # the harness's window: the last max_seq_len + 1 tokens
    assert truncated and total == pytest.approx(_manual_sum(model, ids[:-len(cont)], cont), abs=1e-4)
    short_total, short_truncated = continuation_loglikelihood(model, ctx[-5:], cont)
    assert not short_truncated and short_total == pytest.approx(_manual_sum(model, ctx[-5:], cont), abs=1e-4)


@pytest.mark.parametrize("extra", [0, 1, 30])
def test_a_choice_as_long_as_the_window_or_longer_is_scored_in_windows(trained_run, extra):
    model, tok = _model_and_tokenizer(trained_run)
    window = model.config.max_seq_len
    stream = tok.encode("JULIET:\nThe moon remembers a poor soul and calls the stars. " * 40)
    ctx, cont = stream[:1], stream[1:1 + window + extra]
    total, truncated = continuation_loglikelihood(model, ctx, cont)
    if extra == 0:  # the harness's case: one window of max_seq_len + 1 tokens, nothing cut
        assert not truncated and total == pytest.approx(_manual_sum(model, ctx, cont), abs=1e-3)
    else:  # the harness stops here; each window from the end predicts max_seq_len tokens at most
        assert truncated and math.isfinite(total)
        assert total == pytest.approx(_chunked(model, ctx + cont, len(ctx), window), abs=1e-3)


def _chunked(model, ids, first, window) -> float:
    total, end = 0.0, len(ids)
    while end > first:
        start, begin = max(first, end - window), max(0, end - 1 - window)
        logprobs = model(torch.tensor([ids[begin:end - 1]])).logits[0].double().log_softmax(-1)
        total += sum(logprobs[t - 1 - begin, ids[t]].item() for t in range(start, end))
        end = start
    return total


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------


def test_read_multiple_choice_accepts_an_index_or_the_choice_text(tmp_path):
    good = tmp_path / "mc.jsonl"
    good.write_text('{"question": "q", "choices": ["a", "b"], "answer": "b"}\n\n'
                    '{"question": "", "choices": ["a", "b", "c"], "answer": 2}\n')
    assert [r["answer"] for r in read_multiple_choice(good)] == [1, 2]


@pytest.mark.parametrize(("line", "problem"), [
    ('{"question": "q", "choices": ["a", "b"], "answer": 1', "not JSON"),
    ('["q", ["a", "b"], 1]', "a JSON list, not an object"),
    ('{"question": "q", "choices": ["a", "b"]}', "no 'answer'"),
    ('{"choices": ["a", "b"], "answer": 0}', "no 'question'"),
    ('{"question": 3, "choices": ["a", "b"], "answer": 0}', '"question" is a int'),
    ('{"question": "q", "choices": "ab", "answer": 0}', '"choices" must be a list of strings'),
    ('{"question": "q", "choices": ["a", 2], "answer": 0}', '"choices" must be a list of strings'),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "has 1 entry"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', "choice 1 is empty"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "not an index of the 2 choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": -1}', "not an index of the 2 choices"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "neither a choice index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 1.0}', "neither a choice index"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "is not one of the choices"),
])
def test_every_malformed_row_is_named_by_file_and_line(tmp_path, line, problem):
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps({"question": "ok", "choices": ["a", "b"], "answer": 0}) + "\n\n" + line + "\n")
    with pytest.raises(AvaDataError) as err:
        read_multiple_choice(path)
    message = str(err.value)
    assert message.startswith(f"{path}:3: bad multiple-choice row") and problem in message
    assert "\n" not in message


def test_an_unusable_mc_file_is_one_line(tmp_path):
    with pytest.raises(AvaDataError, match="no such file"):
        read_multiple_choice(tmp_path / "missing.jsonl")
    with pytest.raises(AvaDataError, match="is a folder"):
        read_multiple_choice(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(AvaDataError, match="no questions"):
        read_multiple_choice(tmp_path / "empty.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"question": "caf\xe9", "choices": ["a", "b"], "answer": 0}\n')
    with pytest.raises(AvaDataError, match="not UTF-8"):
        read_multiple_choice(tmp_path / "latin1.jsonl")
