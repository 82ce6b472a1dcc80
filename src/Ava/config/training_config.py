"""The configuration schema of Ava: one pydantic model per YAML section.

Every field has a default and a ``description``; the descriptions feed ``ava config schema`` and
``configs/reference.yaml``. All models forbid unknown keys, so a typo is an error that suggests
the nearest valid key (see :mod:`Ava.config.loading`). :func:`load_config` and
:func:`validate_config` are the function forms of :meth:`EnhancedTrainingConfig.from_yaml` and
:meth:`EnhancedTrainingConfig.from_dict`.

Sizes left unset are derived from the ones given (SPEC §3), so the seed's three model keys are
enough at any size: ``num_heads = max(1, hidden_size // 64)``, ``num_kv_heads = num_heads``,
``intermediate_size = moe_intermediate_size ≈ 8/3 · hidden_size`` (rounded up to a multiple of 32)
and ``vocab_size`` = the tokenizer's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from ..errors import AvaConfigError
from .base import AvaSection
from .data_config import DataConfig, TokenizerConfig
from .feature_compatibility import check_compatibility, raise_on_errors
from .loading import apply_overrides, read_config_file, validation_problems
from .model_config import ModelConfig
from .training_sections import (
    PERFORMANCE_PRESETS,
    CheckpointConfig,
    DistributedConfig,
    EvaluationConfig,
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
    distributed: DistributedConfig = Field(
        default_factory=DistributedConfig, description="Distributed training: how the run is spread over processes."
    )
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logging.")
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig, description="Evaluation.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpoints.")
    gradient: GradientConfig = Field(default_factory=GradientConfig, description="Gradient health.")
    progressive: ProgressiveConfig = Field(
        default_factory=ProgressiveConfig, description="Sequence-length warmup, batch-size ramp, curriculum."
    )
    performance: PerformanceConfig = Field(
        default_factory=PerformanceConfig,
        description="Speed and memory: presets, CPU allocator, torch.compile, activation checkpointing.",
    )
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity.")

    @model_validator(mode="after")
    def _resolve_cross_section(self) -> EnhancedTrainingConfig:
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
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None, *,
                  check_environment: bool = True) -> EnhancedTrainingConfig:
        """Load, override, validate and resolve a YAML config, then check its compatibility rules.

        Args:
            path: the YAML file.
            overrides: dotted ``key=value`` strings applied before validation
                (``training.learning_rate=3e-4``); values are parsed as YAML scalars/lists.
            check_environment: also check things outside the config (files exist, CUDA present).

        Returns:
            The resolved config.

        Raises:
            AvaConfigError: unreadable file, unknown key (with the nearest valid key), bad value
                or contradictory combination; one line naming the key and the fix.
        """
        data = read_config_file(path)
        overridden = apply_overrides(data, overrides or [])
        config = cls.from_dict(data, str(path), overridden)
        raise_on_errors(check_compatibility(config, environment=check_environment), str(path), log_warnings=False)
        return config

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>",
                  overridden: Iterable[str] = ()) -> EnhancedTrainingConfig:
        """Validate a plain dict (as loaded from YAML), converting every error into one readable line.

        Only the schema is checked here; :func:`~Ava.config.check_compatibility` holds the rules
        on combinations (``from_yaml`` applies them).

        Args:
            data: the sections.
            source: named at the start of the error (a file name).
            overridden: dotted keys set by command-line overrides; a problem at such a key says
                it came from the command line, not from ``source``.

        Returns:
            The resolved config.

        Raises:
            AvaConfigError: every problem of ``data``, on one line.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise AvaConfigError(f"{source}: " + "; ".join(validation_problems(err, cls, overridden))) from None
        except AvaConfigError as err:
            raise AvaConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of the resolved config."""
        return json.loads(self.model_dump_json())

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The resolved config as YAML; also written to ``path`` when given."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, check_environment: bool = True
) -> EnhancedTrainingConfig:
    """Read ``path``, apply ``overrides``, validate, check compatibility.

    Args:
        path: YAML file.
        overrides: ``dotted.key=value`` strings; values are parsed as YAML scalars/lists.
        check_environment: also check things outside the config (files exist, CUDA present).

    Returns:
        The resolved :class:`EnhancedTrainingConfig` (see :meth:`EnhancedTrainingConfig.from_yaml`).
    """
    return EnhancedTrainingConfig.from_yaml(path, overrides, check_environment=check_environment)


def validate_config(data: dict[str, Any], source: str = "<config>",
                    overridden: Iterable[str] = frozenset()) -> EnhancedTrainingConfig:
    """Validate a plain dict into a config, converting every error into one readable line.

    Args:
        data: the sections.
        source: named at the start of the error.
        overridden: dotted keys set by command-line overrides (see
            :meth:`EnhancedTrainingConfig.from_dict`).

    Returns:
        The resolved config.
    """
    return EnhancedTrainingConfig.from_dict(data, source, overridden)


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
