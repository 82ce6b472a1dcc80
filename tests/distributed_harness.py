"""Run a test function on N forked Gloo processes (import as ``from tests.distributed_harness import ...``).

Each worker joins a Gloo process group (a ``FileStore`` in a temporary folder, so no ports race),
runs ``fn(rank, world_size, *args)`` with one thread, and sends back what ``fn`` returned (it must
pickle). Every worker ends with ``barrier(); destroy_process_group()`` and ``os._exit(code)``:
without that sequence a Gloo worker sometimes aborts at exit ("terminate called without an active
exception"). A worker's exception comes back as its traceback and fails the test, naming the rank.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any


def _worker(rank: int, world_size: int, store_file: str, fn: Callable[..., Any], args: tuple,
            queue: mp.Queue, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    code = 0
    # A worker still running shortly before the parent gives up prints where it is (hangs debug themselves).
    faulthandler.dump_traceback_later(max(timeout_s - 5, 1), exit=False)
    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
        # By value: the queue's own pickler would pass tensors as shared-memory handles, which
        # die with this process before the parent reads them.
        result = pickle.dumps(fn(rank, world_size, *args))
        queue.put((rank, True, result))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 (report everything, then leave without Python's teardown)
        queue.put((rank, False, traceback.format_exc()))
        code = 1
    # The queue writes from a feeder thread, which os._exit would kill before it has written.
    queue.close()
    queue.join_thread()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_workers(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` forked Gloo processes; their results in rank order.

    Args:
        fn: a module-level function (it runs in the forked children).
        world_size: number of processes.
        *args: passed to ``fn`` after the rank and world size.
        timeout_s: the process group's collective timeout, and the longest the parent waits.

    Raises:
        AssertionError: a worker raised (its rank and traceback), or the workers did not finish.
    """
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_file = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_worker, args=(rank, world_size, store_file, fn, args, queue, timeout_s))
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        results: dict[int, Any] = {}
        failures: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(results) < world_size and not failures:
            try:
                rank, ok, value = queue.get(timeout=1.0)
            except queue_module.Empty:
                silent = sorted(set(range(world_size)) - set(results))
                died = [f"rank {r} exited with code {procs[r].exitcode}" for r in silent
                        if procs[r].exitcode not in (None, 0)]
                if died:
                    failures.append(f"{', '.join(died)} without a report")
                elif time.monotonic() > deadline:
                    failures.append(f"workers {silent} did not answer within {timeout_s:.0f} s")
                continue
            if ok:
                results[rank] = pickle.loads(value)
            else:
                failures.append(f"rank {rank}:\n{value}")
        for proc in procs:
            proc.join(timeout=30 if not failures else 5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        codes = [proc.exitcode for proc in procs]
        if failures:
            raise AssertionError("\n".join(failures))
        assert codes == [0] * world_size, f"worker exit codes {codes}"
        return [results[rank] for rank in range(world_size)]
