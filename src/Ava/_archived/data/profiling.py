"""Seed path ``_archived.data.profiling`` → :mod:`Ava.data.profile` (``ava prepare`` writes the profile)."""

from ...data.profile import format_profile, profile_documents, write_profile

__all__ = ["format_profile", "profile_documents", "write_profile"]
