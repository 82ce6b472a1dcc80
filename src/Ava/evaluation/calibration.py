"""Calibration of next-token predictions: expected calibration error over equal-width bins.

Legend: N scored positions.

Confidence = the top-1 probability, correct = the top-1 token is the target; ECE over 15
equal-width confidence bins (Guo et al. 2017).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

ECE_BINS = 15


@dataclass
class CalibrationBins:
    """Running per-bin sums for the expected calibration error.

    Bin b holds confidences in ``(b/n, (b+1)/n]`` (bin 0 also takes 0).
    """

    num_bins: int = ECE_BINS
    count: torch.Tensor = field(default=None)  # type: ignore[assignment]
    confidence: torch.Tensor = field(default=None)  # type: ignore[assignment]
    correct: torch.Tensor = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.count = torch.zeros(self.num_bins, dtype=torch.float64)
        self.confidence = torch.zeros(self.num_bins, dtype=torch.float64)
        self.correct = torch.zeros(self.num_bins, dtype=torch.float64)

    def add(self, confidence_N: torch.Tensor, correct_N: torch.Tensor) -> None:
        """Add N predictions: top-1 probabilities and whether the top-1 token was right."""
        conf = confidence_N.detach().double().cpu()
        bins = (conf * self.num_bins).ceil().long().clamp(1, self.num_bins) - 1  # (N,)
        self.count.index_add_(0, bins, torch.ones_like(conf))
        self.confidence.index_add_(0, bins, conf)
        self.correct.index_add_(0, bins, correct_N.detach().double().cpu())

    def ece(self) -> float:
        """``Σ_b (n_b / N) · |accuracy_b − confidence_b|``."""
        total = self.count.sum()
        if total == 0:
            return float("nan")
        return float((self.correct - self.confidence).abs().sum() / total)

    def table(self) -> list[dict[str, float]]:
        """Per non-empty bin: range, count, mean confidence, accuracy."""
        rows = []
        for b in range(self.num_bins):
            n = float(self.count[b])
            if n:
                rows.append({"low": b / self.num_bins, "high": (b + 1) / self.num_bins, "count": n,
                             "confidence": float(self.confidence[b]) / n, "accuracy": float(self.correct[b]) / n})
        return rows


def expected_calibration_error(confidence_N: torch.Tensor, correct_N: torch.Tensor, num_bins: int = ECE_BINS) -> float:
    """ECE of N predictions (see :class:`CalibrationBins`).

    Args:
        confidence_N: (N,) top-1 probabilities in [0, 1].
        correct_N: (N,) bool or 0/1, the top-1 prediction was right.
        num_bins: equal-width bins over [0, 1].

    Returns:
        The ECE in [0, 1].
    """
    bins = CalibrationBins(num_bins)
    bins.add(confidence_N, correct_N.float())
    return bins.ece()
