"""The configuration schema of Ava: one pydantic model per YAML section.

Every field has a default and a ``description``; the descriptions feed ``ava config schema`` and
``configs/reference.yaml``. All models forbid unknown keys, so a typo is an error that suggests
the nearest valid key (see :mod:`Ava.config.loading`). :func:`load_config` and
:func:`validate_config` are the function forms of :meth:`EnhancedTrainingConfig.from_yaml` and
:meth:`EnhancedTrainingConfig.from_dict`.

Sizes left unset are derived from the ones given (SPEC §3), so the seed's three model keys are
enough at any size: ``num_heads = max(1, hidden_size // 64)``, ``num_kv_heads = num_heads``,
``intermediate_size = moe_intermediate_size ≈ 8/3 · hidden_size`` (rounded up to a multiple of 32).

``model.vocab_size`` and the tokenizer follow each other (:func:`resolve_vocab_size`):

- set by the user, with a tokenizer Ava trains and ``data.tokenizer.vocab_size`` not set: it is
  the tokenizer's target size (special tokens included);
- left null: the tokenizer's real size rounded up to a multiple of :data:`VOCAB_MULTIPLE`. A
  tokenizer file (``data.tokenizer.path``, or the one of ``data.prepared`` shards) is read when
  the config is loaded; a tokenizer Ava trains exists only once the data is prepared, so until
  then the size is the target's rounded up (an upper bound), and the trainer replaces it with
  :func:`adopt_tokenizer_vocab` (a resumed run keeps the size its checkpoints were saved with).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from ..errors import AvaConfigError
from .base import AvaSection
from .data_config import DataConfig
from .feature_compatibility import check_compatibility, raise_on_errors, trains_tokenizer, vocab_size_is_derived
from .loading import apply_overrides, dump_yaml, read_config_file, validation_problems
from .finetune_config import FinetuneConfig
from .model_config import ModelConfig
from .training_sections import (
    PERFORMANCE_PRESETS,
    CheckpointConfig,
    DistributedConfig,
    EvaluationConfig,
    GradientConfig,
    LoggingConfig,
    MemoryConfig,
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
    memory: MemoryConfig = Field(
        default_factory=MemoryConfig, description="Episodic replay memory of training sequences (off by default)."
    )
    finetune: FinetuneConfig | None = Field(
        None, description="LoRA / QLoRA fine-tuning of a trained base model (its architecture and tokenizer "
        "replace model and data.tokenizer); null = train the model from scratch.",
    )

    @model_validator(mode="after")
    def _resolve_cross_section(self) -> EnhancedTrainingConfig:
        if self.data.seq_len is None:
            object.__setattr__(self.data, "seq_len", self.model.max_seq_len)
        self._resolve_vocab_size()
        self._apply_performance_preset()
        return self

    def _resolve_vocab_size(self) -> None:
        """model.vocab_size from the tokenizer (null), or the trained tokenizer's target from it (set).

        A derived size stays out of ``model_fields_set`` (see :func:`vocab_size_is_derived`), so
        resolving again (on assignment) gives the same answer.
        """
        model, data = self.model, self.data
        if model.vocab_size is None:  # left null (explicitly or not)
            object.__setattr__(model, "vocab_size", round_vocab_size(_tokenizer_vocab_size(data)))
            model.model_fields_set.discard("vocab_size")
        elif (not vocab_size_is_derived(model) and trains_tokenizer(data)
              and "vocab_size" not in data.tokenizer.model_fields_set):
            # the tokenizer Ava trains is sized for the model (a smaller model.vocab_size than a
            # byte-level BPE can be is reported by feature_compatibility, naming the key)
            object.__setattr__(data.tokenizer, "vocab_size", model.vocab_size)

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
                (``training.learning_rate=3e-4``, ``data.sources.0.path=a.txt``); values are
                parsed as YAML scalars/lists (see :func:`~Ava.config.loading.apply_override`).
            check_environment: also check things outside the config (files exist, CUDA present).

        Returns:
            The resolved config.

        Raises:
            AvaConfigError: unreadable file, unknown key (with the nearest valid key), bad value
                or contradictory combination; one line naming the key and the fix.
        """
        written: dict[str, str] = {}  # each value as written, for the error messages
        data = read_config_file(path, written)
        overridden = apply_overrides(data, overrides or [], schema=cls, written=written)
        config = cls.from_dict(data, str(path), overridden, written)
        raise_on_errors(check_compatibility(config, environment=check_environment), str(path), log_warnings=False)
        return config

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<dict>",
                  overridden: Iterable[str] = (),
                  written: Mapping[str, str] | None = None) -> EnhancedTrainingConfig:
        """Validate a plain dict (as loaded from YAML), converting every error into one readable line.

        Only the schema is checked here; :func:`~Ava.config.check_compatibility` holds the rules
        on combinations (``from_yaml`` applies them).

        Args:
            data: the sections.
            source: named at the start of the error (a file name).
            overridden: dotted keys set by command-line overrides; a problem at such a key says
                it came from the command line, not from ``source``.
            written: each value as written in the file or override, by dotted key; a problem
                shows it so (``yes``, not ``True``).

        Returns:
            The resolved config.

        Raises:
            AvaConfigError: every problem of ``data``, on one line.
        """
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            problems = validation_problems(err, cls, overridden, written)
            raise AvaConfigError(f"{source}: " + "; ".join(problems)) from None
        except AvaConfigError as err:
            raise AvaConfigError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe dict of the resolved config."""
        return json.loads(self.model_dump_json())

    def to_yaml(self, path: str | Path | None = None) -> str:
        """The resolved config as YAML; also written to ``path`` when given."""
        text = dump_yaml(self.to_dict())  # reads back the same as Ava reads configs, and as yaml.safe_load
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


VOCAB_MULTIPLE = 64
"""A derived ``model.vocab_size`` is the tokenizer's size rounded up to a multiple of this."""


