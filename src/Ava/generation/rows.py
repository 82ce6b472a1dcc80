"""One prompt's generation: its running state (:class:`GenerationRow`) and its result
(:class:`GenerationOutput`).

Every decoding loop (the plain one of :class:`~Ava.generation.TextGenerator` and
:func:`~Ava.generation.speculative.speculative_decode`) takes tokens through
:meth:`GenerationRow.take`, so they finish rows by the same rules (EOS, stop string,
``max_new_tokens``, context).
"""

from __future__ import annotations

from dataclasses import dataclass

from .streaming import TextTracker


@dataclass(frozen=True)
class GenerationOutput:
    """One prompt's continuation.

    Attributes:
        text: the generated text (without the prompt; cut before a stop string).
        token_ids: the generated ids (EOS not included; with a stop string, up to and including
            the token that completed it).
        finish_reason: ``eos``, ``stop_string``, ``length`` (max_new_tokens reached) or
            ``context`` (the model's ``max_seq_len`` reached).
    """

    text: str
    token_ids: list[int]
    finish_reason: str


class GenerationRow:
    """Generation state of one prompt: its ids, the tokens taken so far and why it ended.

    Args:
        prompt: the prompt ids.
        tracker: stable text and stop strings (None: ids only, no text).
    """

    def __init__(self, prompt: list[int], tracker: TextTracker | None) -> None:
        self.prompt = prompt
        self.new: list[int] = []
        self.tracker = tracker
        self.finish_reason: str | None = None

    def output(self) -> GenerationOutput:
        text = self.tracker.text if self.tracker is not None else ""
        return GenerationOutput(text, list(self.new), self.finish_reason or "length")

    def take(self, token: int, eos_id: int | None, max_new_tokens: int, fills_context: bool) -> str | None:
        """Add one chosen token and set ``finish_reason`` when it ends the row.

        Args:
            token: the chosen id.
            eos_id: the end-of-text id (None = never stop on one).
            max_new_tokens: the row ends once it has this many new tokens.
            fills_context: adding the token fills the model's context (cached decoding).

        Returns:
            The token's stable text piece ("" without a tracker), or None when it is EOS (not
            added; the row has ended).
        """
        if eos_id is not None and token == eos_id:
            self.finish_reason = "eos"
            return None
        self.new.append(token)
        piece = ""
        if self.tracker is not None:
            piece = self.tracker.add(token)
            if self.tracker.stopped:
                self.finish_reason = "stop_string"
        if self.finish_reason is None and len(self.new) >= max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is None and fills_context:
            self.finish_reason = "context"
        return piece
