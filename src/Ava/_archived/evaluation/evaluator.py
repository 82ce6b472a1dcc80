"""Seed path ``_archived.evaluation.evaluator`` → :mod:`Ava.evaluation.comprehensive_eval` and
:mod:`Ava.evaluation.multiple_choice` (``ava eval``)."""

from ...evaluation.comprehensive_eval import EvaluationReport, run_evaluation
from ...evaluation.multiple_choice import read_multiple_choice

__all__ = ["EvaluationReport", "read_multiple_choice", "run_evaluation"]
