"""Seed path ``_archived.generation`` → :mod:`Ava.generation`."""

from ...generation import TextGenerator

__all__ = ["TextGenerator"]
