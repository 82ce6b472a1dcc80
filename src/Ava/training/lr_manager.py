"""The LR schedule builder: a warmup shape composed with a decay shape, as one ``LambdaLR``.

``scheduler.warmup`` picks the warmup (:mod:`.advanced_warmup`), ``scheduler.name`` the decay
(:mod:`.advanced_schedulers`); both end where the next begins, so any pair composes. The
schedule object holds only plain numbers and strings: ``LambdaLR.state_dict`` stores its
``__dict__``, and the checkpoint state is loaded with ``torch.load(weights_only=True)``.

A warmup at least as long as the run (``scheduler.warmup_steps`` ≥ the run's optimizer steps, as
in a short ``training.max_steps`` trial of a config made for a long run) would leave the LR below
its peak with no decay at all; :func:`effective_warmup` then scales the warmup to
:data:`SHORT_RUN_WARMUP_PERCENT` % of the run (at least one step) and says so in one line, which
:func:`build_scheduler` logs when the trainer sets up. The schedule itself always uses :func:`effective_warmup`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import SchedulerConfig
from .advanced_schedulers import DECAYS
from .advanced_warmup import WARMUPS

logger = logging.getLogger(__name__)

SHORT_RUN_WARMUP_PERCENT = 10
"""Percent of the run a warmup at least as long as the run is scaled to (rounded down, at least one step)."""


class ComposedSchedule:
    """LR multiplier at optimizer step ``s``: warmup for ``warmup_steps``, then the decay.

    Args:
        warmup: warmup shape name (a key of ``WARMUPS``).
        warmup_steps: steps of warmup (the first step already has a non-zero LR, except radam's).
        decay: decay shape name (a key of ``DECAYS``).
        total_steps: optimizer steps of the run; the decay ends at its last step.
        end_ratio: lr_end / peak LR.
        options: the decay's extra parameters (floats, ints, strings only).
    """

    def __init__(self, warmup: str, warmup_steps: int, decay: str, total_steps: int, end_ratio: float,
                 options: dict[str, Any] | None = None) -> None:
        if warmup not in WARMUPS or decay not in DECAYS:
            raise ValueError(f"unknown warmup {warmup!r} or decay {decay!r}")
        self.warmup = warmup
        self.warmup_steps = warmup_steps
        self.decay = decay
        self.total_steps = total_steps
        self.end_ratio = end_ratio
        self.options = dict(options or {})

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return WARMUPS[self.warmup](step, self.warmup_steps)
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        return DECAYS[self.decay](step - self.warmup_steps, decay_steps, self.end_ratio, **self.options)


def effective_warmup(config: SchedulerConfig, total_steps: int) -> tuple[int, str | None]:
    """The warmup the schedule uses over ``total_steps`` optimizer steps, and why it differs.

    ``scheduler.warmup_steps`` counts optimizer steps, like ``total_steps`` (``training.max_steps``
    or the epochs' steps; with ``grad_accum_steps`` > 1 an optimizer step is several micro-batches).
    When the warmup is at least as long as the run, it becomes
    ``max(1, total_steps × SHORT_RUN_WARMUP_PERCENT // 100)`` steps, so the LR reaches its peak
    early and the decay still ends at ``lr_end`` on the last step.

    Args:
        config: scheduler section.
        total_steps: number of optimizer steps of the run.

    Returns:
        ``(warmup_steps, message)``: the message (one line, for the start-up log) says what was
        scaled and why; None when ``scheduler.warmup_steps`` is used as configured.
    """
    warmup = config.warmup_steps
    if warmup == 0 or total_steps <= 0 or warmup < total_steps:
        return warmup, None
    scaled = max(1, total_steps * SHORT_RUN_WARMUP_PERCENT // 100)
    message = (
        f"scheduler.warmup_steps={warmup} ≥ {total_steps} total optimizer steps: warmup scaled to "
        f"{scaled} step{'' if scaled == 1 else 's'} ({SHORT_RUN_WARMUP_PERCENT}% of the run, at least 1)"
    )
    return scaled, message


def build_schedule(config: SchedulerConfig, peak_lr: float, total_steps: int) -> ComposedSchedule:
    """The multiplier function of ``config`` over ``total_steps`` optimizer steps.

    Args:
        config: scheduler section.
        peak_lr: the peak learning rate (``training.learning_rate``).
        total_steps: number of optimizer steps of the run.

    Returns:
        A picklable callable step → multiplier of the peak LR; its warmup is
        :func:`effective_warmup`'s.
    """
    lr_end = peak_lr / 10 if config.lr_end is None else config.lr_end
    options: dict[str, Any] = {}
    if config.name == "wsd":
        options = {"wsd_decay_fraction": config.wsd_decay_fraction, "wsd_decay_shape": config.wsd_decay_shape}
    elif config.name == "polynomial":
        options = {"power": config.power}
    elif config.name == "cosine_restarts":
        options = {"cycle_steps": config.cycle_steps, "cycle_mult": config.cycle_mult}
    return ComposedSchedule(
        warmup=config.warmup,
        warmup_steps=effective_warmup(config, total_steps)[0],
        decay=config.name,
        total_steps=total_steps,
        end_ratio=lr_end / peak_lr,
        options=options,
    )


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: SchedulerConfig, peak_lr: float, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` implementing ``config`` over ``total_steps`` optimizer steps.

    Each param group's LR is its own ``lr`` (peak LR × the group's multiplier) times the schedule.

    Args:
        optimizer: optimizer whose groups hold the peak LR (times any group multiplier).
        config: scheduler section.
        peak_lr: the peak learning rate (``training.learning_rate``).
        total_steps: number of optimizer steps of the run.

    Returns:
        The scheduler; call ``step()`` once per optimizer step. A warmup scaled to a short run
        (:func:`effective_warmup`) is logged here, once, at INFO.
    """
    message = effective_warmup(config, total_steps)[1]
    if message is not None:
        logger.info(message)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, build_schedule(config, peak_lr, total_steps))
