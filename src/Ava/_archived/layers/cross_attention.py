"""Seed path ``_archived.layers.cross_attention`` → :mod:`Ava.layers.cross_attention`
(``model.cross_attention``)."""

from ...layers.cross_attention import CrossAttention

__all__ = ["CrossAttention"]
