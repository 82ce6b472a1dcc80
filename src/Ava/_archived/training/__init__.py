"""Seed path ``_archived.training`` (alternative training strategies) → :mod:`Ava.training` and
:mod:`Ava.data`."""
