"""Data- and expert-parallel training: step time, the share of it spent in collectives, and scaling.

For 1, 2 and 4 processes (``--procs``) the script trains the same MoE with Ava's own training
step (:meth:`EnhancedModularTrainer.train_step` on the :class:`DistributedParallelism` that
``ava train`` builds: DDP wrapper, expert sharding, the balancing-count and load all-reduces, the
expert-gradient reduction, the global gradient-norm clip) under each strategy of ``--strategies``:

* ``ddp``: every rank holds every expert; gradients are all-reduced over all ranks.
* ``ep``: ``distributed.expert_parallel: 2`` on top of DDP (a ``(P/2) × 2`` mesh): each rank holds
  half the experts, token rows travel to them and back by all-to-all, expert gradients reduce over
  the ``dp`` group. Only where the process count is a multiple of 2.
* ``fsdp2``: FSDP2 over all ranks (all-gather + reduce-scatter, counted as "other").

One process is the reference (``strategy: none``, no collectives). Scaling is weak by default:
each rank reads ``--batch`` sequences per step, so P processes train on P × ``--batch``
sequences per step (``--global-batch`` fixes the global batch instead: strong scaling). The token
ids are random (the same global batch on every rank, each rank reading rows r, r + P, ... as the
trainer does); warm-up steps (``--warmup``) run first.

Method. Each worker runs ``--steps`` timed steps (wall time per step; the step time of a
configuration is the largest over ranks of each rank's median, since the ranks wait for each
other), then ``--profile-steps`` more under ``torch.profiler``. Gloo runs every collective on its
own worker thread and the profiler records that work as one ``gloo:<collective>`` event per call,
from the moment the collective starts executing until it completes, waiting for the slowest peer
included. The share of a kind of collective is the union of those events' time intervals (so
concurrent calls count once) divided by the profiled window's wall time, averaged over the ranks.
``gloo:all_reduce`` events are the DDP gradient buckets plus Ava's own small all-reduces (loss
terms, expert loads, balancing counts, the gradient norm, the expert gradients over ``dp``);
``gloo:all_to_all`` events are the expert-parallel token exchange (rows and their per-expert
counts, forward and backward). The all-to-all blocks the training thread (the dispatcher waits
for it), so its share is time lost; DDP's bucket all-reduces start during the backward pass and
overlap the remaining backward compute, so the all-reduce share is time *in flight*, an upper
bound on the time it costs. The profiler slows the steps a little, which is why tokens/s comes
from the unprofiled steps. The "on CPU" column is the training thread's CPU time (``time.thread_time``)
÷ its wall time over the timed steps, averaged over the ranks: the rest of the step the thread
waited, for its peers, for a collective or, on an oversubscribed machine, for a core (on CUDA it
mostly measures the host waiting for the GPU).

CPU (the default when CUDA is absent): forked workers, one thread each (``torch.set_num_threads(1)``),
Gloo over a ``FileStore``. The machine's core count is printed: with more processes than cores
the processes share cores and the tokens/s ratio says so. All figures are ratios within one
invocation; absolute numbers vary from run to run on a shared machine. ``--rounds N`` runs the
whole plan N times, one configuration after the other, and reports for each configuration the
round with the median step time.

CUDA (``--device cuda``, or ``auto`` with at least two GPUs): spawned workers, one GPU each,
NCCL, bf16 autocast by default; the same table plus tokens/s per GPU and MFU per GPU (model FLOPs
from ``EnhancedMoEModel.flops_per_token`` ÷ ``--peak-tflops``, default a bf16 matmul peak measured
on each GPU in the same run). Collective shares come from the NCCL kernels' device time
(``ProfilerActivity.CUDA``: ``AllReduce`` kernels; ``SendRecv`` / ``AllToAll`` kernels for the
all-to-all) over the profiled window's wall time; NCCL kernels run on their own streams, so they
may overlap compute there too. This path is written to the same contract but was not run when
the script was added (its author had no GPU machine): check its output before quoting it.

    python benchmarks/distributed.py                                  # 1, 2, 4 processes; ddp and ep
    python benchmarks/distributed.py --procs 1 2 --strategies ddp --steps 4
    python benchmarks/distributed.py --hidden 256 --layers 4 --experts 16 --top-k 4
    python benchmarks/distributed.py --device cuda --procs 1 2 4 8 --hidden 1024 --layers 8 --heads 16 \
        --kv-heads 4 --experts 64 --top-k 8 --moe-intermediate 512 --vocab 32768 --seq-len 2048 --batch 4
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
KINDS = ("all_reduce", "all_to_all", "other")
# strategy name -> (distributed.strategy, distributed.expert_parallel)
STRATEGIES = {"ddp": ("ddp", 1), "ep": ("ddp", 2), "fsdp2": ("fsdp2", 1)}


# --------------------------------------------------------------------------------------------
# pure helpers (tests/test_distributed_benchmark.py)
# --------------------------------------------------------------------------------------------


def collective_kind(name: str) -> str | None:
    """The kind of collective a profiler event stands for, or None for anything else.

    ``gloo:all_reduce`` and NCCL ``AllReduce`` kernels are ``all_reduce``; ``gloo:all_to_all``,
    NCCL ``AllToAll`` and ``SendRecv`` kernels (NCCL's all-to-all) are ``all_to_all``; the other
    ``gloo:`` events and NCCL kernels (all-gather, reduce-scatter, broadcast, barrier) are ``other``.
    The ``c10d::`` / ``_c10d_functional::`` ops are the launch and wait on the calling thread, not
    the collective's own span, so they are None.
    """
    low = name.lower()
    if not (low.startswith("gloo:") or "nccl" in low):
        return None
    flat = low.replace("_", "")
    if "allreduce" in flat:
        return "all_reduce"
    if "alltoall" in flat or "sendrecv" in flat:
        return "all_to_all"
    return "other"


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    """Total length of the union of ``(start, end)`` intervals (microseconds in, seconds out)."""
    total, end_so_far = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= end_so_far:
            continue
        total += end - max(start, end_so_far)
        end_so_far = end
    return total / 1e6


def plan_runs(procs: list[int], strategies: list[str]) -> list[tuple[int, str]]:
    """``(processes, strategy)`` pairs to run: one process is the reference ``none`` (run once,
    first); ``ep`` only where the process count is a multiple of its expert-parallel size."""
    runs: list[tuple[int, str]] = [(1, "none")]
    for p in sorted(set(procs)):
        if p == 1:
            continue
        for name in strategies:
            if p % STRATEGIES[name][1] == 0:
                runs.append((p, name))
    return runs


def rows_per_rank(processes: int, per_rank: int, global_batch: int | None) -> int:
    """Sequences each rank reads per step: ``per_rank`` (weak scaling), or the global batch split evenly.

    Raises:
        ValueError: ``global_batch`` does not split evenly over ``processes``.
    """
    if global_batch is None:
        return per_rank
    if global_batch % processes:
        raise ValueError(f"--global-batch {global_batch} does not split over {processes} processes")
    return global_batch // processes


def summarize(processes: int, strategy: str, ranks: list[dict[str, Any]], tokens_per_step: int) -> dict[str, Any]:
    """One table row from the ranks' results (``step_s``: median step seconds; ``share``: by kind)."""
    step_s = max(r["step_s"] for r in ranks)  # the ranks wait for each other: the slowest sets the pace
    row = {"processes": processes, "strategy": strategy, "step_s": step_s, "tokens_per_s": tokens_per_step / step_s,
           "busy": statistics.fmean(r.get("busy", float("nan")) for r in ranks)}
    for kind in KINDS:
        row[kind] = statistics.fmean(r["share"][kind] for r in ranks)
    if "mfu" in ranks[0]:
        row["mfu"] = statistics.fmean(r["mfu"] for r in ranks)
    return row


def median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of one configuration's rounds, the one with the median step time (the lower middle of an even count)."""
    return sorted(runs, key=lambda r: r["step_s"])[(len(runs) - 1) // 2]


def format_table(rows: list[dict[str, Any]], per_gpu: bool = False) -> str:
    """The result table; ``× 1 proc`` divides each row's tokens/s by the one-process row's."""
    reference = next((r["tokens_per_s"] for r in rows if r["processes"] == 1), None)
    head = ["procs", "strategy", "step ms", "tokens/s", "× 1 proc", "all-reduce", "all-to-all", "other coll.", "on CPU"]
    if per_gpu:
        head += ["tok/s/GPU", "MFU/GPU"]
    lines = [head]
    for r in rows:
        ratio = f"{r['tokens_per_s'] / reference:.2f}" if reference else "n/a"
        line = [str(r["processes"]), r["strategy"], f"{r['step_s'] * 1e3:.1f}", f"{r['tokens_per_s']:,.0f}", ratio,
                f"{r['all_reduce']:.1%}", f"{r['all_to_all']:.1%}", f"{r['other']:.1%}", f"{r.get('busy', float('nan')):.0%}"]
        if per_gpu:
            line += [f"{r['tokens_per_s'] / r['processes']:,.0f}", f"{r.get('mfu', float('nan')):.1%}"]
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# the worker: one rank
# --------------------------------------------------------------------------------------------


@dataclass
class Job:
    """What every rank of one configuration runs."""

    processes: int
    strategy: str
    device: str
    overrides: list[str]
    batch: int  # sequences per rank per step
    seq_len: int
    warmup: int
    steps: int
    profile_steps: int
    peak_flops: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def _config(job: Job, out: str, config_path: str) -> Any:
    from Ava.config import load_config

    strategy, ep = STRATEGIES.get(job.strategy, ("none", 1))
    dtype = "bf16" if job.device == "cuda" and job.extra.get("bf16", True) else "fp32"
    overrides = [f"run.output_dir={out}", f"run.device={job.device}", f"training.batch_size={job.batch}",
                 "training.grad_accum_steps=1", "training.global_batch_size=null", f"data.seq_len={job.seq_len}",
                 f"distributed.strategy={strategy if job.processes > 1 else 'none'}",
                 f"distributed.expert_parallel={ep}", "distributed.health_every=0", f"precision.dtype={dtype}",
                 "logging.time_breakdown=false", *job.overrides]
    return load_config(config_path, overrides)


def _rank_main(rank: int, job: Job, config_path: str, out: str) -> dict[str, Any]:
    """Build the trainer as ``ava train`` does, train warm-up + timed + profiled steps; this rank's figures."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from Ava.optimization import build_optimizer
    from Ava.training import EnhancedModularTrainer
    from Ava.training.lr_manager import build_scheduler
    from Ava.training.metrics import measure_matmul_peak

    config = _config(job, out, config_path)
    trainer = EnhancedModularTrainer.from_config(config)  # the parallelism and model `ava train` builds
    parallel = trainer.parallel
    total = job.warmup + job.steps + job.profile_steps
    trainer.optimizer = build_optimizer(trainer.model, config.optimizer, config.training.learning_rate, parallel.device)
    trainer.scheduler = build_scheduler(trainer.optimizer, config.scheduler, config.training.learning_rate, total)
    device = parallel.device
    cuda = device.type == "cuda"
    generator = torch.Generator().manual_seed(config.run.seed)
    vocab = config.model.vocab_size
    global_rows = job.batch * job.processes

    def micro_batches() -> list[torch.Tensor]:
        ids = torch.randint(0, vocab, (global_rows, job.seq_len), generator=generator)  # same on every rank
        return [ids[parallel.shard(list(range(global_rows)))]]

    def step() -> tuple[float, float]:
        batch = micro_batches()
        if cuda:
            torch.cuda.synchronize(device)
        start, cpu_start = time.perf_counter(), time.thread_time()
        trainer.train_step(batch)
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, time.thread_time() - cpu_start

    for _ in range(job.warmup):
        step()
    timed = [step() for _ in range(job.steps)]
    times = [wall for wall, _ in timed]
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if parallel.world_size > 1:
        dist.barrier()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(job.profile_steps):
            step()
        window_s = time.perf_counter() - start
    spans: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    for event in prof.events():
        kind = collective_kind(event.name)
        if kind is not None and event.time_range.end > event.time_range.start:
            spans[kind].append((event.time_range.start, event.time_range.end))
    result: dict[str, Any] = {
        "step_s": statistics.median(times),
        "busy": sum(cpu for _, cpu in timed) / sum(times),
        "share": {kind: min(union_seconds(spans[kind]) / window_s, 1.0) for kind in KINDS},
        "describe": parallel.describe(),
    }
    if cuda:
        peak = job.peak_flops or measure_matmul_peak(device, torch.bfloat16, size=8192)
        tokens_per_s_rank = job.batch * job.seq_len / statistics.median(times)
        result["mfu"] = tokens_per_s_rank * trainer.model.flops_per_token(job.seq_len) / peak
        result["peak_tflops"] = peak / 1e12
    return result


def _worker(rank: int, job: Job, config_path: str, out: str, store_file: str, queue: Any, timeout_s: float) -> None:
    import torch.distributed as dist

    code = 0
    warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job.processes),
                          LOCAL_WORLD_SIZE=str(job.processes))
        if job.device == "cuda":
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(1)
        backend = "nccl" if job.device == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"file://{store_file}", rank=rank, world_size=job.processes,
                                timeout=timedelta(seconds=timeout_s),
                                device_id=torch.device("cuda", rank) if job.device == "cuda" else None)
        result = _rank_main(rank, job, config_path, out)
        queue.put((rank, True, result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 (report everything, then leave without Python's teardown)
        queue.put((rank, False, traceback.format_exc()))
        code = 1
    queue.close()  # the queue writes from a feeder thread, which os._exit would kill before it has written
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # a Gloo worker sometimes aborts in Python's teardown (tests/distributed_harness.py)


def run_job(job: Job, config_path: str, timeout_s: float) -> list[dict[str, Any]]:
    """Every rank of ``job`` in its own process (fork on CPU, spawn on CUDA); their results in rank order."""
    ctx = mp.get_context("spawn" if job.device == "cuda" else "fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(rank, job, config_path, tmp, store_file, queue, timeout_s))
                 for rank in range(job.processes)]
        for proc in procs:
            proc.start()
        results: dict[int, Any] = {}
        try:
            for _ in range(job.processes):
                rank, ok, value = queue.get(timeout=timeout_s)
                if not ok:
                    raise RuntimeError(f"{job.processes} processes, {job.strategy}: rank {rank} failed:\n{value}")
                results[rank] = value
        finally:
            for proc in procs:
                proc.join(timeout=30 if len(results) == job.processes else 5)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    return [results[rank] for rank in range(job.processes)]


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


def _overrides(args: argparse.Namespace) -> list[str]:
    keys = {"hidden": "model.hidden_size", "layers": "model.num_layers", "heads": "model.num_heads",
            "kv_heads": "model.num_kv_heads", "experts": "model.num_experts", "top_k": "model.moe.top_k",
            "moe_intermediate": "model.moe.moe_intermediate_size", "vocab": "model.vocab_size"}
    out = [f"{key}={getattr(args, flag)}" for flag, key in keys.items() if getattr(args, flag) is not None]
    out.append(f"model.max_seq_len={args.seq_len}")
    return out + list(args.set)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"), help="config whose model is trained")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda with at least two GPUs, else cpu (Gloo)")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--strategies", nargs="+", choices=sorted(STRATEGIES), default=["ddp", "ep"])
    for flag, default in (("--hidden", 128), ("--layers", 2), ("--heads", 4), ("--kv-heads", 2), ("--experts", 8),
                          ("--top-k", 2), ("--moe-intermediate", 128), ("--vocab", 2048)):
        parser.add_argument(flag, type=int, default=default, help=f"model shape (default {default}; 0 = the config's)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank per step (weak scaling)")
    parser.add_argument("--global-batch", type=int, default=None, help="fixed sequences per step (strong scaling)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--profile-steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole plan this many times; each row is the round with the median step time")
    parser.add_argument("--fp32", action="store_true", help="CUDA: fp32 instead of bf16 autocast")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="CUDA MFU denominator per GPU (e.g. 989 for H100 bf16 dense); default: measured")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout and wait per configuration")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    args = parser.parse_args()
    for flag in ("hidden", "layers", "heads", "kv_heads", "experts", "top_k", "moe_intermediate", "vocab"):
        if getattr(args, flag) == 0:
            setattr(args, flag, None)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else "cpu"
    if device == "cuda" and max(args.procs) > torch.cuda.device_count():
        parser.error(f"--procs {max(args.procs)} needs as many GPUs; {torch.cuda.device_count()} visible")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    what = (f"{torch.cuda.device_count()} × {torch.cuda.get_device_name(0)}, NCCL" if device == "cuda"
            else f"CPU, Gloo, 1 thread per process, {cores} cores available to this run")
    print(f"torch {torch.__version__}; {what}")
    overrides = _overrides(args)
    print(f"model: {args.config} with {' '.join(overrides) or 'no overrides'}; seq {args.seq_len}; "
          f"{'global batch ' + str(args.global_batch) if args.global_batch else str(args.batch) + ' sequences per rank'}"
          f"; {args.warmup} warm-up + {args.steps} timed + {args.profile_steps} profiled steps", flush=True)

    samples: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for round_ in range(args.rounds):
        for processes, strategy in plan_runs(args.procs, args.strategies):
            note = f" ({processes} processes share {cores} cores)" if device == "cpu" and processes > (cores or 1) else ""
            job = Job(processes=processes, strategy=strategy, device=device, overrides=overrides,
                      batch=rows_per_rank(processes, args.batch, args.global_batch), seq_len=args.seq_len,
                      warmup=args.warmup, steps=args.steps, profile_steps=args.profile_steps,
                      peak_flops=args.peak_tflops * 1e12 if args.peak_tflops else None, extra={"bf16": not args.fp32})
            start = time.perf_counter()
            ranks = run_job(job, args.config, args.timeout)
            row = summarize(processes, strategy, ranks, job.batch * processes * args.seq_len)
            samples.setdefault((processes, strategy), []).append(row)
            print(f"  round {round_ + 1}: {ranks[0]['describe']}: {row['step_s'] * 1e3:.1f} ms/step "
                  f"({time.perf_counter() - start:.0f} s with start-up){note}", flush=True)
    rows = [median_row(runs) for runs in samples.values()]
    print()
    print(format_table(rows, per_gpu=device == "cuda"))
    if device == "cuda":
        print(f"MFU denominator: {ranks[0].get('peak_tflops', float('nan')):.0f} TFLOP/s per GPU"
              f"{' (--peak-tflops)' if args.peak_tflops else ' (bf16 matmul measured on each GPU)'}")
    print("all-reduce / all-to-all / other: share of the step's wall time with such a collective in flight "
          "(torch.profiler; see the module docstring). × 1 proc: tokens/s ÷ the one-process run above. "
          "on CPU: the training thread's CPU time ÷ its wall time over the timed steps (mean over ranks); the rest "
          "it waited, for peers, collectives or a core.")


if __name__ == "__main__":
    main()
