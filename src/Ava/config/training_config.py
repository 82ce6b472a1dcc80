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
    router: Literal["softmax"] = Field(
        "softmax", description="Router type. softmax: top-k of softmax(x·W_g) (Mixtral/Qwen3-MoE)."
    )
    norm_topk_prob: bool = Field(
        True, description="Renormalise the top-k router probabilities to sum to 1 (Qwen3-MoE)."
    )
    moe_intermediate_size: int | None = Field(
        None, ge=1, description="Hidden width of each routed expert; null = 8/3·hidden_size, rounded."
    )
    aux_loss_coef: float = Field(
        0.01, ge=0.0, description="Switch/GShard load-balancing loss coefficient α (0 disables it)."
    )
    z_loss_coef: float = Field(
        0.001, ge=0.0, description="Router z-loss coefficient (ST-MoE; 0 disables it)."
    )
    first_dense_layers: int = Field(
        0, ge=0, description="The first k decoder layers use a dense SwiGLU MLP instead of experts."
    )
    backend: Literal["loop", "grouped"] = Field(
        "grouped",
        description="Expert kernel: grouped (sorted tokens + torch._grouped_mm) or loop (reference).",
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


class OptimizerConfig(AvaSection):
    """Optimizer. Norms, biases and embeddings get no weight decay."""

    name: Literal["adamw"] = Field("adamw", description="Optimizer: adamw (fused/foreach where available).")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay of matrices.")
    betas: tuple[float, float] = Field((0.9, 0.95), description="Adam β1, β2.")
    eps: float = Field(1e-8, gt=0.0, description="Adam ε.")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError("each beta must be in [0, 1), e.g. [0.9, 0.95]")
        return betas


class SchedulerConfig(AvaSection):
    """Learning-rate schedule: linear warmup, then the named decay."""

    name: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Decay after warmup: cosine or linear to lr_end, or constant."
    )
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps from 0 to the peak LR.")
    lr_end: float | None = Field(
        None, ge=0.0, description="LR at the last step; null = learning_rate / 10."
    )


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
