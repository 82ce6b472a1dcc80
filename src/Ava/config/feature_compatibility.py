"""Rules that reject contradictory settings and warn on risky ones.

Each rule looks at the resolved config (and, when ``environment=True``, at the machine: files,
CUDA, bf16 support) and returns :class:`Issue` objects. All issues are collected before anything
is raised, so a user sees every problem of a config at once.
"""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..errors import AvaConfigError

if TYPE_CHECKING:
    from .training_config import EnhancedTrainingConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Issue:
    """One problem with a config: the dotted key, what is wrong and how to fix it."""

    key: str
    message: str
    severity: Literal["error", "warning"] = "error"

    def __str__(self) -> str:
        return f"{self.key}: {self.message}"


def check_compatibility(config: "EnhancedTrainingConfig", *, environment: bool = False) -> list[Issue]:
    """Every issue of ``config``: structural rules always, machine rules when ``environment``."""
    issues = _model_rules(config) + _training_rules(config)
    if environment:
        issues += _environment_rules(config)
    return issues


def raise_on_errors(issues: list[Issue], source: str) -> list[Issue]:
    """Raise one :class:`AvaConfigError` listing every error; log and return the warnings."""
    errors = [issue for issue in issues if issue.severity == "error"]
    warnings = [issue for issue in issues if issue.severity == "warning"]
    if errors:
        raise AvaConfigError(f"{source}: " + "; ".join(str(issue) for issue in errors))
    for issue in warnings:
        logger.warning("%s: %s", source, issue)
    return warnings


def model_issues(m: "ModelConfig") -> list[Issue]:
    """Structural rules of the model section alone (also checked when a model is built)."""
    issues = []
    if m.moe.top_k > m.num_experts:
        issues.append(Issue(
            "model.moe.top_k",
            f"{m.moe.top_k} is more than model.num_experts={m.num_experts}; set top_k ≤ num_experts",
        ))
    if m.hidden_size % m.num_heads:
        issues.append(Issue(
            "model.num_heads",
            f"hidden_size={m.hidden_size} is not divisible by num_heads={m.num_heads}; "
            "pick num_heads that divides hidden_size",
        ))
    elif m.head_dim % 2:
        issues.append(Issue(
            "model.num_heads",
            f"head dim hidden_size/num_heads={m.head_dim} is odd but RoPE needs it even; change num_heads",
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
    return issues


def _model_rules(config: "EnhancedTrainingConfig") -> list[Issue]:
    m = config.model
    issues = model_issues(m)
    if config.data.seq_len > m.max_seq_len:
        issues.append(Issue(
            "data.seq_len",
            f"{config.data.seq_len} is longer than model.max_seq_len={m.max_seq_len}; "
            "lower data.seq_len or raise model.max_seq_len",
        ))
    return issues


def _training_rules(config: "EnhancedTrainingConfig") -> list[Issue]:
    t, s = config.training, config.scheduler
    issues = []
    if t.max_steps is not None and s.warmup_steps >= t.max_steps:
        issues.append(Issue(
            "scheduler.warmup_steps",
            f"{s.warmup_steps} warmup steps ≥ training.max_steps={t.max_steps}: the LR never reaches "
            "its peak; lower warmup_steps",
            "warning",
        ))
    if s.lr_end is not None and s.lr_end > t.learning_rate:
        issues.append(Issue(
            "scheduler.lr_end",
            f"{s.lr_end} is above training.learning_rate={t.learning_rate}; set lr_end ≤ learning_rate",
        ))
    return issues


def _environment_rules(config: "EnhancedTrainingConfig") -> list[Issue]:
    import torch

    issues = []
    for i, source in enumerate(config.data.sources):
        if not glob.glob(source.path, recursive=True):
            issues.append(Issue(
                f"data.sources.{i}.path",
                f"'{source.path}' matches no file or folder; fix the path (relative paths start at the "
                "current directory)",
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
    cuda = torch.cuda.is_available()
    if config.run.device == "cuda" and not cuda:
        issues.append(Issue("run.device", "cuda was requested but no CUDA device is available; use auto or cpu"))
    uses_cuda = config.run.device == "cuda" or (config.run.device == "auto" and cuda)
    if config.precision.dtype == "bf16":
        if uses_cuda and cuda and not torch.cuda.is_bf16_supported():
            issues.append(Issue(
                "precision.dtype", "bf16 is not supported by this GPU; use fp32", "error"
            ))
        elif not uses_cuda and torch.backends.cpu.get_cpu_capability() not in {"AVX512", "AMX"}:
            issues.append(Issue(
                "precision.dtype",
                "this CPU has no native bf16 matmul (no AVX512/AMX): bf16 is emulated and likely slower than fp32",
                "warning",
            ))
    return issues


def _tokenizer_rules(config: "EnhancedTrainingConfig", tok_path: str) -> list[Issue]:
    from tokenizers import Tokenizer

    try:
        size = Tokenizer.from_file(tok_path).get_vocab_size()
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        return [Issue("data.tokenizer.path", f"'{tok_path}' is not a valid tokenizer.json ({err})")]
    if config.model.vocab_size < size:
        return [Issue(
            "model.vocab_size",
            f"{config.model.vocab_size} is smaller than the tokenizer's {size} tokens; raise it or set null",
        )]
    return []
