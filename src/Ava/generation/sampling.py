"""Logits processors and the next-token choice, batched over rows.

Shape suffixes: see ``Ava/__init__.py``; here B rows (prompts or beams), V vocabulary.

Order per step (the one HF ``generate`` uses): the penalties that look at the history
(repetition penalty, no-repeat n-gram) act on the raw logits; then temperature, top-k, top-p and
min-p reshape the distribution; then greedy argmax (temperature 0) or a draw from a seeded
``torch.Generator``. Every function takes and returns (B, V) fp32 logits and leaves its input
untouched; a removed token gets ``-inf``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token.

    Attributes:
        temperature: 0 = greedy argmax; otherwise logits are divided by it before sampling.
        top_k: keep the k most likely tokens (None = off).
        top_p: nucleus: keep the smallest set of tokens whose probability reaches p (None = off).
        min_p: keep tokens whose probability is ≥ min_p × the most likely token's (None = off).
        repetition_penalty: > 1 makes tokens already in the prompt or output less likely: a
            positive logit is divided by it, a negative one multiplied (CTRL, Keskar 2019).
        no_repeat_ngram_size: n > 0 bans any token that would repeat an n-gram already present.
        stop_strings: generation of a row ends once its new text contains one of these; the text
            is cut before it.
        eos_id: end-of-text id: a row ends when it is generated (not part of the output); None =
            never.
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    stop_strings: tuple[str, ...] = field(default_factory=tuple)
    eos_id: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.temperature < 0:
            problems.append(f"temperature={self.temperature} must be ≥ 0 (0 = greedy)")
        if self.top_k is not None and self.top_k < 1:
            problems.append(f"top_k={self.top_k} must be ≥ 1 (or None)")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            problems.append(f"top_p={self.top_p} must be in (0, 1]")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            problems.append(f"min_p={self.min_p} must be in [0, 1]")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = off)")
        if self.no_repeat_ngram_size < 0:
            problems.append(f"no_repeat_ngram_size={self.no_repeat_ngram_size} must be ≥ 0 (0 = off)")
        if any(not s for s in self.stop_strings):
            problems.append("stop_strings must not contain an empty string")
        if problems:
            raise ValueError("; ".join(problems))


# --------------------------------------------------------------------------------------------
# history penalties (raw logits)
# --------------------------------------------------------------------------------------------


def apply_repetition_penalty(logits_BV: torch.Tensor, seen_BV: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already seen less likely (CTRL): ``l/p`` where ``l > 0``, ``l·p`` otherwise.

    Args:
        logits_BV: (B, V) logits.
        seen_BV: (B, V) bool, True for tokens in the row's prompt or output so far.
        penalty: p > 0; 1 = no change, > 1 discourages repetition.

    Returns:
        (B, V) logits.
    """
    if penalty == 1.0:
        return logits_BV
    penalised_BV = torch.where(logits_BV > 0, logits_BV / penalty, logits_BV * penalty)
    return torch.where(seen_BV, penalised_BV, logits_BV)


def banned_ngram_tokens(history: Sequence[int], n: int) -> set[int]:
    """Tokens that would complete an n-gram already present in ``history``.

    Args:
        history: the row's token ids so far (prompt and output).
        n: n-gram size (≥ 1; n = 1 bans every token seen).

    Returns:
        The banned token ids.
    """
    if n <= 0 or len(history) < n - 1:
        return set()
    if n == 1:
        return set(history)
    prefix = tuple(history[len(history) - (n - 1):])
    return {
        history[i + n - 1]
        for i in range(len(history) - n + 1)
        if tuple(history[i:i + n - 1]) == prefix
    }


def apply_no_repeat_ngram(logits_BV: torch.Tensor, histories: Sequence[Sequence[int]], n: int) -> torch.Tensor:
    """Set to -inf every token that would repeat an n-gram of its row's history.

    Args:
        logits_BV: (B, V) logits.
        histories: B token-id lists (prompt and output so far).
        n: n-gram size; 0 = off.

    Returns:
        (B, V) logits.
    """
    if n <= 0:
        return logits_BV
    out_BV = logits_BV
    for row, history in enumerate(histories):
        banned = banned_ngram_tokens(history, n)
        if banned:
            if out_BV is logits_BV:
                out_BV = logits_BV.clone()
            out_BV[row, list(banned)] = NEG_INF
    return out_BV


