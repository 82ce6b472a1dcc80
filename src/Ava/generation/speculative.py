"""Self-speculative greedy decoding with the model's own multi-token-prediction heads.

Shape suffixes: see ``Ava/__init__.py``; here B batch (always 1), T positions, D hidden, V
vocabulary, G key/value heads, L cached positions, A head dim, M the MTP depths. t_p is the token
at position p, h^j_p the depth-j hidden state at p (h^0 = the main stack's last hidden state
before its final norm, as :mod:`Ava.models.mtp` defines them).

One step, with t_0..t_n known (prompt and accepted output) and the main model's KV cache
holding positions 0..n-1 (t_n, its latest greedy token, is pending)::

    draft:  MTP depth j at position i = n-1 combines h^{j-1}_i with Emb(d_{j-1}) (d_0 = t_n)
            and predicts d_j, a guess at t_{n+j}; j = 1..k, k ≤ M
    verify: ONE cached main forward over [t_n, d_1..d_k] at positions n..n+k gives the main
            model's greedy choice g_r after each of them
    accept: d_1..d_a while d_{r+1} == g_r, then the main model's own g_a: a + 1 new tokens
    crop:   the main KV cache back to positions 0..n+a (t_n, d_1..d_a); g_a is the new pending token

Every emitted token is the main model's greedy choice given the tokens before it, so the output
equals plain greedy decoding whatever the drafts are (up to floating-point near-ties: the
verification runs k + 1 positions at once, the plain loop one); drafts only change how many
forward passes it takes.

The MTP block attends over its own sequence, so drafting keeps one KV cache per depth. Depth j
at position p needs h^{j-1}_p and t_{p+j}; a position is *committed* into depth j's cache once
t_{p+j} is an accepted token (p ≤ n - j). The few later positions (up to j - 1 of them) are
fed the drafts d_1.. in place of the unknown tokens and recomputed each step. The drafts are
therefore exactly what :meth:`EnhancedMoEModel.forward` with ``return_mtp=True`` predicts at
position i over the sequence t_0..t_n, d_1..d_{j-1} (tested), at the cost of one to j
positions per depth per step.

Greedy only: sampling (temperature > 0) decodes plainly. Batch size 1: the generator runs the
rows of a batch one after another.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..data.records import plural
from ..errors import AvaConfigError
from ..layers import KVCache, build_attention_mask
from ..models import EnhancedMoEModel
from .rows import GenerationRow
from .sampling import SamplingParams, choose_tokens, process_logits

logger = logging.getLogger(__name__)

__all__ = ["MTPDrafter", "SpeculativeStats", "check_speculative", "forward_with_hidden", "speculative_decode"]


@dataclass
class SpeculativeStats:
    """Counters of speculative decoding (summed over the rows of one call).

    Attributes:
        steps: verification forwards (one per draft-and-verify step).
        drafted: draft tokens proposed.
        accepted: draft tokens the main model agreed with (and that were emitted).
        tokens: tokens emitted (EOS not counted).
        forwards: main-model forward calls, prompt prefills included (plain greedy needs one per
            token).
    """

    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0
    forwards: int = 0

    @property
    def mean_accepted(self) -> float:
        """Accepted drafts per verification step (0..M)."""
        return self.accepted / self.steps if self.steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted (0..1)."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Emitted tokens per main-model forward (1 for plain greedy)."""
        return self.tokens / self.forwards if self.forwards else 0.0

    def summary(self) -> str:
        """One line for logs and the CLI."""
        return (f"{plural(self.tokens, 'token')} in {plural(self.forwards, 'main forward')} "
                f"({self.tokens_per_forward:.2f} tokens/forward); "
                f"{self.accepted}/{plural(self.drafted, 'draft')} accepted ({self.acceptance_rate:.0%}), "
                f"{self.mean_accepted:.2f} per step over {plural(self.steps, 'step')}")


def check_speculative(model: EnhancedMoEModel, use_cache: bool, num_beams: int = 1) -> None:
    """Raise when speculative decoding cannot run with these settings.

    Raises:
        AvaConfigError: the model has no MTP heads, the cache is off, or beam search is asked for.
    """
    if model.mtp is None:
        raise AvaConfigError(
            "model.mtp.num_heads is 0: this model has no multi-token-prediction heads to draft with; "
            "generate without speculative decoding, or train a model with model.mtp.num_heads ≥ 1"
        )
    if not use_cache:
        raise AvaConfigError("speculative decoding needs the KV cache: drop use_cache=False / --no-cache")
    if num_beams > 1:
        raise AvaConfigError("speculative decoding is greedy; it cannot be combined with beam search (num_beams > 1)")


