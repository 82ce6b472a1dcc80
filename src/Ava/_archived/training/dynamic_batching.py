"""Seed path ``_archived.training.dynamic_batching`` → :mod:`Ava.data.dynamic_batching`
(``data.packing: false``, ``data.max_tokens_per_batch``)."""

from ...data.dynamic_batching import EpochPlan, plan_epoch
from ...data.rows import RowDataset, pad_rows

__all__ = ["EpochPlan", "RowDataset", "pad_rows", "plan_epoch"]
