"""DistributedHealthChecker on 2 forked Gloo ranks: drift raises naming the rank, stragglers and outliers are reported."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from Ava.errors import AvaPeerError, AvaTrainingError
from Ava.training.distributed_health_checker import DistributedHealthChecker
from tests.distributed_harness import run_workers


class _Parallel:
    """The part of Parallelism the checker uses, over torch.distributed."""

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.gathers = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        self.gathers += 1
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return out


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _steps(rank, world_size, scenario):
    """Run 4 steps of the checker (every=2) under ``scenario``; (metrics per step, warnings, gathers or error)."""
    parallel = _Parallel()
    records = _Records()
    logging.getLogger("Ava.training.distributed_health_checker").addHandler(records)
    checker = DistributedHealthChecker(parallel, every=2)
    model = _model()
    results = []
    for step in range(4):
        started = time.perf_counter()
        if scenario == "perturb" and rank == 1 and step == 2:
            with torch.no_grad():
                model[2].bias[1] += 1e-4
        if scenario == "slow" and rank == 1:
            time.sleep(0.3)
        loss = torch.tensor(2.0 + 0.01 * rank)
        if scenario == "loss" and rank == 1 and step == 2:
            loss = torch.tensor(50.0)
        if scenario == "nan" and rank == 0:
            loss = torch.tensor(math.nan)
        try:
            metrics = checker.on_step(step, loss=loss, grad_norm=torch.tensor(1.0), step_time_s=time.perf_counter() - started,
                                      data_wait_s=0.0, memory_bytes=1e9 * (1 + 0.01 * rank), model=model)
        except (AvaTrainingError, AvaPeerError) as error:
            return results, records.messages, f"{type(error).__name__}: {error}"
        results.append(metrics)
    return results, records.messages, parallel.gathers


def test_identical_replicas_pass_with_one_gather_per_check():
    for results, warnings, gathers in run_workers(_steps, 2, "none", timeout_s=60):
        assert gathers == 2  # steps 0 and 2 of 0..3, one all_gather each
        assert [bool(m) for m in results] == [True, False, True, False]
        assert results[0]["health/replicated_params"] == 4
        assert results[0]["health/replica_max_rel_diff"] == 0.0
        assert results[0]["health/step_time_max_over_median"] > 0
        assert warnings == []


def test_a_perturbed_parameter_on_rank_1_raises_naming_rank_1():
    (_, _, error0), (_, _, error1) = run_workers(_steps, 2, "perturb", timeout_s=60)
    assert error0.startswith("AvaTrainingError: replicas drifted apart at step 2: rank 1 differs from rank 0 "
                             "in 1 of 4 replicated parameters, first 2.bias"), error0
    assert "resume from the last checkpoint" in error0
    assert error1 == "AvaPeerError: rank 0 stopped the run: replicas drifted apart at step 2"


def test_a_slow_rank_is_reported_as_straggler():
    (results, warnings, _), (results1, warnings1, _) = run_workers(_steps, 2, "slow", timeout_s=60)
    assert any("rank 1 is a straggler: step time" in w for w in warnings), warnings
    assert warnings1 == []  # rank 0 logs
    assert results[0]["health/slowest_rank"] == 1.0
    assert results[0]["health/step_time_max_over_median"] > 1.5
    assert results[0] == results1[0]


@pytest.mark.parametrize("scenario, expected", [
    ("loss", "rank 1 loss is an outlier: 50 vs 2 median of the other ranks (z = 96.0)"),
    ("nan", "rank 0 loss is an outlier: nan vs 2.01 median of the other ranks"),
])
def test_an_outlier_loss_is_reported(scenario, expected):
    (results, warnings, _), _ = run_workers(_steps, 2, scenario, timeout_s=60)
    assert any(expected in w for w in warnings), warnings
    assert results[2]["health/loss_max_z"] > 3


def test_every_must_be_positive():
    with pytest.raises(ValueError, match="every must be at least 1"):
        DistributedHealthChecker(object(), every=0)
