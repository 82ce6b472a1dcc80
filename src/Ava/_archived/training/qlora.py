"""Seed path ``_archived.training.qlora`` → :mod:`Ava.training.finetune` (``finetune`` in YAML)."""

from ...training.finetune import AdapterWeights, adopt_base, build_finetune_model

__all__ = ["AdapterWeights", "adopt_base", "build_finetune_model"]
