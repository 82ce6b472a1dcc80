"""Cross-rank health of a distributed run: stragglers, outlier ranks and replicas that drifted apart.

Every ``every`` steps, :meth:`DistributedHealthChecker.on_step` gathers one small float64 vector
per rank in ONE ``all_gather``: the rank's loss, gradient norm, step time, data wait and memory,
followed by two checksums (sum and sum of absolute values, in float64) of each replicated
parameter. The vector is built on the device; the gathered matrix is read to the host once. Then:

* stragglers: a rank whose step time (or data wait) exceeds ``straggler_ratio`` times the median
  of the other ranks (and by at least ``min_gap_s``) is logged on rank 0. Note that ranks that
  synchronise inside the step (DDP's gradient all-reduce) all see the slowest rank's step time;
  the time a rank spends before its first blocking collective (or its data wait) tells them apart.
* outliers: a rank whose loss, gradient norm or memory lies above the median of the other ranks
  by more than ``z_threshold`` robust deviations (median absolute deviation, at least
  ``relative_floor`` of the median), or is not finite while the others are, is logged on rank 0.
* replica drift: parameters that every rank should hold identically (DDP's, a DTensor's
  ``Replicate`` ones; never FSDP2's shards nor expert-parallel slices) must have the same
  checksums on every rank. Ranks outside the largest group of agreeing ranks (the group holding
  rank 0 on a tie) stop the run: rank 0 raises :class:`~Ava.errors.AvaTrainingError` naming them
  and the first differing parameter, the other ranks :class:`~Ava.errors.AvaPeerError`.

The returned metrics (the same on every rank) are for the trainer to log, e.g.
``health/step_time_max_over_median``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn

from ..errors import AvaPeerError, AvaTrainingError

logger = logging.getLogger(__name__)

_SCALARS = ("loss", "grad_norm", "step_time_s", "data_wait_s", "memory_bytes")
_MAD_TO_STD = 1.4826


class _Gatherer(Protocol):
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]: ...


def _median(values: list[float]) -> float:
    finite = sorted(v for v in values if math.isfinite(v))
    if not finite:
        return math.nan
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2


def _local(param: torch.Tensor) -> torch.Tensor | None:
    """The values of ``param`` that every rank holds alike: a plain tensor, a fully replicated
    DTensor's local tensor; None for a sharded DTensor."""
    try:
        from torch.distributed.tensor import DTensor, Replicate
    except ImportError:  # torch without distributed
        return param
    if isinstance(param, DTensor):
        if all(isinstance(placement, Replicate) for placement in param.placements):
            return param.to_local()
        return None
    return param


