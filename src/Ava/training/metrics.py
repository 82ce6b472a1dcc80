"""Training metrics: one writer for ``metrics.jsonl`` and TensorBoard, plus MoE load summaries.

Every record is a flat dict of numbers tagged with the step and a ``split`` (``train`` / ``val``),
so ``metrics.jsonl`` can be read with one ``json.loads`` per line and plotted directly.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class MetricsWriter:
    """Append metric records to ``metrics.jsonl`` and, optionally, TensorBoard.

    Args:
        jsonl_path: the metrics file (appended to, flushed after every record).
        tensorboard_dir: folder for TensorBoard events; None disables TensorBoard.
    """

    def __init__(self, jsonl_path: Path, tensorboard_dir: Path | None = None) -> None:
        self._file = open(jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard_dir))

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        """Record ``values`` (numbers; nested lists allowed in the JSON only) at ``step``."""
        record = {"step": step, "split": split, **values}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{split}/{key}", value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def expert_load_summary(tokens_per_expert: list[torch.Tensor]) -> dict[str, Any]:
    """Load-balance numbers from per-layer token counts.

    Args:
        tokens_per_expert: one ``(E,)`` tensor of routed token counts per MoE layer.

    Returns:
        ``max_vio`` (mean over layers of max_load/mean_load − 1, Wang et al. 2024) and
        ``expert_load`` (per layer, share of assignments per expert).
    """
    if not tokens_per_expert:
        return {}
    loads = torch.stack([t.float() for t in tokens_per_expert])  # (L, E)
    share = loads / loads.sum(dim=1, keepdim=True).clamp_min(1.0)
    mean = loads.mean(dim=1).clamp_min(1e-9)
    max_vio = (loads.max(dim=1).values / mean - 1.0).mean().item()
    return {"max_vio": max_vio, "expert_load": [[round(v, 4) for v in row] for row in share.tolist()]}
