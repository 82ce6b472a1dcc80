"""Failures of a distributed run: reported once, with the rank named, and the job ends without hanging.

A run that ``torchrun`` started ends when any rank's process exits non-zero: the elastic agent then
stops the other ranks (SIGTERM, SIGKILL 30 s later) and prints a summary whose "Root Cause" is the
first failure it observed, read from the rank's ``TORCHELASTIC_ERROR_FILE``
(:mod:`torch.distributed.elastic.multiprocessing.errors`). This module makes each rank's part of
that short and exact:

* :class:`RankErrors`, the context the distributed ``ava train`` runs inside. An exception is
  reported once, as one line ``rank R: <message>`` (an :class:`~Ava.errors.AvaError` keeps its
  own one-line message; any other exception reads ``rank R: Type: message`` and its traceback
  goes to the rank's log file only). Under ``torchrun`` that line is the rank's error file, which
  the agent prints in its summary; without ``torchrun`` it is printed on stderr.
* A rank that fails only because a peer died or stopped answering (Gloo's "Connection closed by
  peer", a collective timeout, :class:`~Ava.errors.AvaPeerError`) reports a short secondary line
  naming that peer, e.g. ``rank 0: rank 1 stopped answering at step 3 (this rank reached step 4)``.
  To name it, every rank keeps a heartbeat in the process group's store (``ava/heartbeat/<rank>``
  = its step, :meth:`RankErrors.heartbeat`); a failing rank marks ``ava/failed/<rank>`` and a rank
  that lost a peer marks ``ava/alive/<rank>``, so the ranks that marked nothing within
  ``grace_s`` are the ones that died or hang. A secondary failure's error file is dated one second
  later, so the agent's "first observed failure" is the rank that caused it.
* :func:`finish_process`, the way out that avoids Gloo's exit-time abort ("terminate called
  without an active exception"): after a clean run ``barrier(); destroy_process_group()``; then
  flush the logs, stdout and stderr and ``os._exit(code)``, never Python's own teardown.

Example (the CLI's distributed path)::

    guard = RankErrors(rank, world_size, log_file=run_dir / "logs" / f"rank{rank}.log")
    with guard:
        trainer.train(on_step=guard.heartbeat)
    finish_process(guard.exit_code, clean=guard.exit_code == 0)
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, TypeVar

import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import ErrorHandler, record

from ..errors import AvaError, AvaPeerError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Exit code of a rank that failed with a user error (an AvaError), as the CLI's.
USER_ERROR_CODE = 2
#: Exit code of a rank that failed on its own with any other exception, or because a peer failed.
FAILURE_CODE = 1
#: Exit code after Ctrl-C.
INTERRUPT_CODE = 130

# What Gloo / NCCL / c10d say when the other end of a collective is gone or silent.
_PEER_SIGNS = (
    "connection closed by peer", "connection reset by peer", "broken pipe", "timed out", "timeout",
    "connection refused", "socket closed", "communicator was aborted", "nccl communicator", "watchdog",
    "no route to host", "end of file", "read error", "write error",
)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` means another rank died or stopped answering, rather than a fault of this rank.

    True for :class:`~Ava.errors.AvaPeerError` and for the errors of a collective or of the store
    whose peer is gone: :class:`torch.distributed.DistError` (``DistBackendError``,
    ``DistNetworkError``, ``DistStoreError``) and Gloo's ``RuntimeError`` ("Connection closed by
    peer", "Timed out waiting ... for recv").
    """
    if isinstance(error, AvaPeerError):
        return True
    if isinstance(error, AvaError):
        return False
    if isinstance(error, dist.DistError):
        return True
    if isinstance(error, (RuntimeError, ConnectionError, TimeoutError)):
        text = str(error).lower()
        return any(sign in text for sign in _PEER_SIGNS)
    return False


