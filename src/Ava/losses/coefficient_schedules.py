"""Schedules of the MoE balancing coefficients: each coefficient's value at an optimizer step.

``model.moe`` holds five balancing coefficients (``aux_loss_coef``, ``seq_aux_loss_coef``,
``global_aux_loss_coef``, ``z_loss_coef`` and the aux-free bias step ``bias_update_rate``) and
``model.moe.coef_schedules`` an optional :class:`~Ava.config.model_config.CoefSchedule` for each.
The value is a pure function of the config and the optimizer step, so it needs no state of its
own: the trainer's step (checkpointed) is the whole position, and a resumed run continues the
schedule where it stopped. It lives with the losses because the model reads it when it weights
its balancing terms (``models/`` may import ``losses/``, not ``training/``).
"""

from __future__ import annotations

import math

from ..config.model_config import CoefSchedule, MoEConfig

BALANCING_COEFFICIENTS = (
    "aux_loss_coef", "seq_aux_loss_coef", "global_aux_loss_coef", "z_loss_coef", "bias_update_rate",
)
"""The ``model.moe`` keys a schedule can drive (the fields of ``model.moe.coef_schedules``)."""


def scheduled_value(schedule: CoefSchedule | None, base: float, step: int) -> float:
    """One coefficient's value at optimizer ``step``.

    With ``r = min(step / steps, 1)`` and ``end`` = ``schedule.end`` or ``base``: linear
    ``start + (end − start)·r``; cosine ``end + (start − end)·(1 + cos πr)/2``; step ``start``
    while ``step < steps``, then ``end``; constant ``end``.

    Args:
        schedule: the coefficient's schedule, or None (constant ``base``).
        base: the coefficient's own value in ``model.moe`` (the default end).
        step: optimizer steps completed before this one (0 for the first step).

    Returns:
        The coefficient, ≥ 0.
    """
    if schedule is None:
        return base
    end = base if schedule.end is None else schedule.end
    if schedule.kind == "constant":
        return end
    assert schedule.steps is not None  # validated: every other kind needs steps
    if step >= schedule.steps:
        return end  # exactly the configured value once the schedule is over, no rounding residue
    if schedule.kind == "step":
        return schedule.start
    r = max(step, 0) / schedule.steps
    if schedule.kind == "linear":
        return schedule.start + (end - schedule.start) * r
    return end + (schedule.start - end) * 0.5 * (1.0 + math.cos(math.pi * r))  # cosine


def balancing_coefficients(moe: MoEConfig, step: int, scheduled_only: bool = False) -> dict[str, float]:
    """Every balancing coefficient of ``moe`` at optimizer ``step``.

    Args:
        moe: the ``model.moe`` section.
        step: optimizer steps completed before this one.
        scheduled_only: only the coefficients that have a schedule (what the trainer logs).

    Returns:
        ``{name: value}`` in :data:`BALANCING_COEFFICIENTS` order.
    """
    values = {}
    for name in BALANCING_COEFFICIENTS:
        schedule = getattr(moe.coef_schedules, name)
        if scheduled_only and schedule is None:
            continue
        values[name] = scheduled_value(schedule, getattr(moe, name), step)
    return values
