"""Seed path ``_archived.generation.generator`` → :mod:`Ava.generation.generator`."""

from ...generation.generator import TextGenerator

__all__ = ["TextGenerator"]
