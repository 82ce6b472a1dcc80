"""Autoregressive text generation: batched, streamed, sampled or beam-searched, with a KV cache.

Shape suffixes: see ``Ava/__init__.py``; here B prompts (rows), T positions, V vocabulary.

Batched prompts are left-padded to one length; the padding is masked out (``attention_mask``)
and every row gets its own positions (``cumsum(mask) - 1``), so a row's tokens are the same
as when it is generated alone. With the KV cache each new token costs one position of compute;
without it the whole (windowed) prefix is recomputed, which the tests use as the reference.
Sampling options and their order are in :mod:`.sampling`; beam search is in :mod:`.beam`;
stop strings and incremental decoding in :mod:`.streaming`; greedy decoding drafted by the
model's MTP heads (``speculative=True``) in :mod:`.speculative`; one prompt's state and result in
:mod:`.rows`.

A model with cross-attention blocks (``model.cross_attention``) takes a ``context`` (B, S, C) and
``context_mask`` (B, S), one row per prompt: sampling and greedy decoding pass them to the model
at the prefill and at every decoding step (e.g. a replay memory's items,
:class:`~Ava.memory.MemoryContext`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from ..data import AvaTokenizer
from ..errors import AvaCheckpointError
from ..models import EnhancedMoEModel
from ..utils.checkpoint import TOKENIZER_FILE, resolve_checkpoint
from .beam import BeamHypothesis, beam_search
from .rows import GenerationOutput, GenerationRow
from .sampling import SamplingParams, choose_tokens, process_logits, sample_next_token
from .speculative import SpeculativeStats, check_speculative, speculative_decode
from .streaming import TextTracker

logger = logging.getLogger(__name__)

__all__ = ["GenerationOutput", "SpeculativeStats", "TextGenerator", "sample_next_token"]


class TextGenerator:
    """Generate text from a model and its tokenizer.

    Args:
        model: a trained :class:`EnhancedMoEModel`.
        tokenizer: the tokenizer it was trained with (None: only the id-level methods work).
        device: where to run (default: the model's device).

    Attributes:
        speculative_stats: counters of the latest call with ``speculative=True`` that decoded
            speculatively (:class:`~Ava.generation.speculative.SpeculativeStats`: accepted
            drafts per step, acceptance rate, main forwards); None before one, and after a
            ``speculative=True`` call that decoded plainly (temperature > 0).
    """

    def __init__(
        self, model: EnhancedMoEModel, tokenizer: AvaTokenizer | None, device: torch.device | None = None
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device
        self.speculative_stats: SpeculativeStats | None = None

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        verify: bool = True) -> "TextGenerator":
        """Load model and tokenizer from a run folder or a checkpoint folder.

        ``verify``: check them against the checkpoint's manifest (see
        :meth:`EnhancedMoEModel.from_pretrained`); False skips it with a warning.
        """
        checkpoint = resolve_checkpoint(path)
        tokenizer_file = checkpoint / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise AvaCheckpointError(f"{tokenizer_file} is missing; the checkpoint has no tokenizer")
        model = EnhancedMoEModel.from_pretrained(checkpoint, verify=verify).to(device)
        return cls(model, AvaTokenizer.from_file(tokenizer_file), torch.device(device))

    # -- text API ----------------------------------------------------------------------------

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        stop_at_eos: bool = True,
        *,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        stop_strings: Sequence[str] = (),
        num_beams: int = 1,
        length_penalty: float = 1.0,
        on_text: Callable[[str], None] | None = None,
        speculative: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> str:
        """Continue ``prompt``; returns the prompt followed by the generated text.

        Args:
            prompt: the text to continue (empty = start from the end-of-text token).
            max_new_tokens: tokens to generate at most.
            temperature / top_k / top_p / min_p / repetition_penalty / no_repeat_ngram_size /
                stop_strings: see :class:`~Ava.generation.sampling.SamplingParams`.
            seed: seed of the sampling generator (None = a fresh random seed).
            use_cache: reuse keys/values of earlier positions.
            stop_at_eos: end when the end-of-text token is generated.
            num_beams: > 1 = beam search (deterministic; the sampling filters are ignored).
            length_penalty: beam search length normalisation exponent.
            on_text: called with each stable piece of new text as it is generated (streaming).
            speculative: greedy decoding drafted by the model's MTP heads and verified by the
                model (:mod:`Ava.generation.speculative`): the same output as plain greedy in
                fewer forward passes. Needs MTP heads and the cache; with temperature > 0 it
                decodes plainly. Statistics land in :attr:`speculative_stats`.
            context: (1, S, C) vectors for the model's cross-attention blocks, passed at every
                decoding step; None = none. Not with beam search or ``speculative``.
            context_mask: (1, S) 1 = a real context vector; None = all.

        Returns:
            ``prompt + generated text``.

        Raises:
            AvaConfigError: ``speculative`` on a model without MTP heads, without the cache or
                with beam search.
            ValueError: ``context`` with beam search or ``speculative``.
        """
        params = self.sampling_params(temperature, top_k, top_p, min_p, repetition_penalty, no_repeat_ngram_size,
                              stop_strings, stop_at_eos)
        if speculative:
            check_speculative(self.model, use_cache, num_beams)
        if num_beams > 1:
            _check_context_decoding(context, "beam search (num_beams > 1)")
            text = self.beam_search(prompt, num_beams, max_new_tokens, params, length_penalty, use_cache).text
            if on_text is not None and text:
                on_text(text)
            return prompt + text
        pieces = self.stream(prompt, max_new_tokens, params=params, seed=seed, use_cache=use_cache,
                             speculative=speculative, context=context, context_mask=context_mask)
        text = ""
        for piece in pieces:
            text += piece
            if on_text is not None:
                on_text(piece)
        return prompt + text

    def stream(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        params: SamplingParams | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        speculative: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> Iterator[str]:
        """Yield the continuation of ``prompt`` in text pieces as tokens arrive.

        A piece never ends inside a multi-byte character or inside a possible stop string, so
        ``"".join(stream(...))`` is exactly :meth:`generate_batch`'s text.

        Args:
            prompt: the text to continue.
            max_new_tokens: tokens to generate at most.
            params: sampling settings (default: temperature 1, stop at EOS).
            seed: sampling seed.
            use_cache: reuse keys/values.
            speculative: MTP speculative decoding (see :meth:`generate`).
            context / context_mask: (1, S, C) / (1, S) cross-attention context (see :meth:`generate`).

        Yields:
            Non-empty text pieces.
        """
        params = params or self.sampling_params(stop_at_eos=True)
        row = self._row(prompt, params)
        for pieces in self._decode_rows([row], max_new_tokens, params, self._generator(seed), use_cache, speculative,
                                        context, context_mask):
            if pieces[0]:
                yield pieces[0]
        tail = row.tracker.finish()
        if tail:
            yield tail

    def generate_batch(
        self,
        prompts: Sequence[str],
        max_new_tokens: int = 64,
        params: SamplingParams | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        speculative: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> list[GenerationOutput]:
        """Continue several prompts at once (left-padded into one batch).

        Args:
            prompts: the texts to continue.
            max_new_tokens: tokens to generate at most per prompt.
            params: sampling settings (default: temperature 1, stop at EOS).
            seed: sampling seed (one generator for the batch).
            use_cache: reuse keys/values.
            speculative: MTP speculative decoding (see :meth:`generate`); the prompts are then
                decoded one after another (batch size 1), with the same output.
            context / context_mask: (B, S, C) / (B, S) cross-attention context, row b for prompt
                b (see :meth:`generate`).

        Returns:
            One :class:`GenerationOutput` per prompt, in order.
        """
        params = params or self.sampling_params(stop_at_eos=True)
        rows = [self._row(p, params) for p in prompts]
        for _ in self._decode_rows(rows, max_new_tokens, params, self._generator(seed), use_cache, speculative,
                                   context, context_mask):
            pass
        for row in rows:
            row.tracker.finish()
        return [row.output() for row in rows]

    def beam_search(
        self,
        prompt: str,
        num_beams: int = 4,
        max_new_tokens: int = 64,
        params: SamplingParams | None = None,
        length_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> GenerationOutput:
        """Beam search continuation of ``prompt`` (see :mod:`Ava.generation.beam`).

        Returns:
            The best hypothesis as a :class:`GenerationOutput` (text cut before a stop string).
        """
        params = params or self.sampling_params(stop_at_eos=True)
        best = self.beam_search_ids(self._encode(prompt), num_beams, max_new_tokens, params, length_penalty,
                                    use_cache)[0]
        tracker = TextTracker(self._decode, params.stop_strings)
        for token in best.token_ids:
            tracker.add(token)
        return GenerationOutput(tracker.text, best.token_ids, best.finish_reason)

    # -- id API ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate_ids(
        self,
        prompt_ids: list[int],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        eos_id: int | None = None,
        speculative: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        **options,
    ) -> list[int]:
        """Generate up to ``max_new_tokens`` token ids after ``prompt_ids``.

        Args:
            prompt_ids: the prompt's token ids (non-empty).
            max_new_tokens: tokens to generate at most; the context is capped at the model's
                ``max_seq_len`` (older tokens slide out when the cache is off; with the cache,
                generation stops there).
            temperature: 0 = greedy; otherwise logits are divided by it before sampling.
            top_k: keep the k most likely tokens.
            top_p: keep the smallest set of tokens whose probability mass reaches p.
            seed: seed of the sampling generator (reproducible output).
            use_cache: reuse keys/values of earlier positions.
            eos_id: stop when this token is generated (it is not returned).
            speculative: MTP speculative decoding (see :meth:`generate`).
            context / context_mask: (1, S, C) / (1, S) cross-attention context (see :meth:`generate`).
            **options: further :class:`SamplingParams` fields (``min_p``, ``repetition_penalty``,
                ``no_repeat_ngram_size``).

        Returns:
            The generated ids (without the prompt).
        """
        return self.generate_ids_batch([prompt_ids], max_new_tokens, SamplingParams(
            temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id, **options,
        ), seed=seed, use_cache=use_cache, speculative=speculative, context=context, context_mask=context_mask)[0]

    @torch.no_grad()
    def generate_ids_batch(
        self,
        prompts_ids: Sequence[Sequence[int]],
        max_new_tokens: int,
        params: SamplingParams,
        seed: int | None = None,
        use_cache: bool = True,
        speculative: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> list[list[int]]:
        """Id-level batched generation (no tokenizer needed unless ``params.stop_strings``).

        Args:
            prompts_ids: B non-empty prompts.
            max_new_tokens: tokens to generate at most per prompt.
            params: sampling settings.
            seed: sampling seed.
            use_cache: reuse keys/values.
            speculative: MTP speculative decoding (see :meth:`generate_batch`).
            context / context_mask: (B, S, C) / (B, S) cross-attention context (see :meth:`generate`).

        Returns:
            B lists of generated ids.
        """
        rows = [GenerationRow(list(p), self._tracker(params)) for p in prompts_ids]
        if any(not row.prompt for row in rows):
            raise ValueError("prompt_ids must not be empty")
        for _ in self._decode_rows(rows, max_new_tokens, params, self._generator(seed), use_cache, speculative,
                                   context, context_mask):
            pass
        return [row.new for row in rows]

    @torch.no_grad()
    def beam_search_ids(
        self,
        prompt_ids: Sequence[int],
        num_beams: int,
        max_new_tokens: int,
        params: SamplingParams,
        length_penalty: float = 1.0,
        use_cache: bool = True,
    ) -> list[BeamHypothesis]:
        """Id-level beam search; returns the finished hypotheses, best first."""
        with self._inference_scope():
            decode = self._decode if self.tokenizer is not None else None
            return beam_search(self.model, prompt_ids, num_beams, max_new_tokens, params, length_penalty,
                               use_cache, decode)

    @torch.no_grad()
    def sequence_logprob(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> float:
        """Summed log-probability of ``continuation_ids`` after ``prompt_ids`` under the model."""
        ids = list(prompt_ids) + list(continuation_ids)
        logits_TV = self.model(torch.tensor([ids], device=self.device)).logits[0].float()
        logprobs_TV = logits_TV.log_softmax(dim=-1)
        start = len(prompt_ids)
        return float(sum(logprobs_TV[start - 1 + i, t] for i, t in enumerate(continuation_ids)))

    # -- the decoding loop -------------------------------------------------------------------

    def _decode_rows(
        self,
        rows: list[GenerationRow],
        max_new_tokens: int,
        params: SamplingParams,
        generator: torch.Generator,
        use_cache: bool,
        speculative: bool = False,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> Iterator[list[str]]:
        """Generate for every row until all are finished; yields each step's text pieces."""
        if speculative:
            _check_context_decoding(context, "speculative decoding")
            check_speculative(self.model, use_cache)
            if params.temperature != 0:
                logger.info("speculative decoding is greedy only; temperature %s decodes plainly", params.temperature)
                self.speculative_stats = None
                speculative = False
        with self._inference_scope():
            # no_grad is entered per step inside the loop, never across a yield: grad mode is
            # thread state and would otherwise leak into the caller between stream pieces.
            if speculative:
                yield from self._speculative_rows(rows, max_new_tokens, params)
            else:
                yield from self._decode_loop(rows, max_new_tokens, params, generator, use_cache,
                                             _context_inputs(context, context_mask, len(rows), self.device))

    @contextlib.contextmanager
    def _inference_scope(self) -> Iterator[None]:
        """Eval mode and :meth:`~Ava.models.EnhancedMoEModel.decoding` (frozen-weight fast
        paths) for the duration; the training mode is restored after."""
        was_training = self.model.training
        self.model.eval()
        try:
            with self.model.decoding():
                yield
        finally:
            self.model.train(was_training)

    def _speculative_rows(
        self, rows: list[GenerationRow], max_new_tokens: int, params: SamplingParams
    ) -> Iterator[list[str]]:
        """MTP speculative greedy decoding, one row after another (batch size 1)."""
        stats = SpeculativeStats()
        self.speculative_stats = stats
        for b, row in enumerate(rows):
            for piece in speculative_decode(self.model, row, max_new_tokens, params, stats, self.device):
                pieces = [""] * len(rows)
                pieces[b] = piece
                yield pieces
        logger.info("speculative decoding: %s", stats.summary())

    def _decode_loop(
        self,
        rows: list[GenerationRow],
        max_new_tokens: int,
        params: SamplingParams,
        generator: torch.Generator,
        use_cache: bool,
        context: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[list[str]]:
        B = len(rows)
        max_len = self.model.config.max_seq_len
        pad = self.tokenizer.pad_id if self.tokenizer is not None else 0
        prompts = [row.prompt[-max_len:] for row in rows]
        width = max(len(p) for p in prompts)
        ids_BT = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.device)
        mask_BT = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device)
        lengths = [len(p) for p in prompts]  # real tokens per row
        seen_BV = None
        if params.repetition_penalty != 1.0:
            seen_BV = torch.zeros(B, self.model.config.vocab_size, dtype=torch.bool, device=self.device)
            for b, p in enumerate(prompts):
                seen_BV[b, p] = True
        past = None
        if max_new_tokens <= 0:
            for row in rows:
                row.finish_reason = "length"
            return
        for _ in range(max_new_tokens):
            with torch.no_grad():
                logits_BV, past = self._next_logits(ids_BT, mask_BT, lengths, past, use_cache, context)
                histories = [row.prompt + row.new for row in rows] if params.no_repeat_ngram_size > 0 else None
                logits_BV = process_logits(logits_BV, params, histories, seen_BV)
                tokens = choose_tokens(logits_BV, params.temperature, generator).tolist()
            pieces = [""] * B
            step_mask = []
            for b, row in enumerate(rows):
                if row.finish_reason is not None:
                    tokens[b] = pad
                    step_mask.append(0)
                    continue
                token = tokens[b]
                piece = row.take(token, params.eos_id, max_new_tokens, use_cache and lengths[b] + 1 >= max_len)
                if piece is None:  # EOS
                    step_mask.append(0)
                    continue
                pieces[b] = piece
                lengths[b] += 1
                step_mask.append(1)
                if seen_BV is not None:
                    seen_BV[b, token] = True
            ids_BT = torch.cat([ids_BT, ids_BT.new_tensor(tokens)[:, None]], dim=1)
            mask_BT = torch.cat([mask_BT, mask_BT.new_tensor(step_mask)[:, None]], dim=1)
            yield pieces
            if all(row.finish_reason is not None for row in rows):
                break

    def _next_logits(
        self,
        ids_BT: torch.Tensor,
        mask_BT: torch.Tensor,
        lengths: list[int],
        past: list | None,
        use_cache: bool,
        context: dict[str, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, list | None]:
        """(B, V) logits of every row's next token, and the updated cache.

        Args:
            ids_BT: (B, T) left-padded ids so far; mask_BT: (B, T) 1 = real token.
            lengths: real tokens per row (the last one sits at position ``length - 1``).
            past: the cache of ``ids_BT[:, :-1]``, or None before the first step.
            use_cache: False = recompute the last ``max_seq_len`` positions.
            context: ``context`` / ``context_mask`` keyword arguments of every forward, or None.
        """
        context = context or {}
        max_len = self.model.config.max_seq_len
        padded = bool((mask_BT == 0).any())
        if not use_cache:
            window_ids_BT, window_mask_BT = ids_BT[:, -max_len:], mask_BT[:, -max_len:]
            positions_BT = (window_mask_BT.cumsum(-1) - 1).clamp(min=0)
            out = self.model(window_ids_BT, attention_mask=window_mask_BT if padded else None,
                             position_ids=positions_BT, **context)
            return out.logits[:, -1], None
        if past is None:
            step_ids_BT, positions_BT = ids_BT, (mask_BT.cumsum(-1) - 1).clamp(min=0)
        else:
            step_ids_BT = ids_BT[:, -1:]  # (B, 1)
            positions_BT = torch.tensor([[n - 1] for n in lengths], device=self.device)  # (B, 1)
        out = self.model(step_ids_BT, attention_mask=mask_BT if padded else None, position_ids=positions_BT,
                         past_key_values=past, use_cache=True, **context)
        return out.logits[:, -1], out.past_key_values

    # -- helpers -----------------------------------------------------------------------------

    def sampling_params(
        self,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        no_repeat_ngram_size: int = 0,
        stop_strings: Sequence[str] = (),
        stop_at_eos: bool = True,
    ) -> SamplingParams:
        """:class:`SamplingParams` with this tokenizer's EOS id."""
        eos = self.tokenizer.eos_id if stop_at_eos and self.tokenizer is not None else None
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                              stop_strings=tuple(stop_strings), eos_id=eos)

    def _generator(self, seed: int | None) -> torch.Generator:
        generator = torch.Generator(device=self.device)
        if seed is None:
            generator.seed()  # a fresh nondeterministic seed
        else:
            generator.manual_seed(seed)
        return generator

    def encode(self, prompt: str) -> list[int]:
        """The token ids a text prompt is decoded from (the end-of-text token for an empty one)."""
        return self._encode(prompt)

    def _encode(self, prompt: str) -> list[int]:
        ids = self._require_tokenizer().encode(prompt)
        return ids or [self.tokenizer.eos_id]  # an empty prompt starts from the document separator

    def _decode(self, ids: Sequence[int]) -> str:
        return self._require_tokenizer().decode(ids, skip_special_tokens=True)

    def _tracker(self, params: SamplingParams) -> TextTracker | None:
        if self.tokenizer is None:
            if params.stop_strings:
                raise ValueError("stop strings need a tokenizer: build TextGenerator with one")
            return None
        return TextTracker(self._decode, params.stop_strings)

    def _row(self, prompt: str, params: SamplingParams) -> GenerationRow:
        return GenerationRow(self._encode(prompt), self._tracker(params))

    def _require_tokenizer(self) -> AvaTokenizer:
        if self.tokenizer is None:
            raise ValueError("this TextGenerator has no tokenizer; use the *_ids methods or pass one")
        return self.tokenizer


def _check_context_decoding(context: torch.Tensor | None, mode: str) -> None:
    """Refuse a cross-attention context for a decoding mode that does not pass one.

    Raises:
        ValueError: ``context`` is given.
    """
    if context is not None:
        raise ValueError(f"a cross-attention context is passed by sampling and greedy decoding, not by {mode}; "
                         "drop the context or use plain decoding")


def _context_inputs(context: torch.Tensor | None, context_mask: torch.Tensor | None, batch_size: int,
                    device: torch.device) -> dict[str, torch.Tensor] | None:
    """``{context, context_mask}`` on ``device`` for every forward of a B-row decoding, or None.

    Raises:
        ValueError: a context of another batch size, or a mask without a context.
    """
    if context is None:
        if context_mask is not None:
            raise ValueError("context_mask given without context; pass context too, or neither")
        return None
    if context.dim() != 3 or context.shape[0] != batch_size:
        raise ValueError(f"context has shape {tuple(context.shape)}, expected ({batch_size}, S, C): one row per prompt")
    inputs = {"context": context.to(device)}
    if context_mask is not None:
        inputs["context_mask"] = context_mask.to(device)
    return inputs
