"""The pure helpers of benchmarks/distributed.py (no processes started, no timing)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "distributed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_distributed", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_collective_kinds_of_gloo_events_and_nccl_kernels(bench):
    assert bench.collective_kind("gloo:all_reduce") == "all_reduce"
    assert bench.collective_kind("gloo:all_to_all") == "all_to_all"
    assert bench.collective_kind("gloo:all_gather") == "other"
    assert bench.collective_kind("ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)") \
        == "all_reduce"
    assert bench.collective_kind("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)") == "all_to_all"
    assert bench.collective_kind("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL") == "other"
    # the launch and wait ops on the calling thread are not the collective's span
    for name in ("c10d::allreduce_", "_c10d_functional::wait_tensor", "c10d::alltoall_base_", "aten::mm"):
        assert bench.collective_kind(name) is None


def test_union_counts_overlapping_intervals_once(bench):
    assert bench.union_seconds([]) == 0.0
    assert bench.union_seconds([(0, 10), (5, 20), (30, 40)]) == pytest.approx(30e-6)
    assert bench.union_seconds([(0, 100), (10, 20)]) == pytest.approx(100e-6)


def test_plan_runs_one_reference_then_ep_where_it_divides(bench):
    assert bench.plan_runs([1, 2, 4], ["ddp", "ep"]) == [(1, "none"), (2, "ddp"), (2, "ep"), (4, "ddp"), (4, "ep")]
    assert bench.plan_runs([3], ["ddp", "ep"]) == [(1, "none"), (3, "ddp")]


def test_rows_per_rank_weak_and_strong_scaling(bench):
    assert bench.rows_per_rank(4, 8, None) == 8
    assert bench.rows_per_rank(4, 8, 16) == 4
    with pytest.raises(ValueError, match="does not split"):
        bench.rows_per_rank(3, 8, 16)


def test_table_divides_by_the_one_process_row(bench):
    ranks_one = [{"step_s": 0.2, "share": {"all_reduce": 0.0, "all_to_all": 0.0, "other": 0.0}}]
    ranks_two = [{"step_s": 0.2, "share": {"all_reduce": 0.1, "all_to_all": 0.0, "other": 0.0}},
                 {"step_s": 0.25, "share": {"all_reduce": 0.3, "all_to_all": 0.0, "other": 0.0}}]
    rows = [bench.summarize(1, "none", ranks_one, 1000), bench.summarize(2, "ddp", ranks_two, 2000)]
    assert rows[1]["step_s"] == 0.25 and rows[1]["all_reduce"] == pytest.approx(0.2)
    table = bench.format_table(rows)
    assert "| 2     | ddp      | 250.0" in table and "1.60" in table and "20.0%" in table
    assert bench.median_row([{"step_s": 3}, {"step_s": 1}, {"step_s": 2}]) == {"step_s": 2}
