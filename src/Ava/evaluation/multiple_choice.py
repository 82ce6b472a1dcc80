"""Multiple-choice scoring with the metrics of EleutherAI's lm-evaluation-harness.

Legend: T positions, V vocabulary.

Each row of a ``{question, choices, answer}`` JSONL is one question. Choice i is scored by the
log-likelihood of its continuation after the question, as the harness scores a
``multiple_choice`` task whose ``doc_to_text`` is the question, ``doc_to_choice`` the choices and
``target_delimiter`` the default single space:

- the continuation is ``" " + choice``, except that no space is added when the question is empty,
  ends in whitespace, or the choice starts with whitespace;
- trailing whitespace of the question then moves into the continuation (the harness's
  ``_encode_pair``): question ``"Q: x? A: "`` with choice ``"y"`` is scored as context
  ``"Q: x? A:"`` and continuation ``" y"``, so the space joins the choice's first token as the
  tokenizer saw it in training;
- context + continuation are encoded together and the continuation's tokens are those after the
  context's own encoding (an empty context is the end-of-text token);
- the log-likelihood is the sum of the continuation tokens' log-probabilities.

Three accuracies are reported, each the share of questions whose best-scoring choice is the
answer (ties go to the first choice, as ``numpy.argmax``):

- ``acc``: the summed log-likelihood (the harness's ``acc``);
- ``acc_norm``: the sum divided by the number of characters of the choice string (``len(choice)``,
  the harness's ``acc_norm``);
- ``acc_per_token``: the sum divided by the number of continuation tokens (the mean log-likelihood
  per token; no harness reports it).

Context + continuation longer than the model's window (``max_seq_len`` tokens of input, so
``max_seq_len + 1`` tokens in all) lose their first tokens, the context's first, as in the
harness. A continuation longer than the window is scored in consecutive windows (each token still
predicted after ``max_seq_len`` tokens at most), where the harness stops with an assertion. The
report counts the choices scored with a cut context.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data.records import plural
from ..errors import AvaDataError
from ..utils.input_files import read_input_text

if TYPE_CHECKING:
    from ..data import AvaTokenizer
    from ..models import EnhancedMoEModel

METRICS = ("acc", "acc_norm", "acc_per_token")
"""The accuracies of :func:`score_multiple_choice`, named as in the report and the CLI output."""

_ROW_FORMAT = '{"question": str, "choices": [str, str, ...], "answer": index or choice text}'


# --------------------------------------------------------------------------------------------
# the file
# --------------------------------------------------------------------------------------------


def read_multiple_choice(path: str | Path) -> list[dict[str, Any]]:
    """Read and check every row of a ``{question, choices, answer}`` JSONL (blank lines skipped).

    ``question`` is a string, ``choices`` a list of at least two non-empty strings, ``answer`` the
    index of the right choice (an integer) or its text.

    Args:
        path: the JSONL file.

    Returns:
        One ``{question, choices, answer}`` dict per row, ``answer`` as an index.

    Raises:
        AvaDataError: a missing or unreadable file, no rows, or a malformed row (naming the file,
            the line and what is wrong with it).
    """
    path = Path(path)
    text = read_input_text(path, "--mc", f"a JSONL file with one {_ROW_FORMAT} per line", "UTF-8 JSONL")
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            rows.append(_parse_row(line, f"{path}:{n}"))
    if not rows:
        raise AvaDataError(f"--mc {path}: no questions in it; give one {_ROW_FORMAT} per line")
    return rows


def _parse_row(line: str, where: str) -> dict[str, Any]:
    """One checked row; ``where`` (``file:line``) starts every error message."""
    def bad(problem: str) -> AvaDataError:
        return AvaDataError(f"{where}: bad multiple-choice row: {problem}; each line needs {_ROW_FORMAT}")

    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise bad(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise bad(f"a JSON {type(row).__name__}, not an object")
    missing = [key for key in ("question", "choices", "answer") if key not in row]
    if missing:
        raise bad(f"no {', '.join(repr(k) for k in missing)}")
    question, choices, answer = row["question"], row["choices"], row["answer"]
    if not isinstance(question, str):
        raise bad(f'"question" is a {type(question).__name__}, not a string')
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise bad('"choices" must be a list of strings')
    if len(choices) < 2:
        raise bad(f'"choices" has {plural(len(choices), "entry", "entries")}; give at least 2')
    empty = [i for i, c in enumerate(choices) if not c]
    if empty:
        raise bad(f"choice {empty[0]} is empty (it has no characters to score or to normalise by)")
    if isinstance(answer, str):
        if answer not in choices:
            raise bad(f'"answer" {answer!r} is not one of the choices')
        index = choices.index(answer)
    elif isinstance(answer, int) and not isinstance(answer, bool):
        if not 0 <= answer < len(choices):
            raise bad(f'"answer" {answer} is not an index of the {len(choices)} choices (0 to {len(choices) - 1})')
        index = answer
    else:
        raise bad(f'"answer" {answer!r} is neither a choice index (integer) nor a choice\'s text')
    return {"question": question, "choices": list(choices), "answer": index}


# --------------------------------------------------------------------------------------------
# scoring one question
# --------------------------------------------------------------------------------------------


def split_context(question: str, choice: str) -> tuple[str, str]:
    """The (context, continuation) strings the harness scores for ``choice`` after ``question``.

    The continuation is ``" " + choice`` unless the question is empty, ends in whitespace or the
    choice starts with whitespace; the question's trailing whitespace then moves to the
    continuation: ``("Q: x? A: ", "y")`` → ``("Q: x? A:", " y")``, ``("Q: x?", "y")`` →
    ``("Q: x?", " y")``.
    """
    joined = choice if (not question or question[-1].isspace() or choice[:1].isspace()) else " " + choice
    context = question.rstrip()
    return context, question[len(context):] + joined


def encode_pair(tokenizer: AvaTokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as the harness makes them for a causal model.

    The whole string is encoded and the continuation's ids are those after the context's own
    encoding, so a merge across the boundary is seen as in ``context + continuation``. An empty
    context is the end-of-text token (the continuation is then encoded alone).
    """
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(continuation)
    context_ids = tokenizer.encode(context)
    continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    if not continuation_ids:  # the boundary merged away every continuation token: score it alone
        continuation_ids = tokenizer.encode(continuation)
    return context_ids, continuation_ids


