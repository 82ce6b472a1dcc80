"""Seed path ``_archived.models`` (model wrappers) → :mod:`Ava.models`."""
