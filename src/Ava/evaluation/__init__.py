"""Evaluation: the validation loss, loss/perplexity per source, expert utilisation, calibration,
multiple choice (the metrics of lm-evaluation-harness).

Imports ``models/``, ``data/`` and ``utils/`` only; generation samples come from a function the
caller passes (:data:`SampleFn`), so the CLI composes generation with evaluation.
"""

from ..models.routing_metrics import expert_utilisation
from .calibration import CalibrationBins, expected_calibration_error
from .comprehensive_eval import (
    REPORT_FOLDER,
    EvaluationReport,
    SampleFn,
    TokenWindows,
    evaluate_tokens,
    run_evaluation,
)
from .multiple_choice import (
    METRICS,
    ChoiceScore,
    choice_loglikelihoods,
    continuation_loglikelihood,
    encode_pair,
    predictions,
    read_multiple_choice,
    score_multiple_choice,
    split_context,
)
from .validation import validation_loss

__all__ = [
    "METRICS", "REPORT_FOLDER", "CalibrationBins", "ChoiceScore", "EvaluationReport", "SampleFn", "TokenWindows",
    "choice_loglikelihoods", "continuation_loglikelihood", "encode_pair", "evaluate_tokens",
    "expected_calibration_error", "expert_utilisation", "predictions", "read_multiple_choice", "run_evaluation",
    "score_multiple_choice", "split_context", "validation_loss",
]