# --------------------------------------------------------------------------------------------
# distribution warpers
# --------------------------------------------------------------------------------------------


def apply_top_k(logits_BV: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the k largest logits per row (ties at the k-th value are kept too)."""
    if k is None or k >= logits_BV.shape[-1]:
        return logits_BV
    kth_B1 = torch.topk(logits_BV, k, dim=-1).values[:, -1:]  # (B, 1)
    return logits_BV.masked_fill(logits_BV < kth_B1, NEG_INF)


def apply_top_p(logits_BV: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest prefix of the sorted tokens whose mass reaches p.

    A token is dropped when the mass of the tokens before it already reaches p, so the most
    likely token always stays.
    """
    if p is None or p >= 1.0:
        return logits_BV
    sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
    probs_BV = sorted_BV.softmax(dim=-1)
    drop_sorted_BV = (probs_BV.cumsum(dim=-1) - probs_BV) >= p
    drop_BV = drop_sorted_BV.scatter(-1, order_BV, drop_sorted_BV)
    return logits_BV.masked_fill(drop_BV, NEG_INF)


def apply_min_p(logits_BV: torch.Tensor, min_p: float | None) -> torch.Tensor:
    """Min-p filter (Nguyen et al. 2024): keep tokens with ``prob ≥ min_p · max prob``."""
    if min_p is None or min_p <= 0.0:
        return logits_BV
    probs_BV = logits_BV.softmax(dim=-1)
    threshold_B1 = min_p * probs_BV.max(dim=-1, keepdim=True).values  # (B, 1)
    return logits_BV.masked_fill(probs_BV < threshold_B1, NEG_INF)


def process_logits(
    logits_BV: torch.Tensor,
    params: SamplingParams,
    histories: Sequence[Sequence[int]] | None = None,
    seen_BV: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every processor of ``params`` in order; the result is what is sampled from.

    Args:
        logits_BV: (B, V) logits of the next position.
        params: sampling settings.
        histories: B token-id lists (prompt + output), for the n-gram ban.
        seen_BV: (B, V) bool of tokens seen, for the repetition penalty.

    Returns:
        (B, V) fp32 logits; temperature is applied unless it is 0 (greedy).
    """
    logits_BV = logits_BV.float()
    if seen_BV is not None:
        logits_BV = apply_repetition_penalty(logits_BV, seen_BV, params.repetition_penalty)
    if histories is not None:
        logits_BV = apply_no_repeat_ngram(logits_BV, histories, params.no_repeat_ngram_size)
    if params.temperature == 0:
        return logits_BV
    logits_BV = logits_BV / params.temperature
    logits_BV = apply_top_k(logits_BV, params.top_k)
    logits_BV = apply_top_p(logits_BV, params.top_p)
    return apply_min_p(logits_BV, params.min_p)


def choose_tokens(
    logits_BV: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Argmax (temperature 0) or one draw per row from ``softmax(logits)``.

    Args:
        logits_BV: (B, V) processed logits.
        temperature: only its being 0 matters here (already applied by :func:`process_logits`).
        generator: the seeded generator draws come from.

    Returns:
        (B,) long token ids.
    """
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    probs_BV = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None = None,
    min_p: float | None = None,
) -> int:
    """One token from 1-D ``logits`` (V,) with temperature, top-k, top-p and min-p filtering.

    Args:
        logits: (V,) logits.
        temperature: 0 = greedy.
        top_k / top_p / min_p: filters, None = off.
        generator: seeded generator for the draw.

    Returns:
        The token id.
    """
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    logits_1V = process_logits(logits.reshape(1, -1), params)
    return int(choose_tokens(logits_1V, temperature, generator)[0])
