"""Configuration: pydantic schema, YAML loading with overrides, compatibility rules.

The schema is split by section: ``model_config.py`` (model, MoE, MTP, losses), ``data_config.py``
(data), ``training_sections.py`` (everything that steers a run) and ``training_config.py`` (the
whole :class:`EnhancedTrainingConfig` with its cross-section resolution and YAML I/O, built on
``loading.py``: file reading, overrides and error messages, which know no schema). Every rule on a
combination of values lives in ``feature_compatibility.py``, so all problems are reported at once.
"""

from .data_config import (
    ChatConfig,
    DataConfig,
    SourceConfig,
    TemplateConfig,
    TokenizerConfig,
)
from .feature_compatibility import Issue, check_compatibility
from .loading import apply_override
from .model_config import LossConfig, ModelConfig, MoEConfig, MTPConfig
from .reference import render_reference_yaml
from .training_config import EnhancedTrainingConfig, load_config, validate_config
from .training_sections import (
    CheckpointConfig,
    DistributedConfig,
    EarlyStoppingConfig,
    EvaluationConfig,
    GradientConfig,
    HealthConfig,
    LoggingConfig,
    MoEAlarmConfig,
    OptimizerConfig,
    PerformanceConfig,
    PlateauConfig,
    PrecisionConfig,
    ProgressiveConfig,
    RunConfig,
    SchedulerConfig,
    SurgeryConfig,
    TrainingSection,
    WandbConfig,
)

__all__ = [
    "ChatConfig",
    "CheckpointConfig",
    "DataConfig",
    "DistributedConfig",
    "EarlyStoppingConfig",
    "EnhancedTrainingConfig",
    "EvaluationConfig",
    "GradientConfig",
    "HealthConfig",
    "Issue",
    "LoggingConfig",
    "LossConfig",
    "MTPConfig",
    "MoEAlarmConfig",
    "MoEConfig",
    "ModelConfig",
    "OptimizerConfig",
    "PerformanceConfig",
    "PlateauConfig",
    "PrecisionConfig",
    "ProgressiveConfig",
    "RunConfig",
    "SchedulerConfig",
    "SourceConfig",
    "SurgeryConfig",
    "TemplateConfig",
    "TokenizerConfig",
    "TrainingSection",
    "WandbConfig",
    "apply_override",
    "check_compatibility",
    "load_config",
    "render_reference_yaml",
    "validate_config",
]
