"""The ``model`` section: decoder, MoE layer, multi-token prediction and loss settings.

Sizes left unset are derived from the ones given (SPEC §3): ``num_heads = max(1, hidden_size // 64)``,
``num_kv_heads = num_heads`` (1 with ``attention: moa``), ``head_dim = hidden_size // num_heads``,
``intermediate_size = moe_intermediate_size ≈ 8/3 · hidden_size`` (rounded up to a multiple of 32).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import AvaSection


def _swiglu_width(hidden_size: int) -> int:
    """SwiGLU hidden width ≈ 8/3 · hidden (same parameter count as a 4·hidden GELU MLP)."""
    width = (8 * hidden_size + 2) // 3
    return ((width + 31) // 32) * 32


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


class CoefSchedule(AvaSection):
    """How one balancing coefficient moves over the optimizer steps (``model.moe.coef_schedules``).

    At optimizer step s (0 = the first step; resume continues from the checkpointed step) with
    ``r = min(s / steps, 1)``: linear ``start + (end − start)·r``; cosine ``end + (start − end)·(1 +
    cos πr)/2``; step ``start`` while ``s < steps``, then ``end``; constant ``end`` at every step.
    ``end`` defaults to the section's coefficient, which is therefore the value after the schedule.
    """

    kind: Literal["constant", "linear", "cosine", "step"] = Field(
        description="linear / cosine: from start to end over `steps`; step: start for `steps` steps, then end; "
        "constant: end throughout (start and steps ignored: switches a schedule off)."
    )
    start: float = Field(0.0, ge=0.0, description="Value at step 0 (0 = a warmup from 0 to end).")
    steps: int | None = Field(
        None, ge=1, description="Optimizer steps the schedule takes; required unless kind is constant."
    )
    end: float | None = Field(
        None, ge=0.0,
        description="Value from step `steps` on; null = the coefficient's own key in model.moe.",
    )

    @model_validator(mode="after")
    def _needs_steps(self) -> "CoefSchedule":
        if self.kind != "constant" and self.steps is None:
            raise ValueError(
                f"kind {self.kind} needs steps; set steps: N (optimizer steps, ≥ 1) or use kind: constant"
            )
        return self

    def peak(self, base: float) -> float:
        """The largest value the schedule takes with ``base`` as the default end."""
        end = base if self.end is None else self.end
        return end if self.kind == "constant" else max(self.start, end)


class CoefSchedulesConfig(AvaSection):
    """Optional per-coefficient schedules of the balancing terms; null = the constant coefficient."""

    aux_loss_coef: CoefSchedule | None = Field(None, description="Schedule of aux_loss_coef; null = constant.")
    seq_aux_loss_coef: CoefSchedule | None = Field(
        None, description="Schedule of seq_aux_loss_coef; null = constant."
    )
    global_aux_loss_coef: CoefSchedule | None = Field(
        None, description="Schedule of global_aux_loss_coef; null = constant."
    )
    z_loss_coef: CoefSchedule | None = Field(None, description="Schedule of z_loss_coef; null = constant.")
    bias_update_rate: CoefSchedule | None = Field(
        None, description="Schedule of the aux-free bias step γ (needs aux_free_bias); null = constant."
    )


class MoEConfig(AvaSection):
    """Mixture-of-Experts layer: routing, expert width, balancing losses and kernel backend."""

    top_k: int = Field(2, ge=1, description="Experts each token is routed to.")
    router: Literal["softmax", "sigmoid", "switch", "noisy_topk", "expert_choice", "hash"] = Field(
        "softmax",
        description="Router type. softmax: top-k of softmax(x·W_g) (Mixtral/Qwen3-MoE); sigmoid: top-k of "
        "sigmoid scores, weights = normalised selected scores × routed_scaling_factor (DeepSeek-V3); "
        "switch: top-1 softmax, weight = the probability (Switch Transformer; needs top_k 1); noisy_topk: "
        "softmax top-k of logits + N(0,1)·softplus(x·W_noise) while training (Shazeer 2017); "
        "expert_choice: each expert takes its top-c tokens, c = capacity_factor·T·top_k/E (Zhou 2022); "
        "hash: expert = fixed hash(token id) mod E, then the next top_k-1 experts (Roller 2021).",
    )
    norm_topk_prob: bool = Field(
        True, description="Renormalise the top-k router weights to sum to 1 (Qwen3-MoE; DeepSeek-V3 sigmoid)."
    )
    routed_scaling_factor: float = Field(
        1.0, gt=0.0, description="Multiply the routed experts' gate weights by this (DeepSeek-V3 uses 2.5)."
    )
    n_groups: int | None = Field(
        None, ge=1,
        description="Group-limited routing (DeepSeek-V3): split the experts into this many groups; null = off.",
    )
    topk_groups: int | None = Field(
        None, ge=1,
        description="Group-limited routing: keep the best topk_groups groups (a group scores the sum of its "
        "top-2 expert scores) and pick the top_k experts inside them; required with n_groups.",
    )
    moe_intermediate_size: int | None = Field(
        None, ge=1, description="Hidden width of each routed expert; null = 8/3·hidden_size, rounded."
    )
    num_shared_experts: int = Field(
        0, ge=0,
        description="Always-on shared experts (DeepSeek/Qwen2-MoE), run as one dense SwiGLU `mlp.shared_experts` "
        "of width num_shared_experts × moe_intermediate_size added to the routed output; 0 = none.",
    )
    capacity_factor: float | None = Field(
        None, gt=0.0,
        description="Training capacity factor CF: each expert takes at most ceil(CF·T·top_k/E) token-slots "
        "per micro-batch; overflow slots are dropped (the token keeps its residual). null = dropless. "
        "expert_choice uses it for its per-expert token count c.",
    )
    eval_capacity_factor: float | None = Field(
        None, gt=0.0,
        description="Capacity factor in eval mode; null = capacity_factor. num_experts/top_k (or more) "
        "never drops anything.",
    )
    aux_loss_coef: float = Field(
        0.01, ge=0.0,
        description="Switch/GShard load-balancing loss coefficient α on E·Σ f_i·P_i per MoE layer (1 when "
        "uniform), reduced over layers by balance_reduction (0 disables it unless scheduled). A Hugging Face "
        "router_aux_loss_coef c is α ≈ top_k·c with mean (HF pools the layers); Megatron's moe_aux_loss_coeff is "
        "α with sum. See docs/moe.md for the conversion table.",
    )
    seq_aux_loss_coef: float = Field(
        0.0, ge=0.0,
        description="Sequence-level balancing loss coefficient (DeepSeek-V3 eq. 17-20: f·P per sequence, "
        "averaged; f from the top-k of the affinities, without bias or group limit). DeepSeek-V3/Megatron's "
        "1e-4 is per layer, summed over layers: use it with balance_reduction: sum, or multiply it by the "
        "number of MoE layers (MTP blocks included) with mean. 0 disables it unless scheduled.",
    )
    global_aux_loss_coef: float = Field(
        0.0, ge=0.0,
        description="Global-batch balancing loss coefficient (Qwen 2025): f_i counted over all micro-batches "
        "of the optimizer step so far, from the top-k of the affinities (without bias or group limit); "
        "reduced over layers by balance_reduction; 0 disables it unless scheduled.",
    )
    z_loss_coef: float = Field(
        0.001, ge=0.0,
        description="Router z-loss coefficient on mean_t (logsumexp x_t)² per MoE layer (ST-MoE), reduced over "
        "layers by balance_reduction (0 disables it unless scheduled).",
    )
    balance_reduction: Literal["mean", "sum"] = Field(
        "mean",
        description="How the per-layer balancing terms (load_balance, seq_load_balance, global_load_balance, "
        "z_loss) combine over the MoE layers (MTP blocks included): mean (a coefficient means the same at "
        "any depth) or sum (Megatron-LM, DeepSeek-V3; sum = mean × number of MoE layers). Copy a Megatron "
        "moe_aux_loss_coeff / moe_z_loss_coeff with sum. See docs/moe.md for a conversion table.",
    )
    aux_free_bias: bool = Field(
        False,
        description="Auxiliary-loss-free balancing (DeepSeek-V3): a per-expert bias `mlp.gate.expert_bias`, "
        "added to the scores for selection only, updated after each optimizer step by "
        "b_i += bias_update_rate·sign(mean load − load_i). Saved in checkpoints.",
    )
    bias_update_rate: float = Field(
        1e-3, gt=0.0, description="γ, the step of the aux-free bias update (DeepSeek-V3: 1e-3)."
    )
    coef_schedules: CoefSchedulesConfig = Field(
        default_factory=CoefSchedulesConfig,
        description="Optional per-step schedules of the balancing coefficients above (aux_loss_coef, "
        "seq_aux_loss_coef, global_aux_loss_coef, z_loss_coef, bias_update_rate), each null (constant) or "
        "{kind: constant|linear|cosine|step, start: value at step 0 (default 0), steps: optimizer steps, end: "
        "value after (default: the coefficient itself)}, e.g. aux_loss_coef: {kind: linear, start: 0.1, steps: "
        "1000}. A scheduled term is computed even where its coefficient is 0; values logged as coef/<name>. "
        "See docs/moe.md.",
    )
    first_dense_layers: int = Field(
        0, ge=0, description="The first k decoder layers use a dense SwiGLU MLP instead of experts."
    )
    moe_every: int = Field(
        1, ge=1,
        description="MoE every n layers: layer i (0-based, past first_dense_layers) is MoE when (i+1) % n == 0 "
        "(HF decoder_sparse_step), dense otherwise; 1 = every layer.",
    )
    backend: Literal["loop", "batched", "grouped", "auto"] = Field(
        "auto",
        description="Expert kernel: grouped (sorted tokens + torch._grouped_mm), batched (padded bmm), "
        "loop (reference), or auto (batched on CPU in bf16 at balanced load, else grouped; see docs/moe.md).",
    )

    def coef_peak(self, name: str) -> float:
        """The largest value balancing coefficient ``name`` takes in training (its schedule's or its own).

        A balancing term exists (is computed, logged, can be weighted or operated on by surgery)
        when this is > 0, so the set of terms stays the same over the whole run.
        """
        base = getattr(self, name)
        schedule = getattr(self.coef_schedules, name)
        return base if schedule is None else schedule.peak(base)


class MTPConfig(AvaSection):
    """Multi-token prediction heads (DeepSeek-V3), trained alongside the next-token objective."""

    num_heads: int = Field(
        0, ge=0,
        description="D sequential MTP modules; module j (1..D) predicts token t+j+1 from the previous module's "
        "hidden state and the embedding of token t+j, through one decoder block and the shared output "
        "head. 0 = off (no parameters, no extra compute).",
    )
    loss_weight: float = Field(
        0.3, ge=0.0,
        description="λ of L_MTP = (λ / D)·Σ_j L_j, logged and added to the loss as `mtp` (DeepSeek-V3: 0.3 "
        "early in training, 0.1 later).",
    )


class LossConfig(AvaSection):
    """The language-modelling objective (applied to the main head and every MTP head) and loss weighting."""

    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Label smoothing ε of the cross-entropy (target (1−ε)·one-hot + ε/V); 0 = off. lm_loss "
        "(and so the val loss/perplexity) is then the smoothed loss.",
    )
    focal_gamma: float = Field(
        0.0, ge=0.0,
        description="Focal loss γ: each token's loss is (1 − p_true)^γ · (−log p_true) (Lin 2017); 0 = plain "
        "cross-entropy. Not combinable with label_smoothing.",
    )
    chunk_size: int | None = Field(
        None, ge=1,
        description="Chunked cross-entropy: compute the loss over this many sequence positions at a time "
        "(each chunk B·chunk_size rows) and recompute each chunk in backward, so fp32 log-probabilities exist "
        "for one chunk at a time instead of all B·T·V; same value and gradient as the plain loss. null = off.",
    )
    fused_head: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Training loss straight from the final hidden states: the output head and cross-entropy run "
        "over row chunks with their gradients made in the same pass, so the (B·T, V) logits are never stored "
        "(2.2-6x less peak memory for head + loss; on CPU 1.0-1.3x the speed of the logits path, by dtype and "
        "vocabulary; docs/losses.md). auto = on unless focal_gamma > 0 or chunk_size "
        "is set; on = the same but an error with those; off = always materialise the logits. Training forwards "
        "then return logits=None; evaluation (no grad) always materialises them. YAML's bare on/off "
        "(booleans) are accepted.",
    )
    uncertainty_weighting: list[str] = Field(
        default_factory=list,
        description="Loss terms weighted by learned log-variances s_i (Kendall 2018): term L_i becomes "
        "exp(−s_i)·L_i + s_i/2, parameters `loss_weighting.log_vars` on the model (trained and checkpointed "
        "with it). Names: lm_loss, mtp, load_balance, seq_load_balance, global_load_balance, z_loss. The "
        "change is logged as the `uncertainty` term; empty = off.",
    )

    @field_validator("fused_head", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: object) -> object:
        # YAML 1.1 reads a bare on/off as true/false; take them as the words they were.
        return ("on" if value else "off") if isinstance(value, bool) else value


class MoHConfig(AvaSection):
    """Mixture-of-head attention (Jin et al. 2024), used when ``model.attention`` is ``moh``."""

    shared_heads: int = Field(
        0, ge=0,
        description="Heads every token uses (the first shared_heads of model.num_heads); the others are routed. "
        "With shared heads the two groups' weights are mixed per token by a learned 2-way softmax (the paper's "
        "two-stage weighting). 0 = every head is routed.",
    )
    top_k: int | None = Field(
        None, ge=1,
        description="Routed heads each token uses, chosen by a per-token softmax router over the routed heads; "
        "null = half the routed heads, rounded up. Equal to the number of routed heads = every head on.",
    )
    aux_loss_coef: float = Field(
        0.01, ge=0.0,
        description="Coefficient of the head router's load-balancing loss R·Σ f_i·P_i over the R routed heads (1 "
        "when uniform), averaged over layers and reported as aux_losses['attention_balance']; 0 = off.",
    )


class MoAConfig(AvaSection):
    """Mixture of attention heads (Zhang et al. 2022), used when ``model.attention`` is ``moa``."""

    num_experts: int | None = Field(
        None, ge=1,
        description="Attention-head experts, each with its own query and output projection (head_dim wide); one "
        "key/value head is shared by all of them. null = 2 × model.num_heads.",
    )
    top_k: int | None = Field(
        None, ge=1,
        description="Experts each token uses (softmax router, top-k weights renormalised to sum to 1); null = "
        "model.num_heads, so a token runs as many heads as standard attention.",
    )
    aux_loss_coef: float = Field(
        0.01, ge=0.0,
        description="Coefficient of the expert router's load-balancing loss E·Σ f_i·P_i (1 when uniform), "
        "averaged over layers and reported as aux_losses['attention_balance']; 0 = off.",
    )


class CrossAttentionConfig(AvaSection):
    """Gated cross-attention blocks that attend from the tokens to an external context sequence."""

    every: int = Field(
        0, ge=0,
        description="Layer i (0-based) of the main stack gets a cross-attention block after its self-attention "
        "when (i+1) % every == 0; 0 = none. The block reads the `context` (B, S, context_size) passed to the "
        "model's forward; with no context (None or S = 0) it is skipped and the layer is unchanged.",
    )
    context_size: int | None = Field(
        None, ge=1, description="Width of the context vectors; null = hidden_size (e.g. the model's own hidden states)."
    )


class ModelConfig(AvaSection):
    """Decoder-only MoE transformer."""

    vocab_size: int | None = Field(
        None, ge=2,
        description="Vocabulary size; null = the tokenizer's size rounded up to a multiple of 64. Set, it is also "
        "the target of a tokenizer Ava trains (unless data.tokenizer.vocab_size is set).",
    )
    hidden_size: int = Field(256, ge=8, description="Model width d.")
    num_layers: int = Field(4, ge=1, description="Number of decoder layers.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads; null = max(1, hidden_size // 64).")
    num_kv_heads: int | None = Field(
        None, ge=1,
        description="Key/value heads for grouped-query attention; null = num_heads (1 with attention: moa).",
    )
    head_dim: int | None = Field(
        None, ge=2,
        description="Width K of each query/key/value head (even, for RoPE); null = hidden_size // num_heads. "
        "q/k/v project hidden_size to num_heads·head_dim (or num_kv_heads·head_dim) and o_proj back, so "
        "num_heads·head_dim need not equal hidden_size (Qwen3-30B-A3B: hidden 2048, 32 heads, head_dim 128).",
    )
    max_seq_len: int = Field(256, ge=2, description="Longest sequence (context length) the model handles.")
    num_experts: int = Field(8, ge=1, description="Routed experts per MoE layer.")
    intermediate_size: int | None = Field(
        None, ge=1, description="Hidden width of dense MLP layers; null = 8/3·hidden_size, rounded."
    )
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-6, gt=0.0, description="RMSNorm epsilon.")
    qk_norm: bool = Field(True, description="RMSNorm on queries and keys (layout: qk_norm_scope).")
    qk_norm_scope: Literal["head", "full"] = Field(
        "head",
        description="QK-norm layout. head: one RMSNorm over each head's head_dim channels, gain of width "
        "head_dim (Qwen3); full: one RMSNorm over all heads' channels at once, before the split into heads, "
        "gains of width num_heads·head_dim and num_kv_heads·head_dim (OLMoE). Ignored without qk_norm.",
    )
    tie_embeddings: bool = Field(False, description="Share the input embedding with the output head.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention and residual branches.")
    initializer_range: float = Field(0.02, gt=0.0, description="Std of the normal weight init.")
    attention: Literal["standard", "moh", "moa"] = Field(
        "standard",
        description="Self-attention kind. standard: grouped-query multi-head attention; moh: mixture-of-head "
        "attention, a per-token router picks top-k heads and weights their outputs (settings: model.moh); moa: "
        "mixture of attention heads, top-k of a pool of head experts with shared keys/values (model.moa). moh "
        "and moa are experimental: not exported to HF or GGUF. See docs/experimental_attention.md.",
    )
    moh: MoHConfig = Field(default_factory=MoHConfig, description="Mixture-of-head attention (model.attention: moh).")
    moa: MoAConfig = Field(
        default_factory=MoAConfig, description="Mixture of attention heads (model.attention: moa)."
    )
    cross_attention: CrossAttentionConfig = Field(
        default_factory=CrossAttentionConfig,
        description="Gated cross-attention to an external context sequence (experimental; every: 0 = off).",
    )
    moe: MoEConfig = Field(default_factory=MoEConfig, description="Mixture-of-Experts settings.")
    mtp: MTPConfig = Field(default_factory=MTPConfig, description="Multi-token prediction heads (DeepSeek-V3).")
    loss: LossConfig = Field(
        default_factory=LossConfig,
        description="LM objective (label smoothing, focal, chunked CE) and uncertainty weighting; under model "
        "because uncertainty weighting adds parameters to the model.",
    )

    @model_validator(mode="after")
    def _derive_sizes(self) -> "ModelConfig":
        # Fill derived sizes once, so the resolved config saved in a run folder is explicit.
        # object.__setattr__ avoids re-entering validation (validate_assignment=True).
        if self.num_heads is None:
            object.__setattr__(self, "num_heads", max(1, self.hidden_size // 64))
        if self.num_kv_heads is None:  # MoA's experts share one key/value head
            object.__setattr__(self, "num_kv_heads", 1 if self.attention == "moa" else self.num_heads)
        if self.head_dim is None and self.hidden_size % self.num_heads == 0:
            # Left null otherwise: feature_compatibility.model_issues reports it with the fix.
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", _swiglu_width(self.hidden_size))
        if self.moe.moe_intermediate_size is None:
            object.__setattr__(self.moe, "moe_intermediate_size", _swiglu_width(self.hidden_size))
        if self.moh.top_k is None:
            object.__setattr__(self.moh, "top_k", max(1, (self.num_heads - self.moh.shared_heads + 1) // 2))
        if self.moa.num_experts is None:
            object.__setattr__(self.moa, "num_experts", 2 * self.num_heads)
        if self.moa.top_k is None:
            object.__setattr__(self.moa, "top_k", self.num_heads)
        if self.cross_attention.context_size is None:
            object.__setattr__(self.cross_attention, "context_size", self.hidden_size)
        return self

    @property
    def qk_norm_full(self) -> bool:
        """QK-norm over all heads' channels at once (``qk_norm`` on, ``qk_norm_scope: full``; OLMoE)."""
        return self.qk_norm and self.qk_norm_scope == "full"
