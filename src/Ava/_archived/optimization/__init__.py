"""Seed path ``_archived.optimization`` (experimental optimizations) → :mod:`Ava.layers` and
:mod:`Ava.optimization`."""
