"""Evaluation: loss/perplexity per source, expert utilisation, calibration, multiple choice."""

from .comprehensive_eval import (
    CalibrationBins,
    EvaluationReport,
    choice_scores,
    evaluate_tokens,
    expected_calibration_error,
    expert_utilisation,
    read_multiple_choice,
    run_evaluation,
    score_multiple_choice,
)

__all__ = [
    "CalibrationBins", "EvaluationReport", "choice_scores", "evaluate_tokens", "expected_calibration_error",
    "expert_utilisation", "read_multiple_choice", "run_evaluation", "score_multiple_choice",
]
