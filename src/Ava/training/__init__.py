"""Training: the trainer and the modules it orchestrates."""

from .enhanced_trainer import EnhancedModularTrainer, TrainingSummary

__all__ = ["EnhancedModularTrainer", "TrainingSummary"]