def _crop(past: list[KVCache], length: int) -> list[KVCache]:
    """The cache of the first ``length`` positions (views; the next forward concatenates)."""
    return [(k_BGLA[:, :, :length], v_BGLA[:, :, :length]) for k_BGLA, v_BGLA in past]


def forward_with_hidden(
    model: EnhancedMoEModel, ids_1T: torch.Tensor, past: list[KVCache] | None
) -> tuple[torch.Tensor, list[KVCache], torch.Tensor]:
    """A cached main forward that also returns the last hidden state (before the final norm).

    Args:
        model: the model.
        ids_1T: (1, T) new ids.
        past: the cache of the earlier positions, or None.

    Returns:
        ``(logits (1, T, V), cache of past + T positions, hidden (1, T, D))``.
    """
    seen: list[torch.Tensor] = []
    # The final norm's input is h^0; a pre-hook reads it without changing the model's forward.
    handle = model.norm.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        out = model(ids_1T, past_key_values=past, use_cache=True)
    finally:
        handle.remove()
    return out.logits, out.past_key_values, seen[-1]


class MTPDrafter:
    """Proposes draft tokens with the MTP heads of ``model``, one KV cache per depth.

    Args:
        model: a model with MTP heads (``model.mtp``).
        tokens: t_0..t_n, the known tokens (the last one not yet run through the main model).
        hidden_1TD: (1, n, D) the main stack's hidden states of positions 0..n-1.
    """

    def __init__(self, model: EnhancedMoEModel, tokens: list[int], hidden_1TD: torch.Tensor) -> None:
        if model.mtp is None:
            raise AvaConfigError("model.mtp.num_heads is 0: no MTP heads to draft with")
        self.model = model
        self.depths = list(model.mtp)
        self.tokens = list(tokens)
        num = len(self.depths)
        # committed[j] (j ≥ 1): positions in depth j's cache; committed[0]: positions with h^0.
        self.committed = [hidden_1TD.shape[1]] + [0] * num
        self.caches: list[KVCache | None] = [None] * (num + 1)
        # hidden[j]: h^j of positions committed[j+1] .. committed[j]-1 (what depth j+1 still needs).
        self.hidden = [hidden_1TD] + [hidden_1TD[:, :0]] * num
        self._check()

    @property
    def num_depths(self) -> int:
        """M, the most drafts one step can propose."""
        return len(self.depths)

    def _check(self) -> None:
        if self.committed[0] != len(self.tokens) - 1:
            raise RuntimeError(f"drafter out of step: {len(self.tokens)} tokens but hidden states of "
                               f"{self.committed[0]} positions (expected tokens - 1)")

    @torch.no_grad()
    def draft(self, k: int) -> list[int]:
        """Greedy drafts d_1..d_k of the tokens after ``tokens`` (k ≤ M; depths > k are skipped
        and catch up on a later call).

        Args:
            k: drafts wanted.

        Returns:
            k token ids.
        """
        k = min(k, self.num_depths)
        n = len(self.tokens) - 1
        i = n - 1  # the last position with a main hidden state: every depth drafts from it
        model = self.model
        device = self.hidden[0].device
        ext = list(self.tokens)  # t_0..t_n, then the drafts so far
        fresh_1TD = self.hidden[0][:, :0]  # uncommitted h^{j-1} of this step, positions committed[j-1]..i
        drafts: list[int] = []
        for j, depth in enumerate(self.depths[:k], start=1):
            start = self.committed[j]
            h_1TD = torch.cat([self.hidden[j - 1], fresh_1TD], dim=1)  # h^{j-1} of positions start..i
            T = i + 1 - start
            if h_1TD.shape[1] != T:
                raise RuntimeError(f"drafter out of step at depth {j}: {h_1TD.shape[1]} hidden states "
                                   f"for {T} positions")
            ids_1T = torch.tensor([ext[start + j: i + j + 1]], device=device)  # t_{p+j} (drafts past t_n)
            positions_1T = torch.arange(start, i + 1, device=device)[None]
            cos_1T1A, sin_1T1A = model.rotary(positions_1T)
            mask = build_attention_mask(None, T, start, device)
            out_1TD, present = depth.forward_cached(h_1TD, model.embed_tokens(ids_1T), cos_1T1A, sin_1T1A, mask,
                                                    self.caches[j], ids_1T)
            logits_1V = model.lm_head(depth.norm(out_1TD[:, -1]))  # predicts t_{n+j}
            token = int(logits_1V.float().argmax(dim=-1)[0])
            drafts.append(token)
            ext.append(token)
            # Position p is final at depth j once t_{p+j} is a known token: p ≤ n - j.
            done = min(i + 1, max(start, n + 1 - j))
            self.caches[j] = (present[0][:, :, :done], present[1][:, :, :done])
            self.hidden[j - 1] = self.hidden[j - 1][:, done - start:]  # depth j has consumed them
            if j < self.num_depths:
                self.hidden[j] = torch.cat([self.hidden[j], out_1TD[:, : done - start]], dim=1)
            self.committed[j] = done
            fresh_1TD = out_1TD[:, done - start:]
        return drafts

    def commit(self, tokens: list[int], hidden_1TD: torch.Tensor) -> None:
        """Record accepted tokens and the main hidden states of the positions now in the cache.

        Args:
            tokens: the newly accepted tokens (the last one is the new pending token).
            hidden_1TD: (1, len(tokens), D) h^0 of the positions of the previous pending token
                and of every accepted token but the last.
        """
        self.tokens.extend(tokens)
        self.hidden[0] = torch.cat([self.hidden[0], hidden_1TD], dim=1)
        self.committed[0] += hidden_1TD.shape[1]
        self._check()


