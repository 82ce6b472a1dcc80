"""Autoregressive text generation with a KV cache.

Sampling order per step: temperature → top-k → top-p (nucleus), then a draw from a seeded
``torch.Generator`` (temperature 0 = greedy argmax). With the KV cache each new token costs one
position of compute; without it the whole prefix is recomputed (kept for testing the cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..data import AvaTokenizer
from ..errors import AvaCheckpointError
from ..models import EnhancedMoEModel
from ..utils.checkpoint import TOKENIZER_FILE, resolve_checkpoint

logger = logging.getLogger(__name__)


class TextGenerator:
    """Generate text from a model and its tokenizer.

    Args:
        model: a trained :class:`EnhancedMoEModel`.
        tokenizer: the tokenizer it was trained with.
        device: where to run (default: the model's device).
    """

    def __init__(self, model: EnhancedMoEModel, tokenizer: AvaTokenizer, device: torch.device | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.device = device or next(model.parameters()).device

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "TextGenerator":
        """Load model and tokenizer from a run folder or a checkpoint folder."""
        checkpoint = resolve_checkpoint(path)
        tokenizer_file = checkpoint / TOKENIZER_FILE
        if not tokenizer_file.is_file():
            raise AvaCheckpointError(f"{tokenizer_file} is missing; the checkpoint has no tokenizer")
        model = EnhancedMoEModel.from_pretrained(checkpoint).to(device)
        return cls(model, AvaTokenizer.from_file(tokenizer_file), torch.device(device))

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
    ) -> str:
        """Continue ``prompt``; returns the prompt followed by the generated text."""
        prompt_ids = self.tokenizer.encode(prompt)
        if not prompt_ids:  # an empty prompt starts from the document separator
            prompt_ids = [self.tokenizer.eos_id]
        new_ids = self.generate_ids(
            prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, use_cache=use_cache, eos_id=self.tokenizer.eos_id if stop_at_eos else None,
        )
        return prompt + self.tokenizer.decode(new_ids, skip_special_tokens=True)

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

        Returns:
            The generated ids (without the prompt).
        """
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator(device=self.device)
        if seed is not None:
            generator.manual_seed(seed)
        max_len = self.model.config.max_seq_len
        ids = torch.tensor([prompt_ids[-max_len:]], device=self.device)  # (1, T)
        past = None
        new: list[int] = []
        try:
            for _ in range(max_new_tokens):
                if use_cache:
                    if ids.shape[1] >= max_len:
                        break
                    step_input = ids if past is None else ids[:, -1:]
                    out = self.model(step_input, past_key_values=past, use_cache=True)
                    past = out.past_key_values
                else:
                    out = self.model(ids[:, -max_len:])
                logits = out.logits[0, -1].float()  # (V,)
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                if eos_id is not None and token == eos_id:
                    break
                new.append(token)
                ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        finally:
            self.model.train(was_training)
        return new


def sample_next_token(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from ``logits`` (V,) with temperature, top-k and top-p filtering."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (always keeps the first)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))
