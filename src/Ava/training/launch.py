"""``ava train CONFIG --nproc N``: start N local training processes with ``torchrun``.

:func:`torchrun_command` builds the ``python -m torch.distributed.run --standalone`` command line
(one node, a free port and a private rendezvous, PyTorch's own launcher and failure handling: a
rank that fails ends the job, see :mod:`Ava.training.rank_aware_error_handler`);
:func:`launch_local` runs it and returns its exit code.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

_FORWARDED = (signal.SIGINT, signal.SIGTERM)


def torchrun_command(nproc: int, argv: Sequence[str], *, module: str = "Ava") -> list[str]:
    """The ``torchrun`` command that runs ``python -m <module> *argv`` on ``nproc`` local processes.

    Args:
        nproc: processes (ranks) on this machine.
        argv: the command-line arguments for every rank, without the ``--nproc`` option (e.g.
            ``["train", "configs/tiny.yaml", "training.max_steps=3"]``).
        module: the module each rank runs (``Ava``: the CLI).

    Returns:
        ``[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", N,
        "-m", module, *argv]``.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1 (got {nproc})")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", module, *argv]


def launch_local(nproc: int, argv: Sequence[str], *, module: str = "Ava", env: dict[str, str] | None = None) -> int:
    """Run :func:`torchrun_command` and wait for it; its exit code (``128 + n`` when killed by signal n).

    The launcher runs in its own process group; SIGINT and SIGTERM sent to this process are
    forwarded to that group once (torchrun then stops its workers with the same signal), so
    Ctrl-C stops the job cleanly instead of reaching every process twice.

    Args:
        nproc: processes (ranks) on this machine.
        argv: the command-line arguments for every rank, without ``--nproc``.
        module: the module each rank runs.
        env: the environment (default: this process's), with ``OMP_NUM_THREADS`` defaulting to
            1 as torchrun would set it.

    Returns:
        The launcher's exit code: 0 when every rank succeeded.
    """
    environment = dict(os.environ if env is None else env)
    environment.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(torchrun_command(nproc, argv, module=module), env=environment, start_new_session=True)

    def forward(signum: int, frame: FrameType | None) -> None:
        try:
            os.killpg(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {}
    if _in_main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in _FORWARDED}
    try:
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:  # a SIGINT handler installed by someone else: forward and keep waiting
                forward(signal.SIGINT, None)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:  # this process is leaving early: do not leave the job behind
            forward(signal.SIGTERM, None)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return 128 - code if code < 0 else code


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
