"""Seed path ``_archived.data.deduplication`` → :mod:`Ava.data.dedup` (``data.dedup: exact | near``)."""

from ...data.dedup import MinHasher, dedup_documents

__all__ = ["MinHasher", "dedup_documents"]
