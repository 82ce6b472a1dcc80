"""Configuration: pydantic schema, YAML loading with overrides, compatibility rules."""

from .feature_compatibility import Issue, check_compatibility
from .loading import apply_override, load_config, validate_config
from .reference import render_reference_yaml
from .training_config import (
    DataConfig,
    EnhancedTrainingConfig,
    EvaluationConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    PrecisionConfig,
    RunConfig,
    SchedulerConfig,
    SourceConfig,
    TokenizerConfig,
    TrainingSection,
)

__all__ = [
    "DataConfig", "EnhancedTrainingConfig", "EvaluationConfig", "Issue", "LoggingConfig",
    "ModelConfig", "MoEConfig", "OptimizerConfig", "PrecisionConfig", "RunConfig",
    "SchedulerConfig", "SourceConfig", "TokenizerConfig", "TrainingSection", "apply_override",
    "check_compatibility", "load_config", "render_reference_yaml", "validate_config",
]
