"""Rules that reject contradictory settings and warn on risky ones.

Each rule looks at the resolved config (and, when ``environment=True``, at the machine: files,
CUDA, bf16 support) and returns :class:`Issue` objects. All issues are collected before anything
is raised, so a user sees every problem of a config at once.
"""

from __future__ import annotations

import glob
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import AvaConfigError

if TYPE_CHECKING:
    from .data_config import DataConfig
    from .model_config import ModelConfig
    from .training_sections import (
        GradientConfig,
        LoggingConfig,
        OptimizerConfig,
        PerformanceConfig,
        PrecisionConfig,
        ProgressiveConfig,
        RunConfig,
        SchedulerConfig,
        TrainingSection,
    )

logger = logging.getLogger(__name__)


class ConfigSections(Protocol):
    """The sections of an :class:`~Ava.config.EnhancedTrainingConfig` the rules read.

    A structural type, so this module needs only the section models: the whole config
    (``training_config.py``) builds on this module and checks itself with it when it is loaded.
    """

    model: ModelConfig
    data: DataConfig
    training: TrainingSection
    optimizer: OptimizerConfig
    scheduler: SchedulerConfig
    precision: PrecisionConfig
    logging: LoggingConfig
    gradient: GradientConfig
    progressive: ProgressiveConfig
    performance: PerformanceConfig
    run: RunConfig

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of the resolved config."""


@dataclass(frozen=True)
class Issue:
    """One problem with a config: the dotted key, what is wrong and how to fix it."""

    key: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def check_compatibility(config: ConfigSections, *, environment: bool = False) -> list[Issue]:
    """Every issue of ``config``: structural rules always, machine rules when ``environment``."""
    issues = _model_rules(config) + _training_rules(config)
    issues += _memory_rules(config)
    issues += _finetune_rules(config)
    if environment:
        issues += _environment_rules(config)
    return issues


def raise_on_errors(issues: list[Issue], source: str, log_warnings: bool = True) -> list[Issue]:
    """Raise one :class:`AvaConfigError` listing every error; return (and log) the warnings.

    Args:
        log_warnings: log each warning. Loading a config does not (the trainer, which checks the
            config again against the machine, logs them once; ``ava config check`` prints them).
    """
    errors = [issue for issue in issues if issue.severity == "error"]
    warnings = [issue for issue in issues if issue.severity == "warning"]
    if errors:
        raise AvaConfigError(f"{source}: " + "; ".join(str(issue) for issue in errors))
    if log_warnings:
        for issue in warnings:
            logger.warning("%s: %s", source, issue)
    return warnings


def model_issues(m: "ModelConfig") -> list[Issue]:
    """Structural rules of the model section alone (also checked when a model is built)."""
    issues = []
    if m.vocab_size is None:  # only a bare ModelConfig: EnhancedTrainingConfig derives it
        issues.append(Issue(
            "model.vocab_size",
            "unset; set it (or load the config through EnhancedTrainingConfig, which takes it from the tokenizer)",
        ))
    if m.moe.top_k > m.num_experts:
        issues.append(Issue(
            "model.moe.top_k",
            f"{m.moe.top_k} is more than model.num_experts={m.num_experts}; set top_k ≤ num_experts",
        ))
    if m.head_dim is None:  # left null by ModelConfig only when hidden_size/num_heads is not whole
        issues.append(Issue(
            "model.num_heads",
            f"hidden_size={m.hidden_size} is not divisible by num_heads={m.num_heads}, so model.head_dim "
            "(null) cannot be derived; pick num_heads that divides hidden_size or set model.head_dim",
        ))
    elif m.head_dim % 2:
        issues.append(Issue(
            "model.head_dim",
            f"{m.head_dim} is odd but RoPE rotates channel pairs; set an even model.head_dim (when it is "
            "derived as hidden_size/num_heads, change num_heads)",
        ))
    if m.qk_norm_scope != "head" and not m.qk_norm:
        issues.append(Issue(
            "model.qk_norm_scope",
            f"{m.qk_norm_scope} has no effect with model.qk_norm=false; set qk_norm: true or drop it",
            "warning",
        ))
    if m.num_heads % m.num_kv_heads:
        issues.append(Issue(
            "model.num_kv_heads",
            f"num_heads={m.num_heads} is not divisible by num_kv_heads={m.num_kv_heads}; "
            "pick num_kv_heads that divides num_heads",
        ))
    if m.moe.first_dense_layers > m.num_layers:
        issues.append(Issue(
            "model.moe.first_dense_layers",
            f"{m.moe.first_dense_layers} is more than model.num_layers={m.num_layers}; lower it",
        ))
    elif m.moe.first_dense_layers == m.num_layers:
        issues.append(Issue(
            "model.moe.first_dense_layers", "every layer is dense, so the model has no experts", "warning"
        ))
    return issues + _moe_issues(m) + _loss_issues(m) + _attention_issues(m)


def _loss_issues(m: "ModelConfig") -> list[Issue]:
    """Rules of ``model.mtp`` and ``model.loss``."""
    issues = []
    if m.mtp.num_heads >= m.max_seq_len - 1:
        issues.append(Issue(
            "model.mtp.num_heads",
            f"{m.mtp.num_heads} head{'' if m.mtp.num_heads == 1 else 's'} need{'s' if m.mtp.num_heads == 1 else ''} sequences longer than num_heads + 1 (head j predicts token i+j+1) but "
            f"model.max_seq_len={m.max_seq_len}; lower num_heads (V3 uses 1)",
        ))
    if m.mtp.num_heads > 0 and m.mtp.loss_weight == 0:
        issues.append(Issue(
            "model.mtp.loss_weight", "0 with MTP heads on: the heads cost compute but are never trained; "
            "set loss_weight > 0 (e.g. 0.3) or num_heads: 0", "warning",
        ))
    if m.loss.focal_gamma > 0 and m.loss.label_smoothing > 0:
        issues.append(Issue(
            "model.loss.focal_gamma",
            f"focal_gamma={m.loss.focal_gamma} with label_smoothing={m.loss.label_smoothing}: focal loss scales the "
            "true token's log-likelihood, smoothing replaces that target; set one of them to 0",
        ))
    if m.loss.fused_head == "on" and (m.loss.focal_gamma > 0 or m.loss.chunk_size is not None):
        key = "model.loss.focal_gamma" if m.loss.focal_gamma > 0 else "model.loss.chunk_size"
        issues.append(Issue(
            "model.loss.fused_head",
            f"on with {key} set: the fused head computes (smoothed) cross-entropy without logits, so it cannot "
            f"apply the focal loss or the logits-based chunking; set fused_head: auto (or off), or unset {key}",
        ))
    weighted = m.loss.uncertainty_weighting
    available = [term for term in model_loss_terms(m) if term != "uncertainty"]
    unknown = [term for term in weighted if term not in available]
    if unknown:
        issues.append(Issue(
            "model.loss.uncertainty_weighting",
            f"{unknown} are not loss terms of this model (available: {available}); a zero coefficient "
            "(or mtp.num_heads 0) removes a term",
        ))
    if len(set(weighted)) != len(weighted):
        issues.append(Issue("model.loss.uncertainty_weighting", f"{weighted} lists a term twice; list each once"))
    return issues


def _attention_issues(m: "ModelConfig") -> list[Issue]:
    """Rules of ``model.attention`` with ``model.moh``, ``model.moa`` and ``model.cross_attention``."""
    issues = []
    if m.attention == "moh":
        moh, H = m.moh, m.num_heads
        routed = H - moh.shared_heads
        if routed < 1:
            issues.append(Issue(
                "model.moh.shared_heads",
                f"{moh.shared_heads} leaves no routed head among model.num_heads={H}; set shared_heads below num_heads",
            ))
        elif moh.top_k > routed:
            issues.append(Issue(
                "model.moh.top_k",
                f"{moh.top_k} is more than the {routed} routed head{'' if routed == 1 else 's'} (num_heads={H} − shared_heads="
                f"{moh.shared_heads}); set top_k ≤ {routed}",
            ))
        elif moh.top_k == routed:
            issues.append(Issue(
                "model.moh.top_k",
                f"{moh.top_k} selects every routed head, so no head is ever skipped (MoH only reweights the heads); "
                f"lower top_k below {routed} or use model.attention: standard",
                "warning",
            ))
    if m.attention == "moa":
        moa = m.moa
        if moa.top_k > moa.num_experts:
            issues.append(Issue(
                "model.moa.top_k",
                f"{moa.top_k} is more than model.moa.num_experts={moa.num_experts}; set top_k ≤ num_experts",
            ))
        if m.num_kv_heads != 1:
            issues.append(Issue(
                "model.num_kv_heads",
                f"{m.num_kv_heads} with model.attention: moa, whose head experts share one key/value head; "
                "set num_kv_heads: 1 (or null)",
            ))
    if m.cross_attention.every > m.num_layers:
        issues.append(Issue(
            "model.cross_attention.every",
            f"{m.cross_attention.every} leaves no cross-attention block among the "
            f"{m.num_layers} layer{'' if m.num_layers == 1 else 's'} (layer i has one when (i+1) % every == 0); lower it or "
            "set 0",
            "warning",
        ))
    return issues


def attention_balance_coef(m: "ModelConfig") -> float:
    """The coefficient of the head router's balancing term (``moh``/``moa`` aux_loss_coef); 0 otherwise."""
    if m.attention == "moh":
        return m.moh.aux_loss_coef
    if m.attention == "moa":
        return m.moa.aux_loss_coef
    return 0.0


