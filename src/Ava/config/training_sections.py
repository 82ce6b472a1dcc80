"""The sections that steer a training run: loop, optimizer, schedule, precision, distribution,
logging, evaluation, checkpoints, gradient health and surgery, progressive training, performance presets, run.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import AvaSection


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
    window: int = Field(
        50, ge=1, description="Steps over which an expert must stay unused to count as dead; with action: warn "
        "also the least number of steps between two warnings.",
    )
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
    grad_accum_steps: int = Field(
        1, ge=1,
        description="Micro-batches accumulated per optimizer step (per rank); derived when global_batch_size is set.",
    )
    global_batch_size: int | None = Field(
        None, ge=1,
        description="Sequences per optimizer step over all ranks: it, not the number of ranks, defines the "
        "optimization and the data order, so a run resumes on another number of ranks. Must be a multiple of "
        "batch_size × data-parallel ranks; grad_accum_steps is then derived. null = batch_size × grad_accum_steps "
        "× data-parallel ranks.",
    )
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
        None, strict=False,  # a YAML list becomes the tuple; its items stay strict floats
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
    warmup_steps: int = Field(
        100, ge=0, description="Optimizer steps of warmup from 0 to the peak LR; a warmup as long as the run or "
        "longer becomes 10% of the run (at least 1 step)."
    )
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


class FP8Config(AvaSection):
    """FP8 training (``optimization/fp8_training.py``; guide: ``docs/precision.md``)."""

    enabled: bool = Field(
        False,
        description="Run the GEMMs of attention, dense MLPs (and experts, see `experts`) in FP8; embeddings, "
        "routers, norms and lm_head stay in high precision.",
    )
    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise",
        description="Scaling: tensorwise = one scale per tensor (e4m3 forward, e5m2 gradients); rowwise = one "
        "power-of-2 scale per row along each GEMM's inner dimension (e4m3 everywhere), as torchao's recipes.",
    )
    experts: bool = Field(True, description="Also run the routed experts' 3-D weights in FP8.")
    emulate: bool = Field(
        False,
        description="Emulate FP8 (quantize→dequantize with the recipe's scales, GEMMs in fp32) instead of real FP8 "
        "GEMMs: needed on CPU and on GPUs without FP8 (compute capability < 8.9); for studying FP8 numerics, "
        "not speed.",
    )


class QATConfig(AvaSection):
    """Quantization-aware training (``optimization/qat.py``; guide: ``docs/precision.md``)."""

    bits: Literal[8, 4] = Field(
        8, description="8: INT8 per output row (as `ava quantize --int8`); 4: INT4 group-wise (as `--int4`)."
    )
    group_size: Literal[32, 64, 128] | None = Field(
        None, description="bits 4: weights per scale along the input dimension (null = 32); bits 8: null."
    )
    start_step: int = Field(
        0, ge=0, description="Optimizer step from which the forward uses fake-quantized weights (0 = from the start)."
    )

    @model_validator(mode="after")
    def _group_for_int4(self) -> "QATConfig":
        if self.bits == 8 and self.group_size is not None:
            raise ValueError("group_size applies to bits 4 only (int8 has one scale per output row, as "
                             "`ava quantize --int8`); set group_size: null")
        return self


class PrecisionConfig(AvaSection):
    """Numeric precision of the forward/backward pass (master weights stay fp32)."""

    dtype: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="fp32; bf16 autocast (CPU and CUDA) with fp32 master weights; or fp16 autocast with fp32 "
        "master weights and dynamic loss scaling (one process or ddp).",
    )
    param_dtype: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Storage of the model's weights while training: fp32, or bf16 with fp32 master copies in "
        "the optimizer (no per-step weight casts, half the weight memory; needs dtype bf16).",
    )
    loss_scale_init: float = Field(
        2.0**16, gt=0.0, description="fp16: the initial loss scale (halved after every overflowing step)."
    )
    loss_scale_growth_interval: int = Field(
        2000, ge=1, description="fp16: clean steps in a row after which the loss scale doubles."
    )
    fp8: FP8Config = Field(default_factory=FP8Config, description="FP8 training (see the fp8 keys).")
    qat: QATConfig | None = Field(
        None,
        description="Quantization-aware training, e.g. {bits: 4, group_size: 32, start_step: 0}: weights "
        "fake-quantized in the forward as `ava quantize` would, gradients straight through; null = off.",
    )

    @model_validator(mode="after")
    def _fp8_combinations(self) -> "PrecisionConfig":
        if self.fp8.enabled and self.dtype == "fp16":
            raise ValueError("fp8 training runs with dtype bf16 or fp32, not fp16 (FP8 scales already cover "
                             "the range loss scaling is for); set precision.dtype: bf16")
        if self.fp8.enabled and self.qat is not None:
            raise ValueError("fp8 training and qat both rewrite the forward's weights; use one of them")
        if self.param_dtype == "bf16" and self.dtype != "bf16":
            raise ValueError(f"param_dtype bf16 computes in bf16: set dtype: bf16 (now {self.dtype}), or "
                             "param_dtype: fp32")
        if self.param_dtype == "bf16" and (self.fp8.enabled or self.qat is not None):
            raise ValueError("param_dtype bf16 with fp8 training or qat is not supported; use param_dtype: fp32")
        return self


class DistributedConfig(AvaSection):
    """How training is spread over processes (``training/parallel.py``; guide: ``docs/distributed.md``).

    Launch with ``torchrun --nproc_per_node N -m Ava train CONFIG`` (or ``ava train CONFIG --nproc N``
    on one machine); one process without torchrun is ``strategy: none`` whatever is set here.
    """

    strategy: Literal["auto", "none", "ddp", "fsdp2"] = Field(
        "auto",
        description="auto: none for one process; fsdp2 when the model's parameters + AdamW state (16 bytes per "
        "parameter) would not fit one GPU, else ddp. ddp: every rank holds the whole model, gradients all-reduced "
        "(DistributedDataParallel). fsdp2: parameters, gradients and optimizer state sharded over the ranks "
        "(fully_shard). none: one process only.",
    )
    expert_parallel: int = Field(
        1, ge=1,
        description="Expert-parallel size N: each rank holds num_experts / N routed experts and token rows travel "
        "to them by all-to-all; ranks form a (world / N) × N data × expert mesh. 1 = every rank holds every expert.",
    )
    backend: Literal["auto", "nccl", "gloo"] = Field(
        "auto", description="Collective backend: auto = nccl on CUDA, gloo on CPU."
    )
    timeout_s: float = Field(
        600.0, gt=0,
        description="Seconds a collective may wait for the other ranks; a dead or hung rank ends the job after "
        "this long, naming the rank (the first step may compile or read data for longer: raise it then).",
    )
    health_every: int = Field(
        50, ge=0,
        description="Every N steps compare the ranks: stragglers, loss/grad-norm outliers, and replicas that "
        "drifted apart (a parameter checksum; the run stops). 0 = off.",
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
    every_minutes: float | None = Field(
        5.0, gt=0.0,
        description="Also save when this many minutes of training passed since the last checkpoint (kept by "
                    "keep_last), so a crash loses at most that much work; null = only training.save_every and "
                    "the final save.",
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
    """Speed: presets trading observability for speed (any key set explicitly wins over the preset),
    the CPU allocator, torch.compile and activation checkpointing."""

    mode: Literal["fast", "balanced", "thorough"] = Field(
        "balanced",
        description="fast: log every 50 steps, no timing syncs; balanced: the defaults; "
        "thorough: log every step, per-layer grad norms every 10, eval every 50.",
    )
    cpu_allocator: Literal["tuned", "default"] = Field(
        "tuned",
        description="tuned: on Linux/glibc keep large CPU tensors in the malloc heap (mallopt) instead of fresh "
        "page-faulted mmap pages every step (measured 1.16-1.19x training steps on CPU; RSS then stays at its peak); "
        "default: leave the allocator alone.",
    )
    compile: bool = Field(
        False,
        description="torch.compile each decoder layer's training forward (the routed experts stay eager); "
        "evaluation and generation run eager. The first step is slow (compilation); needs a C++ compiler "
        "on CPU, Triton on CUDA (checked before the run starts). See docs/training.md.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in backward instead of keeping them "
        "(torch.utils.checkpoint, non-reentrant): less activation memory for about one more forward pass "
        "per step. Training only.",
    )


class MemoryConfig(AvaSection):
    """Episodic replay memory (memory/episodic_memory.py, docs/episodic_memory.md); off by default."""

    enabled: bool = Field(
        False, description="Keep a bounded memory of training sequences and replay them in later micro-batches."
    )
    capacity: int = Field(
        1024, ge=1,
        description="Sequences kept; when full, the ones of lowest importance are evicted. Saved in every "
        "checkpoint (capacity × data.seq_len token ids per key of the batch).",
    )
    replay_ratio: float = Field(
        0.25, ge=0.0, lt=1.0,
        description="Share of each micro-batch's rows replaced by sequences from the memory: round(ratio × rows), "
        "rounded half up, at most rows − 1 (fewer while the memory holds fewer).",
    )
    score: Literal["loss", "grad_norm", "surprise"] = Field(
        "loss",
        description="Importance of a sequence. loss: its mean next-token cross-entropy; grad_norm: the norm of the "
        "loss gradient with respect to its final hidden states (read from the backward); surprise: its loss "
        "minus the running mean of the loss. Replayed sequences are rescored each time they are replayed.",
    )
    retrieval: Literal["importance", "cosine", "euclidean"] = Field(
        "importance",
        description="Which stored sequences are replayed. importance: sampled with probability proportional to "
        "importance (seeded by run.seed); cosine / euclidean: the nearest to the mean-pooled final hidden states "
        "of the previous micro-batch (the sequences stored from that micro-batch excluded).",
    )
    start_step: int = Field(
        0, ge=0, description="Replay from this optimizer step on; the memory is filled from the first step."
    )
    context_items: int = Field(
        0, ge=0,
        description="0 = off. k > 0: the memory is also the cross-attention context (model.cross_attention): "
        "each row attends to the stored hidden-state embeddings of the k items whose keys (mean input token "
        "embeddings) are nearest, by cosine, to the row's own; missing items are masked. Needs "
        "model.cross_attention.every ≥ 1 and context_size null (= hidden_size); `ava generate --memory-context` "
        "does the same for a prompt.",
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
