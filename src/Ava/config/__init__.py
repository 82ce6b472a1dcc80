"""Configuration: pydantic schema, YAML loading with overrides, compatibility rules."""

from .feature_compatibility import Issue, check_compatibility
from .loading import apply_override, load_config, validate_config
from .reference import render_reference_yaml
from .training_config import (
    CheckpointConfig,
    DataConfig,
    EarlyStoppingConfig,
    EnhancedTrainingConfig,
    EvaluationConfig,
    GradientConfig,
    HealthConfig,
    LoggingConfig,
    LossConfig,
    ModelConfig,
    MoEAlarmConfig,
    MoEConfig,
    MTPConfig,
    OptimizerConfig,
    PerformanceConfig,
    PlateauConfig,
    PrecisionConfig,
    ProgressiveConfig,
    RunConfig,
    SchedulerConfig,
    SourceConfig,
    SurgeryConfig,
    TokenizerConfig,
    TrainingSection,
    WandbConfig,
)

__all__ = [
    "CheckpointConfig", "EarlyStoppingConfig", "HealthConfig", "PerformanceConfig", "WandbConfig",
    "DataConfig", "EnhancedTrainingConfig", "EvaluationConfig", "GradientConfig", "Issue", "LoggingConfig", "LossConfig",
    "ModelConfig", "MoEAlarmConfig", "MoEConfig", "MTPConfig", "OptimizerConfig", "PlateauConfig", "PrecisionConfig", "ProgressiveConfig", "RunConfig",
    "SchedulerConfig", "SourceConfig", "SurgeryConfig", "TokenizerConfig", "TrainingSection", "apply_override",
    "check_compatibility", "load_config", "render_reference_yaml", "validate_config",
]
