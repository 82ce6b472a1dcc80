"""Beam search over one prompt, with the KV cache reordered to follow the surviving beams.

Shape suffixes: see ``Ava/__init__.py``; here B live beams (≤ num_beams: the model's batch
rows), V vocabulary, G key/value heads, L cached positions, A head dim.

Each step scores every (beam, next token) pair by the beam's summed log-probability plus the
token's, keeps the best ``2·num_beams`` candidates, moves candidates that end (EOS, a stop
string) into the finished hypotheses and the best ``num_beams`` others into the next beams, and
gathers the cache rows of their parent beams. A hypothesis is ranked by
``sum log p / length ** length_penalty`` (length = generated tokens, EOS included): > 0 favours
longer outputs, < 0 shorter ones. Search stops when ``num_beams`` hypotheses are finished and
no live beam beats the worst of them at its current length (HF's ``early_stopping=False``
heuristic), or at ``max_new_tokens`` / the context limit, where live beams become hypotheses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .sampling import SamplingParams, process_logits


@dataclass(frozen=True)
class BeamHypothesis:
    """One finished beam.

    Attributes:
        token_ids: the generated ids (EOS not included).
        sum_logprob: summed log-probability of the generated tokens (EOS included when it ended
            the beam), under the processed distribution (penalties applied, no temperature).
        length: tokens scored (generated ids, plus EOS if it ended the beam).
        score: ``sum_logprob / length ** length_penalty``, what hypotheses are ranked by.
        finish_reason: ``eos``, ``stop_string``, ``length`` or ``context``.
    """

    token_ids: list[int]
    sum_logprob: float
    length: int
    score: float
    finish_reason: str


def _reorder_cache(past: list[tuple[torch.Tensor, torch.Tensor]], beam_idx_B: torch.Tensor):
    """Gather the cache rows of each new beam's parent: k, v (B_old, G, L, A) → (B, G, L, A)."""
    return [(k.index_select(0, beam_idx_B), v.index_select(0, beam_idx_B)) for k, v in past]


@torch.no_grad()
def beam_search(
    model: torch.nn.Module,
    prompt_ids: Sequence[int],
    num_beams: int,
    max_new_tokens: int,
    params: SamplingParams,
    length_penalty: float = 1.0,
    use_cache: bool = True,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> list[BeamHypothesis]:
    """Beam search continuation of one prompt.

    Args:
        model: an :class:`~Ava.models.EnhancedMoEModel` (or anything with its forward contract
            and ``config.max_seq_len``), in eval mode.
        prompt_ids: the prompt (non-empty); only its last ``max_seq_len`` ids are used.
        num_beams: beams kept per step (≥ 1; 1 = greedy).
        max_new_tokens: tokens to generate at most.
        params: ``repetition_penalty``, ``no_repeat_ngram_size``, ``eos_id`` and
            ``stop_strings`` are used; temperature and the sampling filters are not (beam
            search is deterministic).
        length_penalty: exponent of the length normalisation.
        use_cache: reuse keys/values (reordered per beam); False recomputes every beam's full
            sequence each step (the reference the cache is tested against).
        decode: ids → text, needed for stop strings.

    Returns:
        The finished hypotheses, best first (at least one).
    """
    if not prompt_ids:
        raise ValueError("prompt_ids must not be empty")
    if num_beams < 1:
        raise ValueError(f"num_beams={num_beams} must be ≥ 1")
    if params.stop_strings and decode is None:
        raise ValueError("stop strings need a decode function (a tokenizer)")
    device = next(model.parameters()).device
    max_len = model.config.max_seq_len
    prompt = list(prompt_ids)[-max_len:]
    beams: list[list[int]] = [[]]  # generated ids per live beam
    scores_B = torch.zeros(1, device=device)  # summed log-probs of the live beams
    hyps: list[BeamHypothesis] = []

    def add_hyp(ids: list[int], logprob: float, length: int, reason: str) -> None:
        hyps.append(BeamHypothesis(ids, logprob, length, logprob / max(length, 1) ** length_penalty, reason))
        hyps.sort(key=lambda h: h.score, reverse=True)
        del hyps[num_beams:]

    past = None
    out = model(torch.tensor([prompt], device=device), use_cache=use_cache)
    for step in range(max_new_tokens):
        logits_BV = out.logits[:, -1].float()
        histories = [prompt + b for b in beams] if params.no_repeat_ngram_size > 0 else None
        seen_BV = None
        if params.repetition_penalty != 1.0:
            seen_BV = torch.zeros_like(logits_BV, dtype=torch.bool)
            for row, beam in enumerate(beams):
                seen_BV[row, prompt + beam] = True
        greedy_params = SamplingParams(
            temperature=0, repetition_penalty=params.repetition_penalty,
            no_repeat_ngram_size=params.no_repeat_ngram_size,
        )
        logprobs_BV = process_logits(logits_BV, greedy_params, histories, seen_BV).log_softmax(dim=-1)
        vocab = logprobs_BV.shape[-1]
        cand_scores, cand_flat = (scores_B[:, None] + logprobs_BV).view(-1).topk(
            min(2 * num_beams, logprobs_BV.numel()))
        next_beams: list[list[int]] = []
        next_scores: list[float] = []
        parents: list[int] = []
        for rank, (score, flat) in enumerate(zip(cand_scores.tolist(), cand_flat.tolist())):
            if score == float("-inf"):
                break
            parent, token = divmod(flat, vocab)
            seq = beams[parent] + [token]
            if params.eos_id is not None and token == params.eos_id:
                if rank < num_beams:  # an EOS far down the list would crowd out better beams
                    add_hyp(beams[parent], score, len(seq), "eos")
                continue
            if params.stop_strings:
                text = decode(seq)
                if any(s in text for s in params.stop_strings):
                    add_hyp(seq, score, len(seq), "stop_string")
                    continue
            next_beams.append(seq)
            next_scores.append(score)
            parents.append(parent)
            if len(next_beams) == num_beams:
                break
        if not next_beams:
            break
        beams, scores_B = next_beams, torch.tensor(next_scores, device=device)
        length = step + 1
        at_context = len(prompt) + length >= max_len
        if length == max_new_tokens or at_context:
            for beam, score in zip(beams, next_scores):
                add_hyp(beam, score, length, "context" if at_context and length < max_new_tokens else "length")
            break
        if len(hyps) == num_beams and max(next_scores) / length ** length_penalty <= hyps[-1].score:
            break
        parent_B = torch.tensor(parents, device=device)
        if use_cache:
            past = _reorder_cache(out.past_key_values, parent_B)
            step_ids_B1 = torch.tensor([[b[-1]] for b in beams], device=device)  # (B, 1)
            out = model(step_ids_B1, past_key_values=past, use_cache=True)
        else:
            out = model(torch.tensor([prompt + b for b in beams], device=device))
    if not hyps:  # max_new_tokens == 0 or every candidate was -inf
        add_hyp([], 0.0, 0, "length")
    return hyps