def speculative_decode(
    model: EnhancedMoEModel,
    row: GenerationRow,
    max_new_tokens: int,
    params: SamplingParams,
    stats: SpeculativeStats,
    device: torch.device,
) -> Iterator[str]:
    """Greedy decoding of one row, drafted by the MTP heads and verified by the main model.

    Finishes exactly like the plain loop of :class:`~Ava.generation.TextGenerator` (EOS, stop
    string, ``max_new_tokens``, context): the tokens of an accepted block are taken one at a
    time and the block is cut at the first that ends the row. The logit processors
    (repetition penalty, n-gram ban) act on every verified position with its own history.

    Args:
        model: the model (eval mode), with MTP heads.
        row: the prompt and its output so far (filled in place).
        max_new_tokens: tokens to generate at most.
        params: greedy settings (``temperature`` 0).
        stats: counters to add to.
        device: where the model runs.

    Yields:
        Each step's new text for the row (non-empty pieces only).
    """
    if params.temperature != 0:
        raise ValueError("speculative_decode is greedy: temperature must be 0")
    max_len = model.config.max_seq_len
    prompt = row.prompt[-max_len:]
    if max_new_tokens <= 0:
        row.finish_reason = "length"
        return
    seen_1V = None
    if params.repetition_penalty != 1.0:
        seen_1V = torch.zeros(1, model.config.vocab_size, dtype=torch.bool, device=device)
        seen_1V[0, prompt] = True

    def choose(logits_1V: torch.Tensor) -> int:
        histories = [row.prompt + row.new] if params.no_repeat_ngram_size > 0 else None
        return int(choose_tokens(process_logits(logits_1V, params, histories, seen_1V), 0.0)[0])

    def take(token: int) -> str | None:
        piece = row.take(token, params.eos_id, max_new_tokens, len(prompt) + len(row.new) + 1 >= max_len)
        if piece is not None:
            stats.tokens += 1
            if seen_1V is not None:
                seen_1V[0, token] = True
        return piece

    with torch.no_grad():
        logits_1TV, past, hidden_1TD = forward_with_hidden(model, torch.tensor([prompt], device=device), None)
        stats.forwards += 1
        token = choose(logits_1TV[:, -1])
        piece = take(token)
    if piece:
        yield piece
    if row.finish_reason is not None:
        return
    drafter = MTPDrafter(model, prompt + [token], hidden_1TD)
    while True:
        m = len(prompt) + len(row.new) - 1  # position of the pending token
        k = min(drafter.num_depths, max_new_tokens - len(row.new) - 1, max_len - 1 - m)
        with torch.no_grad():
            drafts = drafter.draft(k) if k > 0 else []
            step_ids_1T = torch.tensor([[token] + drafts], device=device)
            logits_1TV, past, hidden_1TD = forward_with_hidden(model, step_ids_1T, past)
            stats.forwards += 1
            stats.steps += 1
            stats.drafted += len(drafts)
            emitted: list[int] = []
            text = ""
            for r in range(len(drafts) + 1):
                g = choose(logits_1TV[:, r])
                piece = take(g)
                if piece is None:  # EOS
                    break
                emitted.append(g)
                text += piece
                agreed = r < len(drafts) and g == drafts[r]
                stats.accepted += agreed
                if row.finish_reason is not None or not agreed:
                    break
        if text:
            yield text
        if row.finish_reason is not None:
            return
        past = _crop(past, m + len(emitted))
        drafter.commit(emitted, hidden_1TD[:, : len(emitted)])
        token = emitted[-1]
