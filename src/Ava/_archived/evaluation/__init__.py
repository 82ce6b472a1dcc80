"""Seed path ``_archived.evaluation`` (alternative evaluators) → :mod:`Ava.evaluation`."""
