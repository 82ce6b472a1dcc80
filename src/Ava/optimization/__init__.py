"""Optimizers and their parameter groups."""

from .advanced_optimizers import DEFAULT_BETAS, build_optimizer, optimizer_state_bytes, parameter_groups
from .lion import Lion
from .muon import MuonWithAdamW, newton_schulz
from .sophia import SophiaG

__all__ = [
    "DEFAULT_BETAS", "Lion", "MuonWithAdamW", "SophiaG", "build_optimizer", "newton_schulz",
    "optimizer_state_bytes", "parameter_groups",
]
