"""Seed path ``_archived.models.moe_model`` → :mod:`Ava.models.moe_model`."""

from ...models.moe_model import EnhancedMoEModel

__all__ = ["EnhancedMoEModel"]
