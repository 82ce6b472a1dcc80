"""Optimizers and their parameter groups."""

from .advanced_optimizers import build_optimizer, parameter_groups

__all__ = ["build_optimizer", "parameter_groups"]