@dataclass(frozen=True)
class ChoiceScore:
    """The log-likelihood of one choice's continuation.

    Attributes:
        loglikelihood: sum of the continuation tokens' log-probabilities (nats).
        tokens: continuation tokens.
        chars: characters of the choice string (``len(choice)``, the harness's ``acc_norm`` divisor).
        truncated: the model saw the context cut from the left (it did not fit the window).
    """

    loglikelihood: float
    tokens: int
    chars: int
    truncated: bool

    def value(self, metric: str) -> float:
        """The score ``metric`` (one of :data:`METRICS`) ranks choices by."""
        if metric == "acc":
            return self.loglikelihood
        if metric == "acc_norm":
            return self.loglikelihood / self.chars
        if metric == "acc_per_token":
            return self.loglikelihood / self.tokens
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(METRICS)}")


@torch.no_grad()
def continuation_loglikelihood(
    model: EnhancedMoEModel, context_ids: Sequence[int], continuation_ids: Sequence[int],
) -> tuple[float, bool]:
    """Summed log-probability of ``continuation_ids`` after ``context_ids``.

    The input is the last ``max_seq_len + 1`` tokens of context + continuation without the last
    one (the harness's window). A continuation longer than ``max_seq_len`` is scored from the end
    in consecutive windows of ``max_seq_len`` predicted tokens, each after as many preceding tokens
    as fit.

    Args:
        model: the model (eval mode; its device is used).
        context_ids: the context's ids (at least one).
        continuation_ids: the ids to score (at least one).

    Returns:
        The sum (nats) and whether some predicted token saw a context cut from the left.
    """
    device = next(model.parameters()).device
    window = model.config.max_seq_len
    ids = list(context_ids) + list(continuation_ids)
    first = len(context_ids)  # position of the first continuation token
    total, truncated, end = 0.0, False, len(ids)
    while end > first:
        start = max(first, end - window)  # targets ids[start:end]
        begin = max(0, end - 1 - window)  # input ids[begin:end - 1], ≤ window tokens
        truncated = truncated or begin > 0
        logprobs_TV = model(torch.tensor([ids[begin:end - 1]], device=device)).logits[0].float().log_softmax(dim=-1)
        targets = torch.tensor(ids[start:end], device=device)
        rows = torch.arange(start - 1 - begin, end - 1 - begin, device=device)
        total += float(logprobs_TV[rows, targets].sum())
        end = start
    return total, truncated