def round_vocab_size(tokenizer_size: int) -> int:
    """``tokenizer_size`` rounded up to a multiple of :data:`VOCAB_MULTIPLE` (484 → 512)."""
    return -(-tokenizer_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def resolve_vocab_size(model: ModelConfig, tokenizer_size: int, saved: int | None = None) -> int:
    """The model's vocabulary size for a tokenizer of ``tokenizer_size`` ids.

    Args:
        model: the model section.
        tokenizer_size: the tokenizer's number of ids, special tokens included
            (``AvaTokenizer.vocab_size``).
        saved: a resumed run's ``model.vocab_size`` (its checkpoints' embedding size).

    Returns:
        ``model.vocab_size`` when the user set it (whether it holds the tokenizer is checked by
        :func:`~Ava.config.feature_compatibility.tokenizer_vocab_issues`); else ``saved`` when
        given; else ``tokenizer_size`` rounded up to a multiple of :data:`VOCAB_MULTIPLE`.
    """
    if not vocab_size_is_derived(model):
        assert model.vocab_size is not None
        return model.vocab_size
    if saved is not None:
        return saved
    return round_vocab_size(tokenizer_size)


def adopt_tokenizer_vocab(config: EnhancedTrainingConfig, tokenizer_size: int,
                          run_config: str | Path | None = None) -> str | None:
    """Set a derived ``model.vocab_size`` from the tokenizer now known (trained or loaded).

    Call it once the data is prepared and before the model is built; the size stays marked as
    derived. A user-set size is left alone.

    Args:
        config: the resolved config, updated in place.
        tokenizer_size: the tokenizer's number of ids (``PreparedData.tokenizer.vocab_size``).
        run_config: a resumed run's ``config.yaml``: its ``model.vocab_size`` is the size the
            run's checkpoints were saved with, and is kept.

    Returns:
        One line for the log saying what ``model.vocab_size`` became and why; None when the user
        set it.
    """
    if not vocab_size_is_derived(config.model):
        return None
    saved = _saved_vocab_size(Path(run_config)) if run_config is not None else None
    vocab = resolve_vocab_size(config.model, tokenizer_size, saved)
    object.__setattr__(config.model, "vocab_size", vocab)
    if saved is not None:
        return f"model.vocab_size: {vocab}, as the resumed run was saved with (tokenizer: {tokenizer_size} tokens)"
    return (f"model.vocab_size: {vocab} (the tokenizer's {tokenizer_size} tokens rounded up to a multiple "
            f"of {VOCAB_MULTIPLE})")


def _saved_vocab_size(path: Path) -> int | None:
    """``model.vocab_size`` of a run's ``config.yaml``; None when it cannot be read."""
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    vocab = saved.get("model", {}).get("vocab_size") if isinstance(saved, dict) else None
    return vocab if isinstance(vocab, int) and not isinstance(vocab, bool) else None


def _tokenizer_vocab_size(data: DataConfig) -> int:
    """Size of the configured tokenizer: its file's (``data.tokenizer.path``, else the prepared
    shards' ``tokenizer.json``), else the target of the one Ava will train."""
    tokenizer = data.tokenizer
    if tokenizer.path is not None:
        path = Path(tokenizer.path)
    elif data.prepared is not None:
        path = Path(data.prepared) / "tokenizer.json"
    else:
        return tokenizer.vocab_size
    if not path.is_file():
        # Reported by feature_compatibility (or the shards' reader) with the key name; keep a usable size meanwhile.
        return tokenizer.vocab_size
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path)).get_vocab_size()
    except Exception:  # malformed file: reported by feature_compatibility with the key name
        return tokenizer.vocab_size
