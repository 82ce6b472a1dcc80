"""Seed path ``_archived.data`` (data preparation tools) → :mod:`Ava.data`."""
