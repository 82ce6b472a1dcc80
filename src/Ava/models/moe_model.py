"""The decoder-only MoE language model (Qwen3-MoE layout and parameter names).

Shape suffixes: see ``Ava/__init__.py``; here B batch, T new positions, L = past + T key
positions, D hidden, V vocabulary, E experts, G key/value heads, A head dim.

Parameter names follow HF Qwen3-MoE without its ``model.`` prefix (``embed_tokens``,
``layers.{i}.self_attn.q_proj``, ``layers.{i}.mlp.gate``, ``layers.{i}.mlp.experts.gate_up_proj``,
``norm``, ``lm_head``), so HF export/import is a rename table.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import ModelConfig
from ..config.checkpoint_layout import (
    CONFIG_FILE, MANIFEST_FILE, TOKENIZER_FILE, WEIGHTS_FILE, describe_file, resolve_checkpoint, set_default_mode,
    verify_files,
)
from ..config.feature_compatibility import model_issues
from ..errors import AvaCheckpointError, AvaConfigError
from ..layers import Attention, KVCache, MoEBlock, RMSNorm, RotaryEmbedding, SwiGLU, build_attention_mask
from ..layers.cross_attention import CrossAttention, check_context
from ..layers.lora import LORA_FILE, adapt_base, adapter_state_dict, merge_lora, read_lora
from ..layers.quantized import QUANTIZATION_FILE, QuantizedParameter, quantize_modules, read_quantization
from ..layers.routing import RouterOutput
from ..losses import (
    UncertaintyWeighting,
    assemble_losses,
    balancing_coefficients,
    fused_causal_lm_objective,
    global_balancing_loss,
    load_balancing_loss,
    router_z_loss,
    sequence_balancing_loss,
    use_fused_head,
)
from .decoder_layer import DecoderLayer, attention_balance_terms
from .mtp import MultiTokenPrediction
from .outputs import MoEModelOutput, RouterStats

logger = logging.getLogger(__name__)


def _check_config(cfg: ModelConfig) -> None:
    """Raise once with every structural problem of ``cfg`` the model cannot be built with."""
    problems = [str(issue) for issue in model_issues(cfg) if issue.severity == "error"]
    if problems:
        raise AvaConfigError("; ".join(problems))


class EnhancedMoEModel(nn.Module):
    """Decoder-only Mixture-of-Experts transformer.

    Args:
        cfg: a resolved :class:`ModelConfig` (``vocab_size`` and derived sizes set).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        _check_config(cfg)
        self.config = cfg
        # One draw from the global RNG, before any submodule's default init consumes it: the
        # construction-time weights then depend only on the RNG state at entry (and the main
        # stack's on nothing that follows it, such as the MTP heads).
        construction_seed = int(torch.randint(0, 2**62, (), device="cpu").item())
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp: MultiTokenPrediction | None = None
        if cfg.mtp.num_heads > 0:
            self.mtp = MultiTokenPrediction(cfg)
        self.loss_weighting: UncertaintyWeighting | None = None
        if cfg.loss.uncertainty_weighting:
            self.loss_weighting = UncertaintyWeighting(cfg.loss.uncertainty_weighting)
        # Position in model.moe.coef_schedules; not saved: the trainer sets it from its own
        # (checkpointed) step before every optimizer step.
        self._balancing_step = 0
        self._decoding = False  # inside decoding(): derived inference copies of weights allowed
        # Where the weights came from: init_weights(seed) records the seed; any load_state_dict
        # (from_pretrained, checkpoints, import) marks them loaded, so a trainer never
        # re-initialises them (see Ava.training.parallel.Parallelism.prepare_model).
        self.init_seed: int | None = None
        self.weights_loaded = False
        self.register_load_state_dict_post_hook(_mark_weights_loaded)
        if self.embed_tokens.weight.device.type != "meta":  # meta: materialise, then init_weights(seed)
            self._initialize(construction_seed)

    # -- init --------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, seed: int) -> None:
        """(Re)initialise every weight (GPT-2 style, depth-scaled output projections).

        With a ``seed`` the draw comes from a generator of its own, so the weights depend on the
        seed alone, not on what consumed the global RNG before: the CLI, the Quick Start and
        :meth:`~Ava.training.enhanced_trainer.EnhancedModularTrainer.from_config` start from the
        same weights for the same ``run.seed``. The main stack is drawn before the MTP heads, so
        the main weights are the same with or without them. Afterwards :attr:`init_seed` is
        ``seed`` and :attr:`weights_loaded` False.

        Args:
            seed: the generator's seed (``run.seed``).
        """
        self._initialize(seed)
        self.init_seed = seed
        self.weights_loaded = False

    @torch.no_grad()
    def _initialize(self, seed: int) -> None:
        generator = torch.Generator(device=self.embed_tokens.weight.device).manual_seed(seed)
        init = functools.partial(self._init_weights, generator=generator)
        for name, module in self.named_children():
            if name not in ("mtp", "loss_weighting"):
                module.apply(init)
        if self.mtp is not None:
            self.mtp.apply(init)
        if self.loss_weighting is not None:
            nn.init.zeros_(self.loss_weighting.log_vars)  # equal weights: log σ² = 0
        self.rotary.reset_table()  # not a weight, but garbage after a meta-device build until recomputed

    def _init_weights(self, module: nn.Module, generator: torch.Generator | None = None) -> None:
        std = self.config.initializer_range
        # Every layer adds two branches (attention, MLP) into the residual stream, so at init its
        # variance grows like 2·L·Var(branch). Scaling the projections that write into the stream
        # by 1/sqrt(2·L) keeps it O(1) at any depth (GPT-2 / nanoGPT).
        out_std = std / math.sqrt(2 * self.config.num_layers)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std, generator=generator)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, Attention):
            nn.init.normal_(module.o_proj.weight, mean=0.0, std=out_std, generator=generator)
        elif isinstance(module, SwiGLU):
            nn.init.normal_(module.down_proj.weight, mean=0.0, std=out_std, generator=generator)
        elif isinstance(module, CrossAttention):  # starts closed: tanh(0) = 0
            nn.init.normal_(module.o_proj.weight, mean=0.0, std=out_std, generator=generator)
            nn.init.zeros_(module.gate)
        elif isinstance(module, MoEBlock):
            nn.init.normal_(module.gate.weight, mean=0.0, std=std, generator=generator)
            nn.init.normal_(module.experts.gate_up_proj, mean=0.0, std=std, generator=generator)
            nn.init.normal_(module.experts.down_proj, mean=0.0, std=out_std, generator=generator)
            if module.gate.noise_weight is not None:  # noisy top-k starts noise-free
                nn.init.zeros_(module.gate.noise_weight)
            if module.gate.expert_bias is not None:  # aux-free balancing starts unbiased
                module.gate.expert_bias.zero_()

    # -- forward -----------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_values: list[KVCache] | None = None,
        use_cache: bool = False,
        moe_load_prefix: list[torch.Tensor] | None = None,
        return_mtp: bool = False,
        document_ids: torch.Tensor | None = None,
        moe_count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
    ) -> MoEModelOutput:
        """Run the decoder.

        Args:
            input_ids: (B, T) long.
            labels: (B, T) long aligned with ``input_ids`` (shifted inside), -100 = ignore.
            attention_mask: (B, L) 1 = real token, 0 = padding (left padding for generation),
                L = past + T.
            position_ids: (B, T) long; default ``past + arange(T)`` for every row. With left
                padding pass ``cumsum(mask) - 1`` (clamped at 0) for exact positions.
            past_key_values: one ``(k, v)`` per layer, each (B, G, past, A), or None.
            use_cache: return the updated per-layer ``(k, v)``.
            moe_load_prefix: per MoE layer, (E,) routed counts of the earlier micro-batches of
                this optimizer step; the global-batch balancing loss counts f over them plus
                this batch (see :func:`~Ava.losses.global_balancing_loss`). None = this batch only.
            return_mtp: run the MTP heads without labels too (their logits, for drafting). The
                heads run when labels are given or this is set, never with ``past_key_values``
                (they keep no KV cache); a no-op without ``model.mtp``.
            document_ids: (B, T) ids of the documents packed into each row (training only): a
                token attends only to earlier tokens of its own document (``data.document_mask``).
            moe_count_reduce: sums a tensor over the data-parallel ranks (the trainer passes
                ``Parallelism.all_reduce`` when there are several): the Switch and global-batch
                losses then count f over every rank's tokens of this micro-batch (one collective
                for all layers), so their value and gradient are those of the global micro-batch,
                whatever the number of ranks. None = this process's tokens.
            context: (B, S, C) vectors the cross-attention blocks attend to
                (``model.cross_attention``; C = its ``context_size``); None or S = 0 = no
                context (the blocks are skipped). Pass the same context at every decoding step.
            context_mask: (B, S) 1 = a real context vector, 0 = padding; None = all real.
            token_mask: (B, T) bool, True = a real token, False = padding (the right padding of
                unpacked rows, ``data.packing: false``, which :func:`~Ava.data.rows.pad_rows`
                marks). The routing statistics count real tokens only: the balancing losses
                (f and P), the z-loss, ``router_stats`` (loads, dropped and unrouted tokens,
                router entropy, logit norm) and so the aux-free bias update and the routing
                metrics; capacity (``moe.capacity_factor``, expert-choice) serves real tokens
                before padding. Attention and every output are unchanged: padding is still
                computed, and with dropless routing the real tokens' outputs are the same with
                or without the mask. The MTP blocks count position i when it is real. None =
                every token is real.

        Returns:
            :class:`MoEModelOutput`.

        Raises:
            ValueError: MTP heads requested (labels or ``return_mtp``) together with
                ``past_key_values``; a context the model has no block for, or of the wrong shape;
                a ``token_mask`` not of shape (B, T).
        """
        B, T = input_ids.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values is not None else 0
        if past_key_values is not None and len(past_key_values) != len(self.layers):
            raise ValueError(f"past_key_values has {len(past_key_values)} layers, the model {len(self.layers)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past_len + T):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, past + new) = "
                f"({B}, {past_len + T}): it must cover the cached positions too"
            )
        run_mtp = self.mtp is not None and (labels is not None or return_mtp)
        if run_mtp and past_key_values is not None:
            raise ValueError(
                "the MTP heads run over the whole sequence and keep no KV cache; call without "
                "past_key_values (or without labels and return_mtp)"
            )
        check_context(context, context_mask, B, self.config)
        if token_mask is not None:
            if tuple(token_mask.shape) != (B, T):
                raise ValueError(f"token_mask has shape {tuple(token_mask.shape)}, expected (batch, new) = ({B}, {T})")
            token_mask = token_mask.to(torch.bool)
        if position_ids is None:
            position_ids = torch.arange(past_len, past_len + T, device=input_ids.device).expand(B, T)
        cos_BT1A, sin_BT1A = self.rotary(position_ids)  # (B, T, 1, A), shared by every layer
        attn_mask_B1TL = build_attention_mask(attention_mask, T, past_len, input_ids.device, document_ids)

        x_BTD = self.embed_tokens(input_ids)  # (B, T, D)
        presents: list[KVCache] = []
        routings: list[tuple[int, RouterOutput]] = []
        attention_aux: list[torch.Tensor] = []  # model.attention moh / moa: each layer's head-router balance
        for i, layer in enumerate(self.layers):
            past_kv = past_key_values[i] if past_key_values is not None else None
            x_BTD, present_kv, routing = layer(x_BTD, cos_BT1A, sin_BT1A, attn_mask_B1TL, past_kv, input_ids,
                                               context, context_mask, token_mask)
            if layer.routed_attention:
                attention_aux.append(layer.take_attention_aux_loss())
            if use_cache:
                presents.append(present_kv)
            if routing is not None:
                routings.append((i, routing))
        normed_BTD = self.norm(x_BTD)
        # Training loss from hidden states (model.loss.fused_head): no (B, T, V) logits at all.
        fused = (labels is not None and not return_mtp and self.training and torch.is_grad_enabled()
                 and use_fused_head(self.config.loss))
        logits_BTV = None if fused else self.lm_head(normed_BTD)  # (B, T, V)
        mtp_logits = mtp_normed = None
        if run_mtp:
            mtp_out = self.mtp(x_BTD, input_ids, self.embed_tokens, None if fused else self.lm_head,
                               cos_BT1A, sin_BT1A, attn_mask_B1TL, token_mask)
            mtp_logits, mtp_normed = mtp_out.logits or None, mtp_out.normed_hidden
            routings += mtp_out.routings
            attention_aux += [m.block.take_attention_aux_loss() for m in self.mtp if m.block.routed_attention]

        if use_cache and labels is None and not self.training:
            # Cached decoding: nobody reads balancing terms or router statistics there, and
            # computing them per generated token costs more than the experts of that token.
            aux_losses, router_stats = {}, []
        else:
            aux_losses, router_stats = self._balancing_terms(routings, B, moe_load_prefix, moe_count_reduce)
            aux_losses.update(attention_balance_terms(self.config, attention_aux))
        lm_loss = loss = None
        if labels is not None:
            objective = None
            if fused:
                weight_VD, loss_cfg = self.lm_head.weight, self.config.loss
                objective = lambda normed, targets: fused_causal_lm_objective(normed, weight_VD, targets, loss_cfg)  # noqa: E731
            terms = assemble_losses(
                normed_BTD if fused else logits_BTV, labels, aux_losses, mtp_normed if fused else mtp_logits,
                self.config.mtp.loss_weight, self.config.loss, self.loss_weighting, objective,
            )
            loss, lm_loss, aux_losses = terms.loss, terms.lm_loss, terms.aux_losses
        return MoEModelOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_losses=aux_losses,
            logits=logits_BTV,
            router_stats=router_stats,
            past_key_values=presents if use_cache else None,
            mtp_logits=mtp_logits,
        )

    def _balancing_terms(
        self,
        routings: list[tuple[int, RouterOutput]],
        batch_size: int,
        load_prefix: list[torch.Tensor] | None = None,
        count_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[dict[str, torch.Tensor], list[RouterStats]]:
        """Weighted balancing/z losses reduced over MoE layers, and the per-layer stats.

        Every term is computed per MoE layer (MTP blocks included) and combined by
        ``model.moe.balance_reduction``: ``mean`` (a coefficient means the same at any depth) or
        ``sum`` (Megatron-LM / DeepSeek-V3, whose coefficients are per layer); sum = mean × layers.
        The Switch loss counts the slots the router sent (biased, group-limited, before capacity);
        the sequence-wise and global-batch losses count the top-k of the affinities alone
        (DeepSeek-V3 eq. 18), so the bias cannot hide the imbalance they are meant to push on.
        A routing with a token mask (``RouterOutput.token_mask_T``) counts its real tokens only,
        in every term and statistic.

        Args:
            routings: (layer index, routing) of each MoE layer.
            batch_size: B (the sequence-level loss splits the B·T tokens into sequences).
            load_prefix: per MoE layer, counts of earlier micro-batches for the global-batch loss
                (``RouterStats.balance_tokens_per_expert`` summed over them).
            count_reduce: sums over the data-parallel ranks (see ``forward``'s ``moe_count_reduce``);
                the router statistics stay this process's own (the trainer reduces them per step).

        Returns:
            ``(aux_losses, router_stats)`` as in :class:`MoEModelOutput`.
        """
        moe = self.config.moe
        if not routings:
            return {}, []
        coef = self.balancing_coefficients()
        reduce = torch.sum if moe.balance_reduction == "sum" else torch.mean
        # (E,) per layer, before dropping, real tokens only (RouterOutput.token_mask_T)
        routed = [r.routed_per_expert_E for _, r in routings]
        # (E,) per layer, the unbiased top-k's counts: the same tensor when nothing biases the choice
        unbiased = [r.balance_per_expert_E for _, r in routings]
        prefix = load_prefix if load_prefix else [None] * len(routings)
        global_counts = [c if before is None else c + before.to(c.device) for c, before in zip(unbiased, prefix)]
        switch_counts = routed
        if count_reduce is not None:  # f over every rank's tokens: one all-reduce for every layer and both losses
            summed = count_reduce(torch.stack([*routed, *global_counts]))
            switch_counts, global_counts = list(summed[:len(routed)]), list(summed[len(routed):])
        aux_per_layer = [
            load_balancing_loss(r.probs_TE, r.indices_TK, counts, None if count_reduce is None else counts.sum(),
                                token_mask_T=r.token_mask_T)
            for (_, r), counts in zip(routings, switch_counts)
        ]
        z_per_layer = [router_z_loss(r.logits_TE, r.token_mask_T) for _, r in routings]
        stats = []
        with torch.no_grad():
            for (i, r), counts, free, aux, z in zip(routings, routed, unbiased, aux_per_layer, z_per_layer):
                p_TE = r.probs_TE
                entropy_T = -(p_TE * p_TE.clamp_min(1e-20).log()).sum(dim=-1)
                stats.append(RouterStats(
                    layer=i,
                    tokens_per_expert=counts.detach(),
                    aux_loss=aux.detach(),
                    z_loss=z.detach(),
                    dropped_tokens=r.dropped_slots,
                    router_entropy=_token_mean(entropy_T, r.token_mask_T),
                    logit_norm=_token_mean(r.logits_TE.norm(dim=-1), r.token_mask_T),
                    unrouted_tokens=r.unrouted_tokens,
                    num_tokens=r.num_counted_tokens,
                    balance_tokens_per_expert=free.detach(),
                ))
        aux_losses: dict[str, torch.Tensor] = {}
        balance = moe.router != "expert_choice"  # expert-choice is balanced by construction
        # A term exists when its coefficient is ever > 0 (coef_peak), so the terms that surgery and
        # uncertainty weighting name are there at every step; its weight is this step's value.
        if balance and moe.coef_peak("aux_loss_coef") > 0:
            aux_losses["load_balance"] = coef["aux_loss_coef"] * reduce(torch.stack(aux_per_layer))
        if balance and moe.coef_peak("seq_aux_loss_coef") > 0:
            seq = [sequence_balancing_loss(r.probs_TE, r.unbiased_indices_TK, batch_size, r.token_mask_T)
                   for _, r in routings]
            aux_losses["seq_load_balance"] = coef["seq_aux_loss_coef"] * reduce(torch.stack(seq))
        if balance and moe.coef_peak("global_aux_loss_coef") > 0:
            glob = [global_balancing_loss(r.probs_TE, counts, r.token_mask_T)
                    for (_, r), counts in zip(routings, global_counts)]
            aux_losses["global_load_balance"] = coef["global_aux_loss_coef"] * reduce(torch.stack(glob))
        if moe.coef_peak("z_loss_coef") > 0:
            aux_losses["z_loss"] = coef["z_loss_coef"] * reduce(torch.stack(z_per_layer))
        return aux_losses, stats

    # -- balancing state ---------------------------------------------------------------------

    def set_balancing_step(self, step: int) -> None:
        """Move the balancing coefficients to optimizer ``step`` of ``model.moe.coef_schedules``.

        The trainer calls this before every optimizer step with its step count (0 for the first
        step), so forward passes weight the balancing terms and :meth:`update_expert_bias` uses
        γ at that step. Until it is called the model is at step 0. Without schedules it changes
        nothing.

        Args:
            step: optimizer steps completed so far.
        """
        self._balancing_step = int(step)

    def balancing_coefficients(self, scheduled_only: bool = False) -> dict[str, float]:
        """The balancing coefficients at the current balancing step (see :meth:`set_balancing_step`).

        Args:
            scheduled_only: only those with a schedule in ``model.moe.coef_schedules``.

        Returns:
            ``{name: value}`` for ``aux_loss_coef``, ``seq_aux_loss_coef``,
            ``global_aux_loss_coef``, ``z_loss_coef``, ``bias_update_rate``.
        """
        return balancing_coefficients(self.config.moe, self._balancing_step, scheduled_only)

    @torch.no_grad()
    def update_expert_bias(self, tokens_per_expert: list[torch.Tensor]) -> None:
        """Aux-loss-free balancing: nudge each MoE layer's expert bias toward uniform load.

        Call once per optimizer step, after ``optimizer.step()``, with the step's routed counts
        summed over its micro-batches (``RouterStats.tokens_per_expert``: the biased selection,
        *before* capacity dropping; Megatron-LM counts after). The bias steers the router's
        choice, so it reads the choice: counts after dropping are clamped at the capacity, which
        hides how far an overloaded expert overflows and lowers the mean, so experts between the
        clamped and the true mean load get pushed down while underloaded (docs/moe.md gives the
        measurement). Under dropless routing the two are the same. A no-op unless
        ``model.moe.aux_free_bias`` (and while a scheduled γ is 0). ``b_i += γ · sign(mean load −
        load_i)``, γ = ``moe.bias_update_rate`` at the current balancing step (its schedule, see
        :meth:`set_balancing_step`); the bias is a buffer, so it is saved with the weights.

        Args:
            tokens_per_expert: one (E,) count per MoE layer, in layer order (main stack, then
                the MTP blocks, as in ``router_stats``).
        """
        if not self.config.moe.aux_free_bias:
            return
        moe_layers = [layer for layer in self.decoder_layers() if layer.is_moe]
        if len(tokens_per_expert) != len(moe_layers):
            raise ValueError(f"got {len(tokens_per_expert)} load vectors for {len(moe_layers)} MoE layers")
        rate = self.balancing_coefficients()["bias_update_rate"]
        if rate == 0:
            return
        for layer, load_E in zip(moe_layers, tokens_per_expert):
            layer.mlp.gate.update_bias(load_E, rate)

    # -- decoding ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Scope in which the weights are frozen, so inference may keep derived copies of them.

        Entering the outermost scope copies every attention layer's q, k, v weights into one
        matrix (:meth:`~Ava.layers.Attention.fuse_qkv_for_decoding`), which it then runs as one
        matmul whenever autograd is off: fewer, larger calls per decoded token. Leaving it drops
        the copies. Do not change the weights inside the scope (no optimizer step, in-place edit,
        ``load_state_dict`` or move): the copies would not follow; leave it and enter it again
        instead. A half-consumed generation stream keeps its scope (and the copies' memory) open
        until it is closed or collected. The generators (:mod:`Ava.generation`) decode inside it.
        """
        attentions = [m for m in self.modules() if isinstance(m, Attention)]
        outermost = not self._decoding
        try:
            if outermost:
                self._decoding = True
                for attention in attentions:
                    attention.fuse_qkv_for_decoding(True)
            yield
        finally:
            if outermost:
                self._decoding = False
                for attention in attentions:
                    attention.fuse_qkv_for_decoding(False)

    # -- training execution (how the layers run, never what they compute) ---------------------

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute every decoder layer (MTP blocks included) in backward instead of keeping
        its activations; applies to training forwards only (train mode, autograd on).

        Gradients are unchanged: the layers have no side effects and the recomputation replays
        the forward's RNG state (dropout, noisy routing) and autocast. Costs about one more
        forward pass of the layers per step (``performance.activation_checkpointing``).

        Args:
            enabled: on or off.
        """
        for layer in self.decoder_layers():
            layer.activation_checkpointing = enabled

    def compile_layers(self, enabled: bool = True) -> None:
        """``torch.compile`` every decoder layer's training forward (MTP blocks included).

        Only training forwards (train mode, autograd on) use the compiled layers; evaluation and
        cached decoding run eager, so they never recompile. The routed experts stay eager
        (``Experts.forward`` is excluded with ``torch.compiler.disable``); the embedding, final
        norm and (fused) output head are not compiled. Compilation happens at the first training
        forward (``performance.compile``).

        Args:
            enabled: compile (True) or go back to eager (False).
        """
        for layer in self.decoder_layers():
            layer.compile_for_training(enabled)

    # -- accounting --------------------------------------------------------------------------

    def decoder_layers(self) -> list[DecoderLayer]:
        """The main stack's layers, then the MTP blocks (the order of ``router_stats``)."""
        blocks = [module.block for module in self.mtp] if self.mtp is not None else []
        return [*self.layers, *blocks]

    def num_parameters(self, active_only: bool = False) -> int:
        """Parameter count (tied weights once), MTP modules and loss weights included.

        The MTP heads are counted because they are trained and saved with the model; a
        deployment that drops them has ``num_parameters() - sum(p.numel() for p in
        model.mtp.parameters())``.

        Args:
            active_only: count only ``top_k`` of the E routed experts of each MoE layer (the
                parameters one token uses).

        Returns:
            The count.
        """
        total = sum(p.numel() for p in self.parameters())
        # quantized weights (``ava quantize``) are buffers: counted at their full-precision shape
        total += sum(m.numel() for m in self.modules() if isinstance(m, QuantizedParameter))
        for layer in self.decoder_layers():
            if layer.is_moe:
                experts = layer.mlp.experts
                # Under expert parallelism this process holds num_local_experts of the E experts.
                per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // experts.num_local_experts
                total += (experts.num_experts - experts.num_local_experts) * per_expert
                if active_only:
                    total -= (experts.num_experts - self.config.moe.top_k) * per_expert
        return total

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs (forward + backward) per token at context ``seq_len``.

        Convention (PaLM appendix B, causal): ``6·N + 6·L·seq_len·d_attn`` where N counts the
        active non-embedding matmul parameters (attention projections, router, the top_k experts
        or the dense MLP, and the LM head, which is a matmul even when tied; norms and the input
        embedding lookup are not), and the attention term is PaLM's ``12·L·T·d_attn`` halved
        because a causal query attends on average to half the context. ``d_attn`` = heads × head
        dim.

        With MTP heads (which run in every training step) each depth adds its ``eh_proj``, its
        block (counted like a layer, attention term included) and one more pass through the
        shared LM head; the figure is the training cost. Inference without the heads costs what
        the same model with ``model.mtp.num_heads: 0`` reports.

        Args:
            seq_len: context length T.

        Returns:
            FLOPs per token.
        """
        cfg = self.config
        matmul_params = 0
        for layer in self.decoder_layers():
            attn = layer.self_attn
            matmul_params += sum(m.weight.numel() for m in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj))
            if layer.is_moe:
                experts = layer.mlp.experts
                per_expert = (experts.gate_up_proj.numel() + experts.down_proj.numel()) // experts.num_local_experts
                matmul_params += layer.mlp.gate.weight.numel() + cfg.moe.top_k * per_expert
                if layer.mlp.shared_experts is not None:
                    matmul_params += sum(p.numel() for p in layer.mlp.shared_experts.parameters())
            else:
                matmul_params += sum(p.numel() for p in layer.mlp.parameters())
        heads = 1 + cfg.mtp.num_heads  # the main head, then once per MTP depth
        matmul_params += heads * self.lm_head.weight.numel()
        if self.mtp is not None:
            matmul_params += sum(module.eh_proj.weight.numel() for module in self.mtp)
        d_attn = cfg.num_heads * cfg.head_dim
        return 6.0 * matmul_params + 6.0 * (cfg.num_layers + cfg.mtp.num_heads) * seq_len * d_attn

    # -- persistence -------------------------------------------------------------------------

    def save_pretrained(self, path: str | Path) -> Path:
        """Write ``path/model.safetensors`` and ``path/config.yaml`` (``{"model": ...}``).

        Args:
            path: folder, created if missing.

        Returns:
            The folder.
        """
        import yaml
        from safetensors.torch import save_model

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        # save_model drops the duplicate of tied tensors; load_model restores the tie.
        save_model(self, str(folder / WEIGHTS_FILE))
        set_default_mode(folder / WEIGHTS_FILE)  # safetensors writes 0600; config.yaml gets 0666 - umask
        text = yaml.safe_dump({"model": self.config.model_dump(mode="json")}, sort_keys=False)
        (folder / CONFIG_FILE).write_text(text, encoding="utf-8")
        return folder

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu",
                        verify: bool = True) -> "EnhancedMoEModel":
        """Load a model saved by :meth:`save_pretrained` or a training checkpoint.

        Args:
            path: a folder holding ``model.safetensors`` and ``config.yaml`` (only its ``model``
                section is read), or a run folder whose ``checkpoints/latest`` holds them.
            device: where to put the weights.
            verify: check the weights, config and tokenizer against the folder's ``manifest.json``
                (size + sha256) when it has one (training checkpoints do; ``save_pretrained``
                folders do not). False skips the check (hashing reads every byte once, slow for
                very large files) and logs a warning.

        A folder written by ``ava quantize`` (it holds ``quantization.json``) loads with the
        quantized modules of :mod:`Ava.layers.quantized` in place of its linears, embedding and
        experts.

        Returns:
            The model, in eval mode.

        Raises:
            AvaCheckpointError: missing, unreadable or damaged files, naming the path and the fix.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        weights_dir = resolve_checkpoint(path)
        lora = read_lora(weights_dir)
        if lora is not None:  # a LoRA fine-tune: its base, with the adapters merged in
            return _load_finetune(cls, weights_dir, lora, device, verify)
        if not verify:
            if (weights_dir / MANIFEST_FILE).exists():
                logger.warning("%s: not checked against %s (--no-verify / verify=False); a damaged file "
                               "would load without an error", weights_dir / WEIGHTS_FILE, MANIFEST_FILE)
        else:  # the files callers read: the tokenizer too (generate, eval, export); not state.pt
            verify_files(weights_dir, (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, QUANTIZATION_FILE, LORA_FILE))
        config_path = weights_dir / CONFIG_FILE
        if not config_path.is_file():
            raise AvaCheckpointError(
                f"{weights_dir}: no {CONFIG_FILE} next to {WEIGHTS_FILE}; copy the run's config.yaml there "
                "(it needs a `model:` section)"
            )
        cfg = _read_model_config(config_path)
        model = cls(cfg)
        quantization = read_quantization(weights_dir)  # a quantized checkpoint (`ava quantize`)
        if quantization is not None:  # empty quantized modules for the weights to load into
            quantize_modules(model, quantization["scheme"], quantization.get("group_size"), copy_weights=False)
        try:
            load_model(model, str(weights_dir / WEIGHTS_FILE), strict=True, device=str(device))
        except (SafetensorError, RuntimeError, OSError, ValueError) as err:
            raise AvaCheckpointError(
                f"{weights_dir / WEIGHTS_FILE}: cannot load weights ({err}); the file is corrupt or "
                f"does not match {config_path} — re-save it or point at another checkpoint"
            ) from err
        return model.to(device).eval()


def _load_finetune(cls: type[EnhancedMoEModel], weights_dir: Path, lora: dict[str, Any],
                   device: str | torch.device, verify: bool) -> EnhancedMoEModel:
    """A LoRA fine-tune's checkpoint (``lora.json`` + adapters) as a plain model: its base (checked
    against the size and sha256 recorded at training time), quantized as it was trained on,
    with the adapters folded in (:func:`~Ava.layers.lora.merge_lora`)."""
    from safetensors.torch import load_file

    if verify:
        verify_files(weights_dir, (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, LORA_FILE))
    base = Path(lora["base"])
    if not (base / WEIGHTS_FILE).is_file():
        raise AvaCheckpointError(
            f"{weights_dir} holds LoRA adapters for the base {base}, which has no {WEIGHTS_FILE}; restore the "
            "base there (or merge the adapters where it exists: `ava merge-lora`)")
    if verify and describe_file(base / WEIGHTS_FILE) != lora["base_weights"]:
        raise AvaCheckpointError(
            f"{weights_dir}: the base {base / WEIGHTS_FILE} changed since these adapters were trained on it "
            "(size or sha256 differs); restore that base, or pass --no-verify (verify=False) to merge anyway")
    model = cls.from_pretrained(base, verify=verify)
    adapt_base(model, lora["base_quant"], lora.get("base_group_size"), lora["rank"], lora["alpha"], 0.0,
               lora["targets"])
    try:
        adapters = load_file(str(weights_dir / WEIGHTS_FILE))
    except Exception as err:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise AvaCheckpointError(f"{weights_dir / WEIGHTS_FILE}: cannot load the adapters ({err}); the file "
                                 "is corrupt, point at another checkpoint") from err
    params = adapter_state_dict(model)
    if set(adapters) != set(params):
        raise AvaCheckpointError(f"{weights_dir / WEIGHTS_FILE}: the adapters do not match {LORA_FILE} "
                                 f"(e.g. {sorted(set(adapters) ^ set(params))[:2]}); the checkpoint is damaged")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(adapters[name])
    return merge_lora(model).to(device).eval()


def _token_mean(x_T: torch.Tensor, token_mask_T: torch.Tensor | None) -> torch.Tensor:
    """Mean of (T,) ``x_T`` over the real tokens (all of them without a mask)."""
    if token_mask_T is None:
        return x_T.mean()
    return (x_T * token_mask_T).sum() / token_mask_T.sum().clamp_min(1)


def _mark_weights_loaded(model: nn.Module, incompatible_keys: Any) -> None:
    """``load_state_dict`` post-hook: the weights are no longer the initial draw."""
    model.weights_loaded = True


def _read_model_config(config_path: Path) -> ModelConfig:
    """The ``model`` section of a saved config.yaml, validated."""
    import yaml
    from pydantic import ValidationError

    try:
        data: Any = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise AvaCheckpointError(f"{config_path}: unreadable YAML ({err}); restore the file") from err
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise AvaCheckpointError(f"{config_path}: no `model:` section; re-save the checkpoint")
    try:
        return ModelConfig.model_validate(data["model"])
    except ValidationError as err:
        raise AvaCheckpointError(
            f"{config_path}: invalid `model:` section ({err.error_count()} problems: "
            f"{err.errors()[0]['loc']} {err.errors()[0]['msg']}); fix or re-save it"
        ) from err
