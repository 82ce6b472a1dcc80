"""Seed path ``_archived.layers.moh`` → :mod:`Ava.layers.mixture_of_heads` (``model.attention: moh``)."""

from ...layers.mixture_of_heads import MixtureOfHeadsAttention

__all__ = ["MixtureOfHeadsAttention"]