class DistributedHealthChecker:
    """Every ``every`` steps, compare the ranks of a distributed run (one all_gather) and report.

    Args:
        parallel: the run's parallelism (``rank``, ``world_size``, ``is_main``,
            ``all_gather(tensor) -> list[Tensor]``).
        every: check every this many steps (steps ``0, every, 2·every, …``).
        z_threshold: robust z-score above which a rank's loss, gradient norm or memory is an outlier.
        drift_tolerance: largest relative difference (to the parameter's sum of absolute values)
            between two ranks' checksums of a replicated parameter; replicas of a correct run are
            bitwise equal, so this only absorbs float64 rounding.
        straggler_ratio: a rank whose step time (or data wait) is more than this times the other
            ranks' median is a straggler.
        min_gap_s: ... and at least this many seconds more (ignores noise on very short steps).
        relative_floor: the deviation scale of the outlier z-score is at least this fraction of the
            other ranks' median (two ranks have no spread to measure; different data shards give
            somewhat different losses).
        param_filter: ``(name, param) -> bool``: which parameters to checksum (default: every
            parameter that is neither an expert-parallel slice nor a sharded DTensor). It must give
            the same answer on every rank.

    Raises:
        ValueError: ``every`` < 1.
    """

    def __init__(self, parallel: _Gatherer, every: int, z_threshold: float = 3.0, drift_tolerance: float = 1e-9,
                 *, straggler_ratio: float = 1.5, min_gap_s: float = 0.05, relative_floor: float = 0.25,
                 param_filter: Callable[[str, nn.Parameter], bool] | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1 (got {every})")
        self.parallel = parallel
        self.every = every
        self.z_threshold = z_threshold
        self.drift_tolerance = drift_tolerance
        self.straggler_ratio = straggler_ratio
        self.min_gap_s = min_gap_s
        self.relative_floor = relative_floor
        self.param_filter = param_filter
        self._params: tuple[int, list[str], list[torch.Tensor]] | None = None

    # -- what is checked -----------------------------------------------------------------------

    def replicated_parameters(self, model: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
        """Names and local values of the parameters and floating buffers every rank holds alike (cached per model)."""
        if self._params is not None and self._params[0] == id(model):
            return self._params[1], self._params[2]
        try:
            from ..layers.expert_parallel import expert_parameter_names

            experts = expert_parameter_names(model)
        except Exception:  # noqa: BLE001 (a model without MoE layers)
            experts = set()
        names, tensors = [], []
        for name, param in model.named_parameters():
            if name in experts or (self.param_filter is not None and not self.param_filter(name, param)):
                continue
            local = _local(param)
            if local is not None:
                names.append(name.removeprefix("module."))
                tensors.append(local)
        # Floating buffers too: the routers' aux-free ``expert_bias`` is updated on every rank from
        # all-reduced loads, never broadcast, so equal biases are part of a healthy run.
        for name, buffer in model.named_buffers():
            if buffer.is_floating_point() and (local := _local(buffer)) is not None:
                names.append(name.removeprefix("module."))
                tensors.append(local)
        self._params = (id(model), names, tensors)
        return names, tensors

    # -- the step --------------------------------------------------------------------------------

    def on_step(self, step: int, *, loss: torch.Tensor | float, grad_norm: torch.Tensor | float | None,
                step_time_s: float, data_wait_s: float = 0.0, memory_bytes: float | None = None,
                model: nn.Module | None = None) -> dict[str, float]:
        """Check the ranks at ``step`` when it is a multiple of ``every``; call it on every rank, every step.

        Args:
            step: the optimizer step just finished.
            loss: this rank's loss (a tensor stays on its device).
            grad_norm: this rank's gradient norm before clipping (tensor or float; None: not measured).
            step_time_s: this rank's wall time of the step (seconds).
            data_wait_s: the part of it spent waiting for data.
            memory_bytes: this rank's memory in use (e.g. ``torch.cuda.max_memory_allocated()``); None: unknown.
            model: the model as trained (its replicated parameters are checksummed); None: no drift check.

        Returns:
            ``health/*`` metrics (the same on every rank); empty on the steps that are not checked.

        Raises:
            AvaTrainingError: on rank 0, when replicas drifted apart.
            AvaPeerError: on the other ranks, in that case.
        """
        if step % self.every:
            return {}
        names, tensors = self.replicated_parameters(model) if model is not None else ([], [])
        device = tensors[0].device if tensors else (loss.device if isinstance(loss, torch.Tensor) else None)
        if device is None:
            device = getattr(self.parallel, "device", torch.device("cpu"))
        values = (loss, grad_norm, step_time_s, data_wait_s, memory_bytes)
        # The host numbers travel in one copy; the device scalars (loss, norm) are copied in on the device.
        host = [math.nan if v is None or isinstance(v, torch.Tensor) else float(v) for v in values]
        scalars = torch.tensor(host, dtype=torch.float64).to(device, non_blocking=True)
        for i, value in enumerate(values):
            if isinstance(value, torch.Tensor):
                if hasattr(value, "full_tensor"):  # a DTensor (FSDP2's total norm)
                    value = value.full_tensor()
                scalars[i] = value.detach().reshape(()).to(device=device, dtype=torch.float64)
        parts = [scalars]
        if tensors:
            with torch.no_grad():
                parts.append(torch.stack([t.sum(dtype=torch.float64) for t in tensors]).to(device))
                parts.append(torch.stack([t.abs().sum(dtype=torch.float64) for t in tensors]).to(device))
        stats = torch.cat(parts)
        rows = torch.stack(self.parallel.all_gather(stats)).cpu()  # the one host read
        return self._analyse(step, rows, names)

    # -- the analysis (every rank alike, no collectives) -------------------------------------------

    def _analyse(self, step: int, rows: torch.Tensor, names: list[str]) -> dict[str, float]:
        world = rows.shape[0]
        columns = {key: rows[:, i].tolist() for i, key in enumerate(_SCALARS)}
        findings: list[str] = []
        metrics: dict[str, float] = {}

        for key, label in (("step_time_s", "step time"), ("data_wait_s", "data wait")):
            values = columns[key]
            median_all = _median(values)
            metrics[f"health/{key.removesuffix('_s')}_max_s"] = max(values)
            if key == "step_time_s":
                metrics["health/step_time_max_over_median"] = max(values) / median_all if median_all > 0 else 1.0
            for rank, value in enumerate(values):
                others = _median(values[:rank] + values[rank + 1:])
                if world > 1 and value - others > self.min_gap_s and value > self.straggler_ratio * others:
                    findings.append(f"rank {rank} is a straggler: {label} {value:.3f} s vs {others:.3f} s "
                                    f"median of the other ranks ({value / others if others > 0 else math.inf:.1f}x)")
        metrics["health/slowest_rank"] = float(max(range(world), key=lambda r: columns["step_time_s"][r]))

        for key, label, fmt in (("loss", "loss", ".4g"), ("grad_norm", "gradient norm", ".4g"),
                                ("memory_bytes", "memory", ".3g")):
            values = columns[key]
            worst = 0.0
            for rank, value, z in self._outliers(values):
                worst = max(worst, z)
                if z > self.z_threshold:
                    others = _median(values[:rank] + values[rank + 1:])
                    shown = (f"{value / 2**30:.2f} GiB vs {others / 2**30:.2f} GiB" if key == "memory_bytes"
                             else f"{value:{fmt}} vs {others:{fmt}}")
                    findings.append(f"rank {rank} {label} is an outlier: {shown} median of the other ranks"
                                    + (f" (z = {z:.1f})" if math.isfinite(z) else ""))
            metrics[f"health/{key.removesuffix('_bytes')}_max_z"] = worst
        finite_memory = [v for v in columns["memory_bytes"] if math.isfinite(v)]
        if finite_memory and _median(finite_memory) > 0:
            metrics["health/memory_max_over_median"] = max(finite_memory) / _median(finite_memory)

        if self.parallel.is_main:
            for finding in findings:
                logger.warning("health at step %d: %s", step, finding)

        metrics["health/replicated_params"] = float(len(names))
        if names:
            self._check_drift(step, rows[:, len(_SCALARS):], names, metrics)
        return metrics

    def _outliers(self, values: list[float]) -> list[tuple[int, float, float]]:
        """(rank, value, one-sided robust z against the other ranks) per rank; inf for a lone non-finite value."""
        out = []
        for rank, value in enumerate(values):
            others = [v for i, v in enumerate(values) if i != rank and math.isfinite(v)]
            if not others:
                continue
            median = _median(others)
            if not math.isfinite(value):  # the others have finite values
                out.append((rank, value, math.inf))
                continue
            mad = _median([abs(v - median) for v in others]) * _MAD_TO_STD
            scale = max(mad, self.relative_floor * abs(median), 1e-12)
            out.append((rank, value, max(0.0, (value - median) / scale)))
        return out

    def _check_drift(self, step: int, sums: torch.Tensor, names: list[str], metrics: dict[str, float]) -> None:
        world, count = sums.shape[0], len(names)
        total, absolute = sums[:, :count], sums[:, count:]

        def differ(a: int, b: int) -> torch.Tensor:
            scale = torch.maximum(absolute[a], absolute[b]).clamp_min(1e-300)
            rel = torch.maximum((total[a] - total[b]).abs(), (absolute[a] - absolute[b]).abs()) / scale
            both_nan = total[a].isnan() & total[b].isnan()
            return (rel > self.drift_tolerance) | (rel.isnan() & ~both_nan)

        groups: list[list[int]] = []
        for rank in range(world):
            for group in groups:
                if not differ(group[0], rank).any():
                    group.append(rank)
                    break
            else:
                groups.append([rank])
        reference = max(groups, key=lambda g: (len(g), 0 in g))
        ref = reference[0]
        worst = 0.0
        for rank in range(world):
            scale = torch.maximum(absolute[ref], absolute[rank]).clamp_min(1e-300)
            rel = ((total[ref] - total[rank]).abs() / scale).nan_to_num(nan=0.0)
            worst = max(worst, float(rel.max()))
        metrics["health/replica_max_rel_diff"] = worst
        drifted = sorted(r for r in range(world) if r not in reference)
        if not drifted:
            return
        first = drifted[0]
        mask = differ(ref, first)
        index = int(mask.nonzero()[0])
        which = ", ".join(str(r) for r in drifted)
        message = (f"replicas drifted apart at step {step}: rank{'s' if len(drifted) > 1 else ''} {which} "
                   f"{'differ' if len(drifted) > 1 else 'differs'} from rank{'s' if len(reference) > 1 else ''} "
                   f"{', '.join(str(r) for r in reference)} in {int(mask.sum())} of {count} replicated parameters, "
                   f"first {names[index]} (sum {float(total[first, index]):.10g} vs {float(total[ref, index]):.10g}). "
                   "Something changed parameters on some ranks only (per-rank code, seeds or config, a missed "
                   "gradient all-reduce): fix it and resume from the last checkpoint.")
        if self.parallel.is_main:
            raise AvaTrainingError(message)
        raise AvaPeerError(f"rank 0 stopped the run: replicas drifted apart at step {step}")
