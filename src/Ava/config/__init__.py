"""Configuration: pydantic schema, YAML loading with overrides, compatibility rules.

The schema is split by section: ``model_config.py`` (model, MoE, MTP, losses), ``data_config.py``
(data), ``training_sections.py`` (everything that steers a run) and ``training_config.py`` (the
whole :class:`EnhancedTrainingConfig` with its cross-section resolution and YAML I/O).
"""

from .data_config import ChatConfig, DataConfig, SourceConfig, TemplateConfig, TokenizerConfig
from .feature_compatibility import Issue, check_compatibility
from .loading import apply_override, load_config, validate_config
from .model_config import LossConfig, ModelConfig, MoEConfig, MTPConfig
from .reference import render_reference_yaml
from .training_config import EnhancedTrainingConfig
from .training_sections import (
    CheckpointConfig,
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
    "CheckpointConfig", "DataConfig", "EarlyStoppingConfig", "EnhancedTrainingConfig", "EvaluationConfig",
    "GradientConfig", "HealthConfig", "Issue", "LoggingConfig", "LossConfig", "MTPConfig", "ModelConfig",
    "MoEAlarmConfig", "MoEConfig", "OptimizerConfig", "PerformanceConfig", "PlateauConfig", "PrecisionConfig",
    "ProgressiveConfig", "RunConfig", "SchedulerConfig", "SourceConfig", "SurgeryConfig", "TokenizerConfig", "TemplateConfig", "ChatConfig",
    "TrainingSection", "WandbConfig", "apply_override", "check_compatibility", "load_config",
    "render_reference_yaml", "validate_config",
]
