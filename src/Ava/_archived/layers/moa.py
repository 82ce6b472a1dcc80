"""Seed path ``_archived.layers.moa`` → :mod:`Ava.layers.mixture_of_attention` (``model.attention: moa``)."""

from ...layers.mixture_of_attention import MixtureOfAttentionHeads

__all__ = ["MixtureOfAttentionHeads"]