_SCORE_ROUTERS = ("softmax", "sigmoid", "switch", "noisy_topk")  # token-choice over learned scores


def _moe_issues(m: "ModelConfig") -> list[Issue]:
    """Contradictions between router, capacity, groups and balancing settings of ``model.moe``."""
    moe, E = m.moe, m.num_experts
    issues = []
    if moe.router == "switch" and moe.top_k != 1:
        issues.append(Issue(
            "model.moe.top_k", f"router switch routes each token to one expert but top_k={moe.top_k}; set top_k: 1"
        ))
    if moe.router == "expert_choice" and moe.capacity_factor is None:
        issues.append(Issue(
            "model.moe.capacity_factor",
            "router expert_choice needs a capacity factor (each expert takes c = CF·T·top_k/E tokens) but it is "
            "null (dropless); set capacity_factor, e.g. 1.0",
        ))
    if moe.router == "expert_choice":
        issues.append(Issue(
            "model.moe.router",
            "expert_choice picks tokens by comparing them across the whole batch, so a token's routing depends "
            "on later tokens (a causal leak at training time, and different behaviour at generation)",
            "warning",
        ))
    if (moe.n_groups is None) != (moe.topk_groups is None):
        issues.append(Issue(
            "model.moe.topk_groups" if moe.topk_groups is None else "model.moe.n_groups",
            "group-limited routing needs both n_groups and topk_groups; set both or neither",
        ))
    elif moe.n_groups is not None:
        if moe.router not in _SCORE_ROUTERS:
            issues.append(Issue(
                "model.moe.n_groups",
                f"group-limited routing applies to {list(_SCORE_ROUTERS)} routers, not {moe.router}; "
                "set n_groups and topk_groups to null",
            ))
        if E % moe.n_groups:
            issues.append(Issue(
                "model.moe.n_groups",
                f"num_experts={E} is not divisible by n_groups={moe.n_groups}; pick a divisor of num_experts",
            ))
        elif moe.topk_groups > moe.n_groups:
            issues.append(Issue(
                "model.moe.topk_groups", f"{moe.topk_groups} is more than n_groups={moe.n_groups}; lower it"
            ))
        elif moe.top_k > moe.topk_groups * (E // moe.n_groups):
            issues.append(Issue(
                "model.moe.topk_groups",
                f"the {moe.topk_groups} kept groups hold {moe.topk_groups * (E // moe.n_groups)} experts, fewer "
                f"than top_k={moe.top_k}; raise topk_groups",
            ))
    if moe.aux_free_bias and moe.router not in _SCORE_ROUTERS:
        issues.append(Issue(
            "model.moe.aux_free_bias",
            f"the balancing bias shifts learned scores, but router {moe.router} does not select by them "
            f"(hash is fixed, expert_choice is balanced by construction); use one of {list(_SCORE_ROUTERS)} "
            "or set aux_free_bias: false",
        ))
    if moe.coef_schedules.bias_update_rate is not None and not moe.aux_free_bias:
        issues.append(Issue(
            "model.moe.coef_schedules.bias_update_rate",
            "set but aux_free_bias is false, so there is no bias to update; set aux_free_bias: true or remove "
            "the schedule",
            "warning",
        ))
    if moe.eval_capacity_factor is not None and moe.capacity_factor is None and moe.router != "expert_choice":
        issues.append(Issue(
            "model.moe.eval_capacity_factor",
            "set but capacity_factor is null: training is dropless while evaluation drops tokens; set "
            "capacity_factor too or remove eval_capacity_factor",
            "warning",
        ))
    if moe.first_dense_layers < m.num_layers and not any(
        (i + 1) % moe.moe_every == 0 for i in range(moe.first_dense_layers, m.num_layers)
    ):
        issues.append(Issue(
            "model.moe.moe_every",
            f"{moe.moe_every} leaves no MoE layer among the {m.num_layers} layer{'' if m.num_layers == 1 else 's'} (layer i is MoE when "
            "(i+1) % moe_every == 0); lower it",
            "warning",
        ))
    return issues


def _model_rules(config: ConfigSections) -> list[Issue]:
    m = config.model
    issues = model_issues(m)
    if config.data.seq_len > m.max_seq_len:
        issues.append(Issue(
            "data.seq_len",
            f"{config.data.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len",
        ))
    elif m.mtp.num_heads >= config.data.seq_len - 1:
        issues.append(Issue(
            "model.mtp.num_heads",
            f"{m.mtp.num_heads} head{'' if m.mtp.num_heads == 1 else 's'} need{'s' if m.mtp.num_heads == 1 else ''} training sequences longer than num_heads + 1 but data.seq_len="
            f"{config.data.seq_len}; lower num_heads or raise data.seq_len",
        ))
    chunk = m.loss.chunk_size
    if chunk is not None and chunk >= config.data.seq_len - 1:
        issues.append(Issue(
            "model.loss.chunk_size",
            f"{chunk} covers the whole training sequence (data.seq_len={config.data.seq_len}), so chunking saves "
            "no memory and only adds the backward recomputation; use a smaller chunk or null",
            "warning",
        ))
    return issues + _vocab_rules(config)


# A byte-level BPE holds the 256 bytes and Ava's 2 special tokens before any merge;
# data.tokenizer.vocab_size's own minimum (data_config.py) leaves room for a few merges.
MIN_TRAINED_VOCAB = 260


def trains_tokenizer(data: DataConfig) -> bool:
    """Whether Ava trains the tokenizer (no ``data.tokenizer.path``, no prepared shards)."""
    return data.tokenizer.path is None and data.prepared is None


def vocab_size_is_derived(model: ModelConfig) -> bool:
    """Whether ``model.vocab_size`` comes from the tokenizer (left null) rather than from the user.

    The resolved config keeps a derived size out of ``model_fields_set``; a config read back from
    a run folder's ``config.yaml`` holds the size as written, so it counts as set.
    """
    return model.vocab_size is None or "vocab_size" not in model.model_fields_set


def _vocab_rules(config: ConfigSections) -> list[Issue]:
    """A user-set model.vocab_size against the tokenizer Ava trains (it is that tokenizer's target)."""
    m, tok = config.model, config.data.tokenizer
    if vocab_size_is_derived(m) or not trains_tokenizer(config.data):
        return []
    assert m.vocab_size is not None
    if "vocab_size" in tok.model_fields_set and m.vocab_size < tok.vocab_size:
        return [Issue(
            "model.vocab_size",
            f"{m.vocab_size} is smaller than data.tokenizer.vocab_size={tok.vocab_size}, the size of the tokenizer "
            "Ava trains, so its ids would not fit the embedding; raise model.vocab_size or lower "
            "data.tokenizer.vocab_size (or set only one: the other follows it)",
        )]
    if m.vocab_size < MIN_TRAINED_VOCAB:
        return [Issue(
            "model.vocab_size",
            f"{m.vocab_size} is the size of the tokenizer Ava trains (data.tokenizer.vocab_size follows it), but a "
            f"byte-level BPE needs at least {MIN_TRAINED_VOCAB} tokens (256 bytes, 2 special tokens, merges); "
            f"raise it to {MIN_TRAINED_VOCAB} or more, set it null to take the tokenizer's size, or load a "
            "tokenizer (data.tokenizer.path)",
        )]
    return []


def _training_rules(config: ConfigSections) -> list[Issue]:
    t, s = config.training, config.scheduler
    issues = []
    # A warmup at least as long as the run is no problem: the schedule scales it to a share of
    # the run and logs that when the trainer builds it (Ava.training.lr_manager.effective_warmup).
    if s.lr_end is not None and s.lr_end > t.learning_rate:
        issues.append(Issue(
            "scheduler.lr_end",
            f"{s.lr_end} is above training.learning_rate={t.learning_rate}; set lr_end ≤ learning_rate",
        ))
    return (issues + _optimizer_rules(config) + _surgery_rules(config) + _progressive_rules(config) + _data_rules(config)
            + _batching_rules(config))


def _memory_rules(config: ConfigSections) -> list[Issue]:
    """``memory`` (episodic replay) against the batch it mixes into and the backward it reads."""
    memory = getattr(config, "memory", None)
    if memory is None:
        return []
    issues = _memory_context_rules(config)
    if not memory.enabled:
        return issues
    rows = config.training.batch_size
    replayed = max(0, math.floor(memory.replay_ratio * rows + 0.5))  # Ava.memory.episodic_memory.replay_rows
    if replayed >= rows:
        issues.append(Issue(
            "memory.replay_ratio",
            f"{memory.replay_ratio} of training.batch_size={rows} rounds to {replayed} replayed "
            f"row{'' if replayed == 1 else 's'}, leaving no fresh row; lower it below {(rows - 0.5) / rows:.3g} "
            "or raise batch_size",
        ))
    elif replayed == 0 and memory.replay_ratio > 0:
        issues.append(Issue(
            "memory.replay_ratio",
            f"{memory.replay_ratio} of training.batch_size={rows} rounds to 0 rows, so nothing is replayed; "
            f"raise it to at least {0.5 / rows:.3g} or raise batch_size",
            "warning",
        ))
    if memory.score == "grad_norm" and config.gradient.surgery.method != "none":
        issues.append(Issue(
            "memory.score",
            f"grad_norm reads the hidden states' gradient of one backward, gradient.surgery.method="
            f"{config.gradient.surgery.method} runs one per loss term; use score: loss or surprise, or method: none",
        ))
    if not getattr(config.data, "packing", True):
        issues.append(Issue(
            "memory.enabled",
            "replayed rows change the labelled positions that data.packing: false weighs each micro-batch's loss "
            "by (counted before the step); set memory.enabled: false or data.packing: true",
        ))
    return issues


def _memory_context_rules(config: ConfigSections) -> list[Issue]:
    """``memory.context_items``: the memory's items as the cross-attention blocks' context."""
    k = config.memory.context_items
    if not k:
        return []
    issues = []
    m = config.model
    if not config.memory.enabled:
        issues.append(Issue("memory.context_items", f"{k} reads the replay memory's items, and memory.enabled is "
                            "false; set memory.enabled: true or context_items: 0"))
    if m.cross_attention.every == 0 or m.cross_attention.every > m.num_layers:
        issues.append(Issue("memory.context_items", f"{k} is the context of the cross-attention blocks, and "
                            f"model.cross_attention.every={m.cross_attention.every} gives the {m.num_layers}-layer "
                            "model none; set model.cross_attention.every: N (1 ≤ N ≤ num_layers) or context_items: 0"))
    width = m.cross_attention.context_size
    if width is not None and width != m.hidden_size:
        issues.append(Issue("model.cross_attention.context_size", f"{width}, and memory.context_items passes "
                            f"the memory's hidden-state embeddings of width model.hidden_size={m.hidden_size}; set "
                            "context_size: null (or equal to hidden_size)"))
    return issues


def _data_rules(config: ConfigSections) -> list[Issue]:
    d, t = config.data, config.training
    issues = []
    if d.prepared is not None and d.sources:
        issues.append(Issue("data", "set either data.prepared (shards from `ava prepare`) or data.sources, not both"))
    elif d.prepared is not None and d.streaming:
        issues.append(Issue("data", "data.streaming reads data.sources; prepared shards are already memory-mapped"))
    elif d.streaming:
        if not d.sources:
            issues.append(Issue("data.streaming", "streaming reads data.sources; add sources or set streaming: false"))
        if t.max_steps is None:
            issues.append(Issue(
                "training.max_steps",
                "data.streaming has no length known in advance, so epochs cannot be counted; set training.max_steps",
            ))
        if d.dedup != "none" or d.max_documents is not None:
            issues.append(Issue(
                "data.dedup" if d.dedup != "none" else "data.max_documents",
                "needs every document at once, which data.streaming never holds; remove it, or deduplicate "
                "with `ava prepare` and train on data.prepared",
            ))
        if config.progressive.curriculum.by != "none" or config.progressive.batch_size_ramp.start is not None:
            issues.append(Issue(
                "progressive", "the curriculum and batch-size ramp need indexed data; turn them off with "
                "data.streaming or prepare the data (`ava prepare`) and use data.prepared",
            ))
    for i, source in enumerate(d.sources):
        if source.template is not None and source.chat is not None:
            issues.append(Issue(f"data.sources.{i}", "set either template or chat on a source, not both"))
    names = [s.name for s in d.sources if s.name is not None]
    if len(names) != len(set(names)):
        issues.append(Issue("data.sources", f"source names must be unique (got {names}); rename one"))
    return issues


def _optimizer_rules(config: ConfigSections) -> list[Issue]:
    t, s, o = config.training, config.scheduler, config.optimizer
    issues = []
    if o.name == "sophia" and config.precision.dtype == "fp16":
        issues.append(Issue(
            "optimizer.name",
            "sophia's Hessian refresh runs its own backward, which fp16 loss scaling does not cover; "
            "use precision.dtype: bf16 or fp32, or another optimizer",
        ))
    if o.name == "sophia" and config.precision.param_dtype == "bf16":
        issues.append(Issue(
            "precision.param_dtype",
            "sophia's Hessian estimate lives on the model's weights, not on fp32 master copies; use "
            "param_dtype: fp32 with sophia, or another optimizer",
        ))
    if config.precision.param_dtype == "bf16" and config.distributed.strategy == "fsdp2":
        issues.append(Issue(
            "precision.param_dtype",
            "bf16 weights with fp32 masters are not set up for fsdp2 (its shards are the optimizer's "
            "parameters); use distributed.strategy: ddp or none, or param_dtype: fp32",
        ))
    if o.name == "lion" and t.learning_rate >= 1e-3:
        issues.append(Issue(
            "training.learning_rate",
            f"{t.learning_rate} is an AdamW-sized LR; Lion's sign updates need a 3-10x smaller one "
            "(e.g. 3e-4) and a 3-10x larger weight_decay",
            "warning",
        ))
    if s.plateau.enabled:
        if s.plateau.min_lr > t.learning_rate:
            issues.append(Issue(
                "scheduler.plateau.min_lr",
                f"{s.plateau.min_lr} is above training.learning_rate={t.learning_rate}; lower the floor",
            ))
        if config.data.val_fraction == 0:
            issues.append(Issue(
                "scheduler.plateau.enabled",
                "plateau-adaptive LR watches the validation loss but data.val_fraction=0 holds none out; "
                "set data.val_fraction > 0 or disable the plateau",
            ))
    if s.warmup == "radam" and 0 < s.warmup_steps < 6:
        issues.append(Issue(
            "scheduler.warmup_steps",
            f"radam warmup over {s.warmup_steps} steps keeps the LR at 0 for the whole warmup "
            "(the rectification term is undefined while ρ_t ≤ 4); use ≥ 6 steps",
            "warning",
        ))
    return issues


def surgery_terms(config: ConfigSections) -> list[str]:
    """The loss terms the model produces under ``config`` (those surgery can act on)."""
    return model_loss_terms(config.model)


def model_loss_terms(m: "ModelConfig") -> list[str]:
    """``lm_loss`` and the keys of ``aux_losses`` a model built from ``m`` produces with labels."""
    terms = ["lm_loss"]
    if m.moe.first_dense_layers < m.num_layers:  # at least one MoE layer
        balanced = m.moe.router != "expert_choice"  # balanced by construction: no balance terms
        # coef_peak: a term exists when its coefficient or its schedule is ever > 0
        if balanced and m.moe.coef_peak("aux_loss_coef") > 0:
            terms.append("load_balance")
        if balanced and m.moe.coef_peak("seq_aux_loss_coef") > 0:
            terms.append("seq_load_balance")
        if balanced and m.moe.coef_peak("global_aux_loss_coef") > 0:
            terms.append("global_load_balance")
        if m.moe.coef_peak("z_loss_coef") > 0:
            terms.append("z_loss")
    if attention_balance_coef(m) > 0:  # model.attention moh / moa: the head router's balancing loss
        terms.append("attention_balance")
    if m.mtp.num_heads > 0:
        terms.append("mtp")
    if m.loss.uncertainty_weighting:
        terms.append("uncertainty")
    return terms


def _batching_rules(config: ConfigSections) -> list[Issue]:
    """``data.packing: false`` and ``data.max_tokens_per_batch`` against the paths that need packed rows."""
    d, t, p = config.data, config.training, config.progressive
    if d.packing:
        if d.max_tokens_per_batch is not None:
            return [Issue("data.max_tokens_per_batch", "packed rows all hold data.seq_len tokens, so a token budget "
                          "needs data.packing: false; set training.batch_size instead, or packing: false")]
        return []
    issues = []
    if d.streaming:
        issues.append(Issue("data.packing", "false needs every row's length up front, which data.streaming never "
                            "has; set streaming: false, or prepare the data (`ava prepare`) and use data.prepared"))
    if p.seq_len_warmup.start is not None or p.batch_size_ramp.start is not None or p.curriculum.by != "none":
        issues.append(Issue("progressive", "sequence-length warmup, batch-size ramp and curriculum schedule packed "
                            "windows; turn them off (start: null, curriculum.by: none) or set data.packing: true"))
    if config.gradient.surgery.method != "none":
        issues.append(Issue("gradient.surgery.method", "its per-term backward is not weighted per loss token as "
                            "data.packing: false needs; set method: none or data.packing: true"))
    memory = getattr(config, "memory", None)
    if memory is not None and memory.enabled:
        issues.append(Issue("memory.enabled", "replayed rows are packed windows and would change the step's loss "
                            "tokens counted for data.packing: false; set memory.enabled: false or data.packing: true"))
    if d.max_tokens_per_batch is not None:
        if t.global_batch_size is not None:
            issues.append(Issue("training.global_batch_size", "counts sequences, but data.max_tokens_per_batch "
                                "sizes micro-batches by tokens; set training.grad_accum_steps instead, or remove "
                                "max_tokens_per_batch"))
        seq_len = d.seq_len or config.model.max_seq_len
        if seq_len is not None and d.max_tokens_per_batch < seq_len:
            issues.append(Issue("data.max_tokens_per_batch", f"{d.max_tokens_per_batch} is below data.seq_len="
                                f"{seq_len}, so a row of full length fits no micro-batch; use at least {seq_len}"))
    return issues


def _surgery_rules(config: ConfigSections) -> list[Issue]:
    surgery = config.gradient.surgery
    if surgery.method == "none":
        return []
    if config.precision.dtype == "fp16":
        return [Issue(
            "gradient.surgery.method",
            f"{surgery.method} runs its own per-term backward passes, which fp16 loss scaling does not cover; "
            "use precision.dtype: bf16 or fp32, or set method: none",
        )]
    available = surgery_terms(config)
    unknown = [term for term in surgery.terms if term not in available]
    if unknown:
        return [Issue(
            "gradient.surgery.terms",
            f"{unknown} are not loss terms of this model (available: {available}); "
            "a zero coefficient (e.g. model.moe.aux_loss_coef=0) removes its term",
        )]
    if len(set(surgery.terms)) < 2:
        return [Issue(
            "gradient.surgery.method",
            f"{surgery.method} needs at least two loss terms to arbitrate but gradient.surgery.terms="
            f"{surgery.terms}; list two or more of {available} or set method: none",
        )]
    return []


def _progressive_rules(config: ConfigSections) -> list[Issue]:
    """Sequence-length warmup, batch-size ramp and curriculum against the run they schedule."""
    p, t = config.progressive, config.training
    issues = []
    ramps = (
        ("progressive.seq_len_warmup", p.seq_len_warmup.start, p.seq_len_warmup.steps, config.data.seq_len,
         "data.seq_len"),
        ("progressive.batch_size_ramp", p.batch_size_ramp.start, p.batch_size_ramp.steps, t.batch_size,
         "training.batch_size"),
    )
    for key, start, steps, target, target_key in ramps:
        if start is None:
            continue
        if start > target:
            issues.append(Issue(
                f"{key}.start", f"{start} is above {target_key}={target}, the value it ramps up to; lower it"
            ))
        elif start == target or steps == 0:
            issues.append(Issue(
                f"{key}.start",
                f"has no effect ({'start equals ' + target_key if start == target else 'steps is 0'}); "
                "set steps > 0 and start below the target, or start: null",
                "warning",
            ))
        if t.max_steps is not None and steps >= t.max_steps:
            issues.append(Issue(
                f"{key}.steps",
                f"{steps} ≥ training.max_steps={t.max_steps}: {target_key} is never reached; lower steps",
                "warning",
            ))
    if p.seq_len_warmup.start is not None and p.seq_len_warmup.start < 2:
        issues.append(Issue(
            "progressive.seq_len_warmup.start",
            f"{p.seq_len_warmup.start} leaves no next token to predict in a row; use at least 2 (e.g. 16)",
        ))
    if p.curriculum.by != "none":
        if p.curriculum.steps == 0:
            issues.append(Issue(
                "progressive.curriculum.steps", f"0 with curriculum.by={p.curriculum.by}: no step is ordered; "
                "set steps > 0 or by: none", "warning",
            ))
        elif t.max_steps is not None and p.curriculum.steps >= t.max_steps:
            issues.append(Issue(
                "progressive.curriculum.steps",
                f"{p.curriculum.steps} ≥ training.max_steps={t.max_steps}: the whole run is ordered easy to hard "
                "(no random phase); lower steps",
                "warning",
            ))
    elif p.curriculum.steps:
        issues.append(Issue(
            "progressive.curriculum.by", f"none, so curriculum.steps={p.curriculum.steps} has no effect; "
            "choose distinct_tokens or rarity", "warning",
        ))
    return issues


def _environment_rules(config: ConfigSections) -> list[Issue]:
    import torch

    issues = []
    for i, source in enumerate(config.data.sources):
        if not glob.glob(source.path, recursive=True):
            issues.append(Issue(
                f"data.sources.{i}.path",
                f"'{source.path}' matches no file or folder; fix the path (relative paths start at the "
                "current directory)",
            ))
    if config.data.prepared is not None and not (Path(config.data.prepared) / "manifest.json").is_file():
        issues.append(Issue(
            "data.prepared",
            f"'{config.data.prepared}' holds no manifest.json; run `ava prepare CONFIG --out "
            f"{config.data.prepared}` first or fix the path",
        ))
    tok_path = config.data.tokenizer.path
    if tok_path is not None:
        if not Path(tok_path).is_file():
            issues.append(Issue(
                "data.tokenizer.path",
                f"'{tok_path}' is not a file; point it at a tokenizer.json or set it to null to train one",
            ))
        else:
            issues += _tokenizer_rules(config, tok_path)
    if config.logging.wandb.enabled:
        try:
            import wandb  # noqa: F401  (installed is all this checks; training imports it again)
        except ImportError:
            issues.append(Issue(
                "logging.wandb.enabled",
                "true but the wandb package is not installed; `pip install wandb` or set logging.wandb.enabled: false",
            ))
    cuda = torch.cuda.is_available()
    if config.run.device == "cuda" and not cuda:
        issues.append(Issue("run.device", "cuda was requested but no CUDA device is available; use auto or cpu"))
    uses_cuda = config.run.device == "cuda" or (config.run.device == "auto" and cuda)
    if config.performance.compile:
        from .compile_check import compile_problem

        device = torch.device("cuda" if uses_cuda else "cpu")
        problem = compile_problem(device)  # a short test compilation (seconds on a cold cache)
        if problem is not None:
            issues.append(Issue(
                "performance.compile",
                f"torch.compile cannot run on {device.type} here: {problem}; fix that or set performance.compile: false",
            ))
    dtype = config.precision.dtype
    if dtype == "bf16" and uses_cuda and cuda and not torch.cuda.is_bf16_supported():
        issues.append(Issue(
            "precision.dtype", "bf16 is not supported by this GPU; use fp32", "error"
        ))
    elif dtype in ("bf16", "fp16") and not uses_cuda and not cpu_has_native_matmul(dtype):
        issues.append(Issue(
            "precision.dtype",
            f"this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native {dtype} matmuls, so they run "
            f"emulated, many times slower than fp32 (docs/precision.md); use precision.dtype: fp32 on this machine",
            "warning",
        ))
    return issues


def cpu_has_native_matmul(dtype: str) -> bool:
    """Whether oneDNN has native ``bf16`` / ``fp16`` matmuls on this CPU (bf16: AVX512-BF16 or AMX;
    fp16: AVX512-FP16 or AMX-FP16). Without them the GEMMs run emulated: on an AVX2 machine the demo
    model trained 0.03× as fast in bf16 as in fp32 (``benchmarks/precision.py``)."""
    import torch

    return bool(getattr(torch.ops.mkldnn, f"_is_mkldnn_{dtype}_supported")())


def _tokenizer_rules(config: ConfigSections, tok_path: str) -> list[Issue]:
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(tok_path).get_vocab_size()
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        return [Issue("data.tokenizer.path", f"'{tok_path}' is not a valid tokenizer.json ({err})")]
    return tokenizer_vocab_issues(config.model.vocab_size, size)


def tokenizer_vocab_issues(model_vocab: int, tokenizer_vocab: int) -> list[Issue]:
    """The model's embedding must hold every id of the tokenizer.

    Checked on the config when ``data.tokenizer.path`` names a file, and by whoever builds the
    model against a tokenizer known only later (trained or read from prepared shards).

    Args:
        model_vocab: ``model.vocab_size``.
        tokenizer_vocab: the tokenizer's number of tokens.

    Returns:
        One error when the model's vocabulary is smaller, else nothing.
    """
    if model_vocab < tokenizer_vocab:
        return [Issue(
            "model.vocab_size",
            f"{model_vocab} is smaller than the tokenizer's {tokenizer_vocab} tokens; raise it or set null",
        )]
    return []


# --------------------------------------------------------------------------------------------
# resuming a run with a changed config
# --------------------------------------------------------------------------------------------

# Dotted key prefixes a resumed run may change: they steer how long, how often and what is
# observed, not what a step computes; and how the global batch is spread over processes (elastic
# resume: the data cursor refuses a changed global batch, naming both sizes).
RESUMABLE_CHANGES = (
    "training.max_steps", "training.num_epochs", "training.eval_every", "training.eval_batches",
    "training.save_every", "training.log_every", "training.moe_alarm.", "logging.", "checkpoint.",
    "evaluation.", "performance.", "gradient.health.", "run.output_dir", "run.num_threads", "run.device",
    "data.num_workers", "data.cache_dir", "distributed.", "training.batch_size", "training.grad_accum_steps",
)


def resume_changes(saved: Any, config: ConfigSections, run: str | Path) -> list[str]:
    """Compare ``config`` with the config a run was saved with; refuse changes that break the run.

    Args:
        saved: the run's ``config.yaml`` as loaded (a dict); keys added to the schema since it
            was written take their defaults, so a newer Ava can resume an older run.
        config: the config the run is resumed with.
        run: the run folder, named in the error.

    Returns:
        ``"key: old -> new"`` for each allowed change (to be logged).

    Raises:
        AvaConfigError: a change of any key outside :data:`RESUMABLE_CHANGES`, listing them all.
    """
    # type(config): the config's own schema (EnhancedTrainingConfig), without importing it here
    old, new = _flatten(_with_current_defaults(saved, type(config))), _flatten(config.to_dict())
    # A derived model.vocab_size is the config-time estimate until the data is prepared; the
    # resumed run takes the size it was saved with (Ava.config.training_config.adopt_tokenizer_vocab).
    # A tokenizer target not set explicitly (the default, or model.vocab_size's) trains nothing on
    # resume: the run reads its own tokenizer.json.
    unset = {key for key, derived in (("model.vocab_size", vocab_size_is_derived(config.model)),
                                      ("data.tokenizer.vocab_size", "vocab_size" not in config.data.tokenizer.model_fields_set))
             if derived}
    allowed, refused, problems = [], [], []
    for key in sorted(set(old) | set(new)):
        if old.get(key) == new.get(key) or key in unset:
            continue
        change = f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
        if key == "run.name":
            # changes nothing computed, but the run folder is <output_dir>/<run.name>_<time> and
            # config.yaml is rewritten on resume: the two would disagree from then on
            problems.append(
                f"{change}: run.name names the run folder ({Path(run).name}) and is how --resume auto "
                f"finds it; a resumed run keeps its folder, so set run.name back to {old.get(key)!r}, "
                f"or start a new run named {new.get(key)!r} without --resume"
            )
        elif key.startswith(RESUMABLE_CHANGES):
            allowed.append(change)
        else:
            refused.append(change)
    if refused:
        problems.insert(0, "; ".join(refused) + ": these change what training computes; restore them, "
                                                 "or start a new run without --resume")
    if problems:
        raise AvaConfigError(f"cannot resume {run} with a changed " + "; and a changed ".join(problems))
    return allowed


def _with_current_defaults(saved: Any, schema: Any) -> Any:
    """The saved config as the current schema resolves it; the raw dict if it no longer validates
    (every difference is then reported as is)."""
    if not isinstance(saved, dict):
        return saved
    try:
        return schema.model_validate(saved).to_dict()
    except ValueError:  # pydantic.ValidationError is a ValueError
        return saved


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _finetune_rules(config: ConfigSections) -> list[Issue]:
    """LoRA / QLoRA (``finetune``): what the adapters do not run with yet."""
    ft = getattr(config, "finetune", None)
    if ft is None:
        return []
    issues = []
    d = config.distributed
    if d.strategy == "fsdp2":
        issues.append(Issue("distributed.strategy", "fsdp2 does not shard LoRA adapters over a frozen base; use "
                            "ddp (the adapters are small) or none"))
    if d.expert_parallel > 1:
        issues.append(Issue("distributed.expert_parallel", "LoRA on experts split over ranks is not supported; "
                            "set expert_parallel: 1"))
    if config.precision.qat is not None or config.precision.fp8.enabled:
        key = "precision.qat" if config.precision.qat is not None else "precision.fp8.enabled"
        issues.append(Issue(key, "a fine-tune's base is frozen (quantize it with finetune.base_quant); "
                            "turn this off for LoRA"))
    if config.optimizer.name in ("sophia", "muon"):
        issues.append(Issue("optimizer.name", f"{config.optimizer.name} is not set up for LoRA adapters; use "
                            "adamw, lion or adafactor"))
    if config.model.attention != "standard" or config.model.cross_attention.every:
        key = "model.attention" if config.model.attention != "standard" else "model.cross_attention.every"
        issues.append(Issue(key, "LoRA adapters are placed on standard attention only so far; fine-tune a base "
                            "with model.attention: standard and no cross-attention"))
    return issues
