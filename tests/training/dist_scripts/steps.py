"""A torchrun job for tests/training/test_rank_errors.py: steps of one all_reduce each, inside RankErrors.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 steps.py MODE PID_DIR [TIMEOUT_S]``

MODE: ``ok`` (5 steps, clean exit), ``raise`` (rank 1 raises RuntimeError at step 3), ``user``
(rank 1 raises an AvaConfigError at step 3), ``loop`` (many steps, for the test to kill or stop
rank 1). Each rank writes its pid to ``PID_DIR/rank<R>.pid`` and its step to ``PID_DIR/rank<R>.step``.
"""

from __future__ import annotations

import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from Ava.errors import AvaConfigError
from Ava.training.rank_aware_error_handler import RankErrors, finish_process

MESSAGE = "injected failure on purpose (tests/training/dist_scripts/steps.py)"


def main() -> None:
    mode, pid_dir = sys.argv[1], Path(sys.argv[2])
    timeout_s = float(sys.argv[3]) if len(sys.argv) > 3 else 10.0
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    guard = RankErrors(rank, world_size, log_file=pid_dir / f"rank{rank}.log")
    with guard:
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
        (pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
        steps = 5 if mode in ("ok", "raise", "user") else 2000
        for step in range(steps):
            guard.heartbeat(step)
            (pid_dir / f"rank{rank}.step").write_text(str(step))
            if rank == 1 and step == 3 and mode == "raise":
                raise RuntimeError(MESSAGE)
            if rank == 1 and step == 3 and mode == "user":
                raise AvaConfigError(MESSAGE)
            value = torch.ones(4) * (rank + 1)
            dist.all_reduce(value)
            assert value[0].item() == world_size * (world_size + 1) / 2
            time.sleep(0.02)
        print(f"rank {rank}: done after {steps} steps", flush=True)
    finish_process(guard.exit_code, clean=guard.exit_code == 0)


if __name__ == "__main__":
    main()
