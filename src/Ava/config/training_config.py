"""The configuration schema of Ava: one pydantic model per YAML section.

Every field has a default and a ``description``; the descriptions feed ``ava config schema`` and
``configs/reference.yaml``. All models forbid unknown keys, so a typo is an error that suggests
the nearest valid key (see :mod:`Ava.config.loading`).

Sizes left unset are derived from the ones given (SPEC §3), so the seed's three model keys are
enough at any size: ``num_heads = max(1, hidden_size // 64)``, ``num_kv_heads = num_heads``,
``intermediate_size = moe_intermediate_size ≈ 8/3 · hidden_size`` (rounded up to a multiple of 32)
and ``vocab_size`` = the tokenizer's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class AvaSection(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _swiglu_width(hidden_size: int) -> int:
    """SwiGLU hidden width ≈ 8/3 · hidden (same parameter count as a 4·hidden GELU MLP)."""
    width = (8 * hidden_size + 2) // 3
    return ((width + 31) // 32) * 32


# --------------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------------


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
        0.01, ge=0.0, description="Switch/GShard load-balancing loss coefficient α (0 disables it)."
    )
    seq_aux_loss_coef: float = Field(
        0.0, ge=0.0,
        description="Sequence-level balancing loss coefficient (DeepSeek-V3, f·P per sequence, averaged; "
        "V3 uses 1e-4); 0 disables it.",
    )
    global_aux_loss_coef: float = Field(
        0.0, ge=0.0,
        description="Global-batch balancing loss coefficient (Qwen 2025): f_i counted over all micro-batches "
        "of the optimizer step so far; 0 disables it.",
    )
    z_loss_coef: float = Field(
        0.001, ge=0.0, description="Router z-loss coefficient (ST-MoE; 0 disables it)."
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
    first_dense_layers: int = Field(
        0, ge=0, description="The first k decoder layers use a dense SwiGLU MLP instead of experts."
    )
    moe_every: int = Field(
        1, ge=1,
        description="MoE every n layers: layer i (0-based, past first_dense_layers) is MoE when (i+1) % n == 0 "
        "(HF decoder_sparse_step), dense otherwise; 1 = every layer.",
    )
    backend: Literal["loop", "batched", "grouped", "auto"] = Field(
        "grouped",
        description="Expert kernel: grouped (sorted tokens + torch._grouped_mm), batched (padded bmm), "
        "loop (reference), or auto (grouped where torch._grouped_mm exists, else batched; see docs/moe.md).",
    )


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
    uncertainty_weighting: list[str] = Field(
        default_factory=list,
        description="Loss terms weighted by learned log-variances s_i (Kendall 2018): term L_i becomes "
        "exp(−s_i)·L_i + s_i/2, parameters `loss_weighting.log_vars` on the model (trained and checkpointed "
        "with it). Names: lm_loss, mtp, load_balance, seq_load_balance, global_load_balance, z_loss. The "
        "change is logged as the `uncertainty` term; empty = off.",
    )


class ModelConfig(AvaSection):
    """Decoder-only MoE transformer."""

    vocab_size: int | None = Field(
        None, ge=2, description="Vocabulary size; null = the tokenizer's (or data.tokenizer.vocab_size)."
    )
    hidden_size: int = Field(256, ge=8, description="Model width d.")
    num_layers: int = Field(4, ge=1, description="Number of decoder layers.")
    num_heads: int | None = Field(None, ge=1, description="Attention heads; null = max(1, hidden_size // 64).")
    num_kv_heads: int | None = Field(
        None, ge=1, description="Key/value heads for grouped-query attention; null = num_heads."
    )
    max_seq_len: int = Field(256, ge=2, description="Longest sequence (context length) the model handles.")
    num_experts: int = Field(8, ge=1, description="Routed experts per MoE layer.")
    intermediate_size: int | None = Field(
        None, ge=1, description="Hidden width of dense MLP layers; null = 8/3·hidden_size, rounded."
    )
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base frequency.")
    norm_eps: float = Field(1e-6, gt=0.0, description="RMSNorm epsilon.")
    qk_norm: bool = Field(True, description="RMSNorm on queries and keys per head (Qwen3 style).")
    tie_embeddings: bool = Field(False, description="Share the input embedding with the output head.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention and residual branches.")
    initializer_range: float = Field(0.02, gt=0.0, description="Std of the normal weight init.")
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
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if self.intermediate_size is None:
            object.__setattr__(self, "intermediate_size", _swiglu_width(self.hidden_size))
        if self.moe.moe_intermediate_size is None:
            object.__setattr__(self.moe, "moe_intermediate_size", _swiglu_width(self.hidden_size))
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------


class SourceConfig(AvaSection):
    """One text source: a file, folder or glob."""

    path: str = Field(..., description="File, folder or glob pattern of the source.")
    format: Literal["auto", "txt", "jsonl"] = Field(
        "auto", description="auto (by extension), txt (one document per file) or jsonl (one per line)."
    )
    text_field: str = Field("text", description="JSONL field that holds the text.")


class TokenizerConfig(AvaSection):
    """Tokenizer: load a tokenizer.json, or train a byte-level BPE on the training split."""

    path: str | None = Field(None, description="tokenizer.json to load; null = train a byte-level BPE.")
    vocab_size: int = Field(8192, ge=260, description="Vocabulary size of a newly trained BPE.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")


class DataConfig(AvaSection):
    """Training data. With no sources, Ava trains on its embedded corpus (Shakespeare)."""

    sources: list[SourceConfig] = Field(
        default_factory=list, description="Text sources; empty = the embedded Shakespeare corpus."
    )
    seq_len: int | None = Field(None, ge=2, description="Training sequence length; null = model.max_seq_len.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer settings.")
    val_fraction: float = Field(
        0.05, ge=0.0, lt=1.0, description="Share of documents held out for validation (split by document)."
    )
    max_documents: int | None = Field(
        None, ge=1, description="Use at most this many documents (after a deterministic shuffle)."
    )
    cache_dir: str | None = Field(
        None, description="Where the embedded corpus is downloaded and cached; null = the user cache dir."
    )
    num_workers: int = Field(
        0, ge=0, description="DataLoader worker processes; the batch order does not depend on it."
    )

    @field_validator("tokenizer", mode="before")
    @classmethod
    def _tokenizer_path_shorthand(cls, value: Any) -> Any:
        # `data.tokenizer: path/to/tokenizer.json` is shorthand for `{path: ...}`.
        return {"path": value} if isinstance(value, str) else value


# --------------------------------------------------------------------------------------------
# training loop
# --------------------------------------------------------------------------------------------


class MoEAlarmConfig(AvaSection):
    """Collapse alarm on routing health, checked after every optimizer step (see docs/moe.md)."""

    enabled: bool = Field(True, description="Watch the routing of MoE layers (no effect without MoE layers).")
    max_vio: float | None = Field(
        None, gt=0.0,
        description="Fire when a layer's MaxVio (max load / mean load − 1) over the step exceeds this; "
        "null = not checked. A layer with all tokens on one expert has MaxVio E − 1.",
    )
    dead_experts: int | None = Field(
        None, ge=1,
        description="Fire when at least this many experts (summed over layers) received no token over the "
        "last `window` steps; null = not checked.",
    )
    window: int = Field(50, ge=1, description="Steps over which an expert must stay unused to count as dead.")
    patience: int = Field(
        1, ge=1, description="Consecutive steps a MaxVio violation must persist before the alarm fires."
    )
    start_step: int = Field(0, ge=0, description="Ignore the first steps (routing is noisy at init).")
    action: Literal["warn", "stop"] = Field(
        "warn", description="warn: log a warning; stop: log it and end the run with an AvaTrainingError."
    )


class TrainingSection(AvaSection):
    """The optimisation loop."""

    batch_size: int = Field(8, ge=1, description="Sequences per micro-batch.")
    learning_rate: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    num_epochs: int = Field(1, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(
        None, ge=1, description="Stop after this many optimizer steps, even if epochs remain."
    )
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm; null = off.")
    eval_every: int = Field(100, ge=1, description="Run validation every N optimizer steps.")
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    save_every: int | None = Field(
        None, ge=1, description="Save a checkpoint every N steps; a final one is always saved."
    )
    log_every: int = Field(10, ge=1, description="Write metrics every N optimizer steps.")
    moe_alarm: MoEAlarmConfig = Field(
        default_factory=MoEAlarmConfig, description="Routing-collapse alarm (MaxVio, dead experts)."
    )


class OptimizerConfig(AvaSection):
    """Optimizer and its parameter groups.

    Norms, biases and embeddings get no weight decay; routers (``mlp.gate``) and experts (3-D
    ``mlp.experts.*``) get their own LR multipliers.
    """

    name: Literal["adamw", "lion", "sophia", "adafactor", "muon"] = Field(
        "adamw",
        description="Optimizer: adamw (fused where available), lion (sign momentum; use 3-10x smaller LR), "
        "sophia (Sophia-G, clipped Newton step with a sampled-label Hessian estimate), adafactor "
        "(factored second moments, torch.optim.Adafactor), muon (Newton-Schulz orthogonalised momentum "
        "for hidden matrices, AdamW for embeddings, head, norms, biases and routers).",
    )
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay of matrices.")
    betas: tuple[float, float] | None = Field(
        None,
        description="β1, β2; null = the optimizer's published default: adamw/muon (0.9, 0.95), "
        "lion (0.9, 0.99), sophia (0.965, 0.99). Unused by adafactor.",
    )
    eps: float = Field(1e-8, gt=0.0, description="Adam ε (also Sophia's denominator floor).")
    router_lr_mult: float = Field(
        1.0, gt=0.0, description="LR multiplier of router weights (mlp.gate) relative to training.learning_rate."
    )
    expert_lr_mult: float = Field(
        1.0, gt=0.0, description="LR multiplier of routed expert weights (mlp.experts.*)."
    )
    sophia_rho: float = Field(0.04, gt=0.0, description="Sophia: ρ, the clipping scale of m / (ρ·h).")
    sophia_hessian_every: int = Field(
        10, ge=1, description="Sophia: refresh the Hessian estimate every k optimizer steps."
    )
    muon_momentum: float = Field(0.95, ge=0.0, lt=1.0, description="Muon: momentum of the matrix updates.")
    muon_ns_steps: int = Field(5, ge=1, le=20, description="Muon: Newton-Schulz iterations per update.")
    muon_lr_mult: float = Field(
        1.0, gt=0.0,
        description="Muon: LR of the orthogonalised matrices relative to training.learning_rate "
        "(updates are RMS-matched to AdamW, so 1.0 works at AdamW's LR).",
    )
    muon_experts: Literal["per_expert", "adamw"] = Field(
        "per_expert",
        description="Muon on 3-D expert weights [E, out, in]: per_expert = orthogonalise each expert's "
        "matrix separately (batched Newton-Schulz), adamw = leave experts to AdamW.",
    )

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float] | None) -> tuple[float, float] | None:
        if betas is not None and not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("each beta must be in [0, 1), e.g. [0.9, 0.95]")
        return betas


class PlateauConfig(AvaSection):
    """Reduce the LR when the validation loss stops improving (applied on top of the schedule)."""

    enabled: bool = Field(False, description="Turn plateau-adaptive LR on.")
    factor: float = Field(0.5, gt=0.0, lt=1.0, description="Multiply the LR by this on a plateau.")
    patience: int = Field(2, ge=0, description="Evaluations without improvement before reducing.")
    cooldown: int = Field(1, ge=0, description="Evaluations to wait after a reduction before counting again.")
    threshold: float = Field(
        1e-3, ge=0.0, description="Relative improvement of the best val loss that counts as progress."
    )
    min_lr: float = Field(1e-6, ge=0.0, description="Floor: reductions never take the peak LR below this.")


class SchedulerConfig(AvaSection):
    """Learning-rate schedule: a warmup, then the named decay to ``lr_end``."""

    name: Literal["cosine", "linear", "constant", "wsd", "inverse_sqrt", "polynomial", "cosine_restarts"] = Field(
        "cosine",
        description="Decay after warmup, ending at lr_end: cosine, linear, constant (stays at the peak), "
        "wsd (warmup-stable-decay), inverse_sqrt (rescaled to reach lr_end), polynomial (power), "
        "cosine_restarts (SGDR cycles).",
    )
    warmup: Literal["linear", "exponential", "radam"] = Field(
        "linear",
        description="Warmup shape: linear, exponential (1-exp, normalised to reach the peak), or radam "
        "(RAdam's variance rectification term with β2 = 1 - 2/warmup_steps).",
    )
    warmup_steps: int = Field(100, ge=0, description="Warmup steps from 0 to the peak LR.")
    lr_end: float | None = Field(
        None, ge=0.0, description="LR at the last step; null = learning_rate / 10."
    )
    wsd_decay_fraction: float = Field(
        0.2, gt=0.0, le=1.0, description="wsd: share of the post-warmup steps spent decaying (MiniCPM: 0.1-0.2)."
    )
    wsd_decay_shape: Literal["exponential", "1-sqrt", "linear"] = Field(
        "1-sqrt", description="wsd: shape of the final decay."
    )
    power: float = Field(2.0, gt=0.0, description="polynomial: decay exponent (1 = linear).")
    cycle_steps: int | None = Field(
        None, ge=1, description="cosine_restarts: length of the first cycle; null = a quarter of the decay steps."
    )
    cycle_mult: float = Field(
        1.0, ge=1.0, description="cosine_restarts: each cycle is this many times longer than the previous."
    )
    plateau: PlateauConfig = Field(
        default_factory=PlateauConfig, description="Plateau-adaptive LR on the validation loss."
    )


class SurgeryConfig(AvaSection):
    """Multi-objective gradient surgery across the loss terms (LM, load balance, z-loss, ...)."""

    method: Literal["none", "pcgrad", "graddrop", "gradnorm", "cagrad", "mgda"] = Field(
        "none",
        description="none (one backward of the summed loss), pcgrad (project conflicting gradients), "
        "graddrop (sign-purity dropout), gradnorm (learned loss weights), cagrad (conflict-averse), "
        "mgda (min-norm point of the gradients' convex hull).",
    )
    terms: list[str] = Field(
        default_factory=lambda: ["lm_loss", "load_balance"],
        description="Loss terms treated as tasks: lm_loss and any aux term (load_balance, seq_load_balance, "
        "global_load_balance, z_loss, mtp, uncertainty); terms not listed are added to the combined gradient "
        "unchanged.",
    )
    cagrad_c: float = Field(0.5, ge=0.0, description="cagrad: radius c of the ball around the mean gradient.")
    gradnorm_alpha: float = Field(1.5, ge=0.0, description="gradnorm: restoring-force strength α.")
    gradnorm_lr: float = Field(0.025, gt=0.0, description="gradnorm: learning rate of the loss weights.")


class PrecisionConfig(AvaSection):
    """Numeric precision of the forward/backward pass (master weights stay fp32)."""

    dtype: Literal["fp32", "bf16"] = Field(
        "fp32", description="fp32, or bf16 autocast (CPU and CUDA) with fp32 master weights."
    )


class WandbConfig(AvaSection):
    """Weights & Biases (optional: needs `pip install wandb`)."""

    enabled: bool = Field(False, description="Log metrics to Weights & Biases.")
    project: str = Field("ava", description="W&B project.")
    entity: str | None = Field(None, description="W&B entity (team or user); null = your default.")
    mode: Literal["offline", "online"] = Field("offline", description="offline writes locally; sync later with `wandb sync`.")


class LoggingConfig(AvaSection):
    """Console, file and TensorBoard logging."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    tensorboard: bool = Field(True, description="Write TensorBoard events to the run folder.")
    progress_bar: bool = Field(True, description="Show a progress bar (loss, lr, tok/s).")
    async_metrics: bool = Field(
        True, description="Write metrics.jsonl/TensorBoard/W&B from a background thread, off the training loop."
    )
    time_breakdown: bool = Field(
        True, description="Time data / forward / backward / optimizer per step (synchronises CUDA when on)."
    )
    memory_every: int = Field(
        0, ge=0, description="Log process RSS and CUDA memory every N steps; 0 = with every metrics record."
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging.")


class EarlyStoppingConfig(AvaSection):
    """Stop when the validation loss stops improving."""

    patience: int | None = Field(
        None, ge=1, description="Evaluations without improvement before stopping; null = never stop early."
    )
    min_delta: float = Field(0.0, ge=0.0, description="Smallest decrease of val loss that counts as improvement.")


class EvaluationConfig(AvaSection):
    """What is shown at the end of training."""

    sample_prompt: str = Field("ROMEO:", description="Prompt of the text sample generated after training.")
    sample_max_new_tokens: int = Field(64, ge=0, description="Length of that sample; 0 = no sample.")
    sample_temperature: float = Field(0.8, ge=0.0, description="Sampling temperature (0 = greedy).")
    sample_top_k: int | None = Field(50, ge=1, description="Top-k filter of that sample.")
    early_stopping: EarlyStoppingConfig = Field(
        default_factory=EarlyStoppingConfig, description="Early stopping on validation loss."
    )


class CheckpointConfig(AvaSection):
    """Which checkpoints are written and kept."""

    keep_last: int | None = Field(3, ge=1, description="Keep the N most recent checkpoints; null = keep all.")
    keep_best: int = Field(
        1, ge=0, description="Also keep the N checkpoints with the lowest val loss (linked as `best`); 0 = off."
    )
    async_save: bool = Field(
        False, description="Snapshot the state in memory and write it from a background thread."
    )


class HealthConfig(AvaSection):
    """Gradient health: non-finite and spiking steps are skipped; repeated bad steps roll back."""

    enabled: bool = Field(True, description="Check every step's loss and gradient norm.")
    spike_zscore: float | None = Field(
        6.0, gt=0.0, description="A loss this many running std-devs above its running mean is a spike; null = off."
    )
    spike_warmup: int = Field(20, ge=1, description="Steps of loss statistics gathered before spikes are flagged.")
    spike_window: int = Field(100, ge=2, description="Window (EMA span, in steps) of the running loss statistics.")
    rollback_after: int | None = Field(
        3, ge=1, description="Consecutive bad steps after which the last good checkpoint is restored; null = never."
    )
    layer_grad_norms_every: int = Field(
        0, ge=0, description="Log per-layer gradient norms every N steps; 0 = off."
    )


class GradientConfig(AvaSection):
    """Gradient handling beyond clipping (training.grad_clip)."""

    health: HealthConfig = Field(default_factory=HealthConfig, description="NaN/spike detection, skipping, rollback.")
    surgery: SurgeryConfig = Field(default_factory=SurgeryConfig, description="Multi-objective gradient surgery.")


class SeqLenWarmupConfig(AvaSection):
    """Sequence-length warmup: train on shorter rows first, same tokens per step."""

    start: int | None = Field(
        None, ge=1,
        description="Row length at step 0; it grows linearly to data.seq_len over `steps` optimizer steps, "
        "rounded down to a multiple of `multiple_of` (never below start). Each data.seq_len window is cut "
        "into floor(seq_len/t) rows of t tokens (the remainder of a window is not trained on). null = off.",
    )
    steps: int = Field(0, ge=0, description="Optimizer steps over which the row length reaches data.seq_len.")
    multiple_of: int = Field(8, ge=1, description="Round the scheduled row length down to a multiple of this.")


class BatchSizeRampConfig(AvaSection):
    """Batch-size ramp: fewer windows per micro-batch early in training."""

    start: int | None = Field(
        None, ge=1,
        description="Windows per micro-batch at step 0; grows linearly (rounded down) to training.batch_size "
        "over `steps` optimizer steps. grad_accum_steps stays fixed. null = off.",
    )
    steps: int = Field(0, ge=0, description="Optimizer steps over which the micro-batch reaches training.batch_size.")


class CurriculumConfig(AvaSection):
    """Curriculum: the first steps see their windows ordered from easy to hard."""

    by: Literal["none", "distinct_tokens", "rarity"] = Field(
        "none",
        description="Difficulty score of a training window. distinct_tokens: number of distinct token ids; "
        "rarity: mean -log p(token) under the training split's unigram counts. (Windows all have data.seq_len "
        "tokens, so a length curriculum is seq_len_warmup.) none = off.",
    )
    steps: int = Field(
        0, ge=0,
        description="The windows of the first `steps` optimizer steps of epoch 0 (those the seeded random "
        "order would give them) are sorted easy to hard; the rest of the run keeps the seeded random order.",
    )


class ProgressiveConfig(AvaSection):
    """Progressive training (training/progressive_training.py); everything off by default."""

    seq_len_warmup: SeqLenWarmupConfig = Field(
        default_factory=SeqLenWarmupConfig, description="Sequence-length warmup."
    )
    batch_size_ramp: BatchSizeRampConfig = Field(
        default_factory=BatchSizeRampConfig, description="Micro-batch size ramp."
    )
    curriculum: CurriculumConfig = Field(
        default_factory=CurriculumConfig, description="Easy-to-hard ordering of the first steps."
    )


class PerformanceConfig(AvaSection):
    """Presets trading observability for speed; any key set explicitly wins over the preset."""

    mode: Literal["fast", "balanced", "thorough"] = Field(
        "balanced",
        description="fast: log every 50 steps, no timing syncs; balanced: the defaults; "
        "thorough: log every step, per-layer grad norms every 10, eval every 50.",
    )


# (section, key) -> value for each performance mode; "balanced" equals the field defaults.
PERFORMANCE_PRESETS: dict[str, dict[tuple[str, ...], Any]] = {
    "fast": {
        ("training", "log_every"): 50,
        ("logging", "time_breakdown"): False,
        ("gradient", "health", "layer_grad_norms_every"): 0,
    },
    "balanced": {},
    "thorough": {
        ("training", "log_every"): 1,
        ("training", "eval_every"): 50,
        ("logging", "time_breakdown"): True,
        ("gradient", "health", "layer_grad_norms_every"): 10,
    },
}


class RunConfig(AvaSection):
    """Run identity: name, output folder, seed and device."""

    name: str = Field("ava", min_length=1, description="Run name; the folder is <output_dir>/<name>_<timestamp>.")
    output_dir: str = Field("runs", description="Folder that holds run folders.")
    seed: int = Field(1337, description="Seed of every random number generator.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = cuda when available, else cpu."
    )
    num_threads: int | None = Field(
        None, ge=1, description="CPU threads for torch; null = torch's default."
    )

    @field_validator("name")
    @classmethod
    def _name_is_a_folder_name(cls, name: str) -> str:
        if "/" in name or "\\" in name or name in {".", ".."}:
            raise ValueError("must be a plain folder name without slashes, e.g. 'moe-small'")
        return name


# --------------------------------------------------------------------------------------------
# the whole config
# --------------------------------------------------------------------------------------------


class EnhancedTrainingConfig(AvaSection):
    """Everything that defines a training run; saved resolved into each run folder."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="Model architecture.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="Training loop.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training data and tokenizer.")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig, description="Optimizer.")
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig, description="LR schedule.")
    precision: PrecisionConfig = Field(default_factory=PrecisionConfig, description="Precision.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Evaluation.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    gradient: GradientConfig = Field(default_factory=GradientConfig, description="Gradient health.")
    progressive: ProgressiveConfig = Field(
        default_factory=ProgressiveConfig, description="Sequence-length warmup, batch-size ramp, curriculum."
    )
    performance: PerformanceConfig = Field(default_factory=PerformanceConfig, description="Speed presets.")
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity.")

    @model_validator(mode="after")
    def _resolve_cross_section(self) -> "EnhancedTrainingConfig":
        if self.data.seq_len is None:
            object.__setattr__(self.data, "seq_len", self.model.max_seq_len)
        if self.model.vocab_size is None:
            object.__setattr__(self.model, "vocab_size", _tokenizer_vocab_size(self.data.tokenizer))
        self._apply_performance_preset()
        return self

    def _apply_performance_preset(self) -> None:
        """Fill the keys of the chosen performance mode that the user did not set explicitly."""
        for path, value in PERFORMANCE_PRESETS[self.performance.mode].items():
            section: BaseModel = self
            for name in path[:-1]:
                section = getattr(section, name)
            if path[-1] not in section.model_fields_set:
                object.__setattr__(section, path[-1], value)

    # -- I/O --------------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "EnhancedTrainingConfig":
        """Load, override, validate and resolve a YAML config.

        Args:
            path: the YAML file.
            overrides: dotted ``key=value`` strings applied before validation
                (``training.learning_rate=3e-4``).

        Returns:
            The resolved config.

        Raises:
            AvaConfigError: unreadable file, unknown key (with the nearest valid key), bad value
                or contradictory combination; one line naming the key and the fix.
        """
        from .loading import load_config

        return load_config(path, overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>") -> "EnhancedTrainingConfig":
        """Validate a plain dict (as loaded from YAML); errors name ``source``."""
        from .loading import validate_config

        return validate_config(data, source)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of the resolved config."""
        return json.loads(self.model_dump_json())

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The resolved config as YAML; also written to ``path`` when given."""
        import yaml

        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def _tokenizer_vocab_size(tokenizer: TokenizerConfig) -> int:
    """Vocabulary size of the configured tokenizer, read from its file when one is given."""
    if tokenizer.path is None:
        return tokenizer.vocab_size
    path = Path(tokenizer.path)
    if not path.is_file():
        # Reported by feature_compatibility with the key name; keep a usable size meanwhile.
        return tokenizer.vocab_size
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception:  # malformed file: reported by feature_compatibility with the key name
        return tokenizer.vocab_size