def choice_loglikelihoods(
    model: EnhancedMoEModel, tokenizer: AvaTokenizer, question: str, choices: Sequence[str],
) -> list[ChoiceScore]:
    """The :class:`ChoiceScore` of each choice after ``question`` (see the module docstring).

    Args:
        model: the model (eval mode).
        tokenizer: its tokenizer.
        question: the context.
        choices: the candidate answers (non-empty strings).

    Returns:
        One score per choice, in order.
    """
    scores = []
    for choice in choices:
        context_ids, continuation_ids = encode_pair(tokenizer, *split_context(question, choice))
        loglikelihood, truncated = continuation_loglikelihood(model, context_ids, continuation_ids)
        scores.append(ChoiceScore(loglikelihood, len(continuation_ids), len(choice), truncated))
    return scores


def predictions(scores: Sequence[ChoiceScore]) -> dict[str, int]:
    """The predicted choice per metric: the index of the best score, the first one on a tie."""
    return {metric: max(range(len(scores)), key=lambda i: (scores[i].value(metric), -i)) for metric in METRICS}


# --------------------------------------------------------------------------------------------
# a whole file
# --------------------------------------------------------------------------------------------


LoglikelihoodFn = Callable[[str, Sequence[str]], list[ChoiceScore]]
"""``(question, choices) -> scores``: how :func:`score_multiple_choice` scores one question."""


def score_multiple_choice(
    model: EnhancedMoEModel, tokenizer: AvaTokenizer, rows: Sequence[dict[str, Any]],
    on_question: Callable[[], None] | None = None, score_fn: LoglikelihoodFn | None = None,
) -> dict[str, Any]:
    """``acc``, ``acc_norm`` and ``acc_per_token`` over ``rows`` (from :func:`read_multiple_choice`).

    Args:
        model: the model (eval mode).
        tokenizer: its tokenizer.
        rows: the questions.
        on_question: called after each question (a progress bar's update).
        score_fn: scores one question; None = :func:`choice_loglikelihoods` with ``model``.

    Returns:
        Per metric its accuracy, ``<metric>_stderr`` (the standard error of the mean, as the
        harness computes it; None for one question) and ``correct``; ``questions``;
        ``truncated_choices`` (choices scored after a context cut from the left; see the module
        docstring); ``max_seq_len``; and ``items``: per question the text, the answer, the
        prediction per metric and per choice its log-likelihood, tokens and characters.
    """
    if score_fn is None:
        def score_fn(question: str, choices: Sequence[str]) -> list[ChoiceScore]:
            return choice_loglikelihoods(model, tokenizer, question, choices)

    items, hits = [], {metric: [] for metric in METRICS}
    truncated = 0
    for row in rows:
        scores = score_fn(row["question"], row["choices"])
        picked = predictions(scores)
        for metric in METRICS:
            hits[metric].append(float(picked[metric] == row["answer"]))
        truncated += sum(s.truncated for s in scores)
        items.append({
            "question": row["question"], "answer": row["answer"], "predicted": picked,
            "loglikelihoods": [round(s.loglikelihood, 6) for s in scores],
            "tokens": [s.tokens for s in scores], "chars": [s.chars for s in scores],
            **({"truncated": [s.truncated for s in scores]} if any(s.truncated for s in scores) else {}),
        })
        if on_question is not None:
            on_question()
    result: dict[str, Any] = {}
    for metric in METRICS:
        result[metric] = sum(hits[metric]) / len(hits[metric])
        result[f"{metric}_stderr"] = _stderr(hits[metric])
    result["correct"] = {metric: int(sum(hits[metric])) for metric in METRICS}
    result["questions"] = len(items)
    result["truncated_choices"] = truncated
    result["max_seq_len"] = model.config.max_seq_len
    result["items"] = items
    return result


def _stderr(values: Sequence[float]) -> float | None:
    """Standard error of the mean with the sample standard deviation (the harness's ``mean_stderr``)."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)
