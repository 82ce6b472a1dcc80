"""Evaluation: the validation loss, loss/perplexity per source, expert utilisation, calibration,
multiple choice.

Imports ``models/``, ``data/`` and ``utils/`` only; generation samples come from a function the
caller passes (:data:`SampleFn`), so the CLI composes generation with evaluation.
"""

from ..models.routing_metrics import expert_utilisation
from .calibration import CalibrationBins, expected_calibration_error
from .comprehensive_eval import (
    EvaluationReport,
    SampleFn,
    TokenWindows,
    choice_scores,
    evaluate_tokens,
    read_multiple_choice,
    run_evaluation,
    score_multiple_choice,
)
from .validation import validation_loss

__all__ = [
    "CalibrationBins", "EvaluationReport", "SampleFn", "TokenWindows", "choice_scores", "evaluate_tokens",
    "expected_calibration_error", "expert_utilisation", "read_multiple_choice", "run_evaluation",
    "score_multiple_choice", "validation_loss",
]
