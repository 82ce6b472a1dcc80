"""Seed path ``_archived.losses`` (alternative loss functions) → :mod:`Ava.losses`."""
