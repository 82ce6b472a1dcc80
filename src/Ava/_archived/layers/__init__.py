"""Seed path ``_archived.layers`` (experimental layer architectures) → :mod:`Ava.layers`."""