def _one_line(text: str, limit: int = 300) -> str:
    """``text`` on one line (its first non-empty line), at most ``limit`` characters."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


class RankErrorHandler(ErrorHandler):
    """torchelastic's :class:`~torch.distributed.elastic.multiprocessing.errors.ErrorHandler`, with Ava's lines.

    The error file holds the one-line report as its ``message`` (the agent prints it as-is in its
    summary) and the traceback under ``traceback`` (kept in the file, not printed). Used by
    :class:`RankErrors` and by :func:`record_rank_errors`.
    """

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def initialize(self) -> None:
        """Enable :mod:`faulthandler` (a crash in C code prints every thread's Python stack) where stderr is a file."""
        try:
            sys.stderr.fileno()
        except (OSError, ValueError, AttributeError):  # a captured stderr (pytest, notebooks): nothing to do
            return
        super().initialize()

    def error_file(self) -> str | None:
        """``TORCHELASTIC_ERROR_FILE`` (set by torchrun), or None when no agent reads one."""
        return self._get_error_file_path()

    def write_report(self, line: str, trace: str = "", secondary: bool = False) -> None:
        """Report ``line`` once: in the agent's error file under torchrun, else on stderr.

        Args:
            line: the one-line report (``rank R: ...``).
            trace: the traceback (kept in the error file only).
            secondary: a failure caused by another rank: dated a second later, so that the agent
                names the rank that caused it as the root cause.
        """
        path = self.error_file()
        if not path:
            print(line, file=sys.stderr, flush=True)
            return
        # ErrorHandler's format; the agent prints extraInfo.py_callstack as the failure's "traceback":
        # there it gets the one line, and the traceback stays in the file.
        stamp = int(time.time()) + (1 if secondary else 0)
        data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(stamp),
                                                           "ava_traceback": trace, "ava_secondary": secondary}}}
        try:
            with open(path, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
        except OSError:
            print(line, file=sys.stderr, flush=True)

    def record_exception(self, e: BaseException) -> None:
        """The agent's hook for an uncaught exception (:func:`record`): one line, traceback in the file."""
        line = f"rank {self.rank}: {e}" if isinstance(e, AvaError) else f"rank {self.rank}: {type(e).__name__}: {e}"
        self.write_report(_one_line(line, 2000), traceback.format_exc(), secondary=is_peer_failure(e))


def record_rank_errors(fn: Callable[..., T], rank: int | None = None) -> Callable[..., T | None]:
    """torchelastic's :func:`~torch.distributed.elastic.multiprocessing.errors.record` with Ava's one-line report.

    For an entry point that lets exceptions escape (e.g. the CLI's ``main`` before it enters
    :class:`RankErrors`): the agent then names the rank and the error instead of "To enable
    traceback see ...".

    Args:
        fn: the entry point.
        rank: this process's rank; default ``RANK`` from the environment.
    """
    return record(fn, error_handler=RankErrorHandler(int(os.environ.get("RANK", "0")) if rank is None else rank))


def _bounded(fn: Callable[[], T], timeout_s: float) -> T | None:
    """``fn()`` in a daemon thread, at most ``timeout_s`` seconds; None when it failed or took longer.

    Store calls block when the store's host is gone or stopped; the failure path must not hang on them.
    """
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(fn())
        except Exception:  # noqa: BLE001 (a dead store is expected here)
            pass

    thread = threading.Thread(target=target, name="ava-rank-errors-store", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return box[0] if box else None


class RankErrors:
    """Context of one rank's work in a distributed run: reports its failure once and keeps a heartbeat.

    Exceptions are caught, reported and turned into :attr:`exit_code` (the context suppresses
    them); call :func:`finish_process` afterwards. ``SystemExit`` passes its code through without a
    report (whoever raised it has spoken).

    Args:
        rank: this process's rank.
        world_size: number of processes.
        store: the process group's key-value store; default: the default group's
            (``torch.distributed.distributed_c10d._get_default_store()``), looked up when first needed.
        log_file: where the traceback of an unexpected exception goes (appended); None: the
            ``Ava`` logger at DEBUG level only.
        grace_s: how long a rank that lost a peer waits for the other ranks to say whether they are
            alive or failed, before naming the silent ones.
        store_timeout_s: the longest any single store call may take on the failure path.

    Attributes:
        exit_code: 0, or the code the process should exit with.
        report: the line reported (None when nothing failed).
        step: the last step given to :meth:`heartbeat` (-1 before the first).
    """

    def __init__(self, rank: int, world_size: int, *, store: Any | None = None, log_file: Path | str | None = None,
                 grace_s: float = 2.0, store_timeout_s: float = 2.0) -> None:
        self.rank = rank
        self.world_size = world_size
        self.log_file = Path(log_file) if log_file is not None else None
        self.grace_s = grace_s
        self.store_timeout_s = store_timeout_s
        self.exit_code = 0
        self.report: str | None = None
        self.step = -1
        self._store = store
        self._store_ok = True
        self._handler = RankErrorHandler(rank)
        # A torchrun restart reuses the agent's store: keep each attempt's keys apart.
        self._prefix = f"ava/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"

    # -- the store -----------------------------------------------------------------------------

    def _get_store(self) -> Any | None:
        if self._store is None and self._store_ok:
            try:
                if dist.is_available() and dist.is_initialized():
                    self._store = dist.distributed_c10d._get_default_store()
            except Exception:  # noqa: BLE001 (no store: heartbeats off, reports still work)
                self._store_ok = False
        return self._store if self._store_ok else None

    def _key(self, kind: str, rank: int) -> str:
        return f"{self._prefix}/{kind}/{rank}"

    def heartbeat(self, step: int) -> None:
        """Record that this rank reached ``step`` (call once per step, before its collectives).

        One small store write (a round trip to the store's host); no device synchronisation. A
        store that fails turns the heartbeat off for the rest of the run.
        """
        self.step = step
        store = self._get_store()
        if store is None:
            return
        try:
            store.set(self._key("heartbeat", self.rank), str(step))
        except Exception as error:  # noqa: BLE001 (heartbeats are diagnostics; never stop training)
            logger.debug("rank %d: heartbeat store write failed, heartbeats off: %s", self.rank, error)
            self._store_ok = False

    def _read(self, kind: str, ranks: list[int]) -> dict[int, str]:
        """The ``kind`` marks of ``ranks`` that exist (one bounded call; empty when the store is gone)."""
        store = self._get_store()
        if store is None or not ranks:
            return {}

        def get() -> dict[int, str]:
            found = {}
            for rank in ranks:
                key = self._key(kind, rank)
                if store.check([key]):
                    found[rank] = store.get(key).decode()
            return found

        found = _bounded(get, self.store_timeout_s)
        if found is None:  # the store is gone or hangs: do not wait on it again
            self._store_ok = False
        return found or {}

    def _write(self, kind: str, value: str) -> None:
        store = self._get_store()
        if store is not None and _bounded(lambda: store.set(self._key(kind, self.rank), value) or True,
                                          self.store_timeout_s) is None:
            self._store_ok = False

    # -- the context -----------------------------------------------------------------------------

    def __enter__(self) -> RankErrors:
        self._handler.initialize()  # faulthandler: a crash in C code still prints the Python stacks
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> bool:
        if error is None:
            return False
        if isinstance(error, SystemExit):
            code = error.code
            self.exit_code = code if isinstance(code, int) else (0 if code is None else FAILURE_CODE)
            return True
        if isinstance(error, KeyboardInterrupt):
            self.exit_code = INTERRUPT_CODE
            self._fail(f"rank {self.rank}: interrupted", "", secondary=False)
            return True
        trace = "".join(traceback.format_exception(kind, error, tb))
        if is_peer_failure(error):
            self.exit_code = FAILURE_CODE
            self._fail(self._secondary_line(error), trace, secondary=True)
        else:
            self.exit_code = USER_ERROR_CODE if isinstance(error, AvaError) else FAILURE_CODE
            message = str(error) if isinstance(error, AvaError) else f"{type(error).__name__}: {error}"
            self._write("failed", f"{self.step}\t{_one_line(message, 200)}")
            self._fail(f"rank {self.rank}: {_one_line(message, 2000)}", trace, secondary=False)
        return True

    def _fail(self, line: str, trace: str, secondary: bool) -> None:
        self.report = line
        self._log_trace(line, trace)
        self._handler.write_report(line, trace, secondary=secondary)

    def _log_trace(self, line: str, trace: str) -> None:
        logger.debug("%s\n%s", line, trace)
        if self.log_file is None or not trace:
            return
        try:
            self.log_file.parent.mkdir(parents=True, exist_ok=True)
            with self.log_file.open("a", encoding="utf-8") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n{trace}\n")
        except OSError:
            pass

    def _secondary_line(self, error: BaseException) -> str:
        """``rank R: <which peer stopped, at which step>`` for a failure caused by another rank."""
        self._write("alive", str(self.step))
        if isinstance(error, AvaPeerError):  # it names the rank that failed already
            return f"rank {self.rank}: stopped {self._at()}: {_one_line(str(error), 300)}"
        peers = [r for r in range(self.world_size) if r != self.rank]
        failed: dict[int, str] = {}
        alive: dict[int, str] = {}
        deadline = time.monotonic() + self.grace_s
        while True:
            waiting = [r for r in peers if r not in failed and r not in alive]
            failed.update(self._read("failed", waiting))
            alive.update(self._read("alive", [r for r in waiting if r not in failed]))
            if len(failed) + len(alive) == len(peers) or time.monotonic() >= deadline or self._get_store() is None:
                break
            time.sleep(0.1)
        # Without a store, silence says nothing: name only the ranks known to have failed.
        silent = [r for r in peers if r not in failed and r not in alive] if self._get_store() is not None else []
        beats = self._read("heartbeat", silent)
        parts = []
        for peer, mark in sorted(failed.items()):
            step, _, _ = mark.partition("\t")
            parts.append(f"rank {peer} failed at step {step}")
        for peer in silent:
            where = f"at step {beats[peer]}" if peer in beats else "before its first step"
            parts.append(f"rank {peer} stopped answering {where}")
        cause = f"{type(error).__name__}: {_backend_reason(error)}"
        if not parts:
            who = "another rank" if self._get_store() is not None else "another rank (no store to tell which)"
            return f"rank {self.rank}: stopped {self._at()}: {who} failed or stopped answering ({cause})"
        if failed and not silent:
            return f"rank {self.rank}: stopped {self._at()} because {'; '.join(parts)}"
        mine = f"this rank reached step {self.step}" if self.step >= 0 else "this rank had not finished a step either"
        return f"rank {self.rank}: {'; '.join(parts)} ({mine}; {cause})"

    def _at(self) -> str:
        return f"at step {self.step}" if self.step >= 0 else "before its first step"


def _backend_reason(error: BaseException) -> str:
    """The gist of a Gloo/NCCL error: its first line without the source location, up to the first sentence."""
    line = _one_line(str(error), 1000)
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)  # "[.../gloo/transport/tcp/pair.cc:553] "
    line = line.split(". This is typically")[0]
    return line if len(line) <= 160 else line[:159] + "…"


def rank_errors(rank: int, world_size: int, **kwargs: Any) -> RankErrors:
    """A :class:`RankErrors` (``with rank_errors(rank, world_size) as guard: ...``)."""
    return RankErrors(rank, world_size, **kwargs)


def finish_process(code: int, clean: bool) -> NoReturn:
    """End this rank's process without Python's teardown (which can abort inside Gloo at exit).

    With ``clean`` (every rank finished) and ``code == 0``: ``barrier(); destroy_process_group()``
    so that no peer still needs this rank, then exit. Otherwise (this rank failed, or a peer did)
    skip the barrier, which would wait for ranks that are gone. In both cases flush the logging
    handlers, stdout and stderr, then ``os._exit(code)``. A failing closing barrier turns the
    exit code into 1, with one line naming this rank.

    Args:
        code: the exit code (e.g. :attr:`RankErrors.exit_code`).
        clean: whether this rank finished its work; False skips the barrier.
    """
    if clean and code == 0 and dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception as error:  # noqa: BLE001 (a peer failed at the very end)
            rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
            print(f"rank {rank}: stopped at the closing barrier: {_one_line(str(error), 200)}",
                  file=sys.stderr, flush=True)
            code = FAILURE_CODE
    try:
        logging.shutdown()
    except Exception:  # noqa: BLE001 (exiting anyway)
        pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 (a closed stream)
            pass
    os._exit(code)


def run_rank(fn: Callable[[RankErrors], Any], rank: int, world_size: int, **kwargs: Any) -> NoReturn:
    """``fn(guard)`` inside :class:`RankErrors`, then :func:`finish_process`: a distributed rank's whole life.

    Args:
        fn: the rank's work; it receives the guard (call ``guard.heartbeat(step)`` every step).
        rank: this process's rank.
        world_size: number of processes.
        **kwargs: passed to :class:`RankErrors`.
    """
    guard = RankErrors(rank, world_size, **kwargs)
    with guard:
        fn(guard)
    finish_process(guard.exit_code, clean=guard.exit_code == 0)
