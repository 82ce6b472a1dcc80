"""Failures on one rank of a torchrun job end the whole job once, naming the rank, without hanging or orphans.

The torchrun tests launch ``tests/training/dist_scripts/steps.py`` (2 Gloo ranks, one all_reduce
per step inside :class:`~Ava.training.rank_aware_error_handler.RankErrors`) as a subprocess; the
others run in this process (launch command, error classification, the secondary line).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from Ava.errors import AvaConfigError, AvaPeerError
from Ava.training.launch import torchrun_command
from Ava.training.rank_aware_error_handler import RankErrorHandler, RankErrors, is_peer_failure

SCRIPT = Path(__file__).parent / "dist_scripts" / "steps.py"
REPO = Path(__file__).resolve().parents[2]
MESSAGE = "injected failure on purpose (tests/training/dist_scripts/steps.py)"
GROUP_TIMEOUT_S = 5


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _pids(pid_dir: Path) -> dict[int, int]:
    return {int(p.stem[4:]): int(p.read_text()) for p in pid_dir.glob("rank*.pid") if p.read_text().strip()}


def _step(pid_dir: Path, rank: int) -> int:
    try:
        return int((pid_dir / f"rank{rank}.step").read_text() or -1)
    except (OSError, ValueError):
        return -1


class Job:
    """A torchrun job of steps.py; ``finish`` returns (exit code, combined output, seconds) and leaks nothing."""

    def __init__(self, mode: str, pid_dir: Path) -> None:
        self.pid_dir = pid_dir
        self.out = pid_dir / "output.txt"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   str(SCRIPT), mode, str(pid_dir), str(GROUP_TIMEOUT_S)]
        self.started = time.monotonic()
        with self.out.open("w") as handle:
            self.proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                         start_new_session=True)

    def wait_for_step(self, rank: int, step: int, timeout_s: float = 60.0) -> int:
        """The pid of ``rank`` once it has reached ``step``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = _pids(self.pid_dir).get(rank)
            if pid is not None and _step(self.pid_dir, rank) >= step:
                return pid
            assert self.proc.poll() is None, f"job ended early:\n{self.out.read_text()}"
            time.sleep(0.05)
        raise AssertionError(f"rank {rank} did not reach step {step}:\n{self.out.read_text()}")

    def finish(self, timeout_s: float) -> tuple[int, str, float]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            code = None
        elapsed = time.monotonic() - self.started
        leftovers = [pid for pid in _pids(self.pid_dir).values() if _alive(pid)]
        for pid in leftovers:  # never leak a stopped or hung rank, whatever the assertions say
            for sig in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        if code is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        output = self.out.read_text()
        assert code is not None, f"the job did not end within {timeout_s} s:\n{output}"
        assert not leftovers, f"ranks {leftovers} outlived torchrun:\n{output}"
        return code, output, elapsed


class StoppedJob:
    """A loop job whose rank 1 gets SIGSTOP at step 3, started early so its ~40 s wait overlaps the other tests."""

    def __init__(self, pid_dir: Path) -> None:
        self.job = Job("loop", pid_dir)
        self.pids: tuple[int, int] | None = None
        self.stopped_at: float | None = None
        self.exited_at: float | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._stop, daemon=True)
        self.thread.start()

    def _stop(self) -> None:
        try:
            pid1 = self.job.wait_for_step(1, 3)
            pid0 = self.job.wait_for_step(0, 3)
            self.pids = (pid0, pid1)
            os.kill(pid1, signal.SIGSTOP)
            self.stopped_at = time.monotonic()
            # The job's own exit time: the test that checks it runs later, after the other tests.
            self.job.proc.wait(timeout=GROUP_TIMEOUT_S + 60)
            self.exited_at = time.monotonic()
        except BaseException as error:  # noqa: BLE001 (re-raised by the test)
            self.error = error

    def cleanup(self) -> None:
        self.thread.join(timeout=90)
        if self.job.proc.poll() is None:
            os.killpg(self.job.proc.pid, signal.SIGKILL)
            self.job.proc.wait()
        for pid in _pids(self.job.pid_dir).values():
            if _alive(pid):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def stopped_job(tmp_path_factory):
    job = StoppedJob(tmp_path_factory.mktemp("stopped"))
    yield job
    job.cleanup()


@pytest.mark.slow
def test_exception_on_one_rank_ends_the_job_once_named(tmp_path, stopped_job):
    # stopped_job: started here, checked by the last test of this file (its wait overlaps this one's)
    code, output, elapsed = Job("raise", tmp_path).finish(timeout_s=90)
    assert code != 0, output
    assert output.count(MESSAGE) == 1, output
    assert f"rank 1: RuntimeError: {MESSAGE}" in output, output
    assert "Traceback" not in output.split("ChildFailedError")[-1], output  # the rank's traceback: its log only
    assert "raise RuntimeError(MESSAGE)" in (tmp_path / "rank1.log").read_text()
    # torchrun's summary names rank 1 as the root cause; rank 0 only says it stopped because of rank 1.
    root = output.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root), output
    assert "terminate called" not in output, output


@pytest.mark.slow
def test_killed_rank_ends_the_job_named(tmp_path):
    job = Job("loop", tmp_path)
    pid = job.wait_for_step(1, 3)
    job.wait_for_step(0, 3)
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    code, output, _ = job.finish(timeout_s=GROUP_TIMEOUT_S + 40)
    took = time.monotonic() - killed
    assert code != 0, output
    assert took < GROUP_TIMEOUT_S + 40, output
    root = output.split("Root Cause")[-1]
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", root) and "SIGKILL" in root, output
    print(f"SIGKILL to exit: {took:.1f} s")


@pytest.mark.slow
def test_clean_run_exits_zero_without_gloo_abort(tmp_path):
    code, output, _ = Job("ok", tmp_path).finish(timeout_s=90)
    assert code == 0, output
    assert "terminate called" not in output, output
    assert "rank 0: done after 5 steps" in output and "rank 1: done after 5 steps" in output, output


# -- in-process ---------------------------------------------------------------------------------


def test_peer_failures_are_told_from_own_failures():
    assert is_peer_failure(RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:9614"))
    assert is_peer_failure(RuntimeError("[unbound_buffer.cc:81] Timed out waiting 5000ms for recv operation"))
    assert is_peer_failure(AvaPeerError("rank 0 failed: no data"))
    assert not is_peer_failure(RuntimeError("shape mismatch"))
    assert not is_peer_failure(AvaConfigError("training.lr: must be > 0"))
    assert not is_peer_failure(ValueError("timed out"))


class _Store:
    """The part of a c10d store that RankErrors uses."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def set(self, key: str, value: str) -> None:
        self.data[key] = value.encode()

    def get(self, key: str) -> bytes:
        return self.data[key]

    def check(self, keys: list[str]) -> bool:
        return all(key in self.data for key in keys)


def test_user_error_is_one_line_on_stderr_and_exit_code_2(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    store = _Store()
    guard = RankErrors(1, 2, store=store, log_file=tmp_path / "rank1.log")
    with guard:
        guard.heartbeat(7)
        raise AvaConfigError("training.lr: must be > 0 (got -1)")
    assert guard.exit_code == 2
    assert capsys.readouterr().err == "rank 1: training.lr: must be > 0 (got -1)\n"
    assert store.data["ava/0/heartbeat/1"] == b"7"
    assert store.data["ava/0/failed/1"] == b"7\ttraining.lr: must be > 0 (got -1)"


def test_unexpected_error_writes_the_error_file_and_the_traceback_to_the_log(monkeypatch, tmp_path, capsys):
    error_file = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))
    guard = RankErrors(0, 2, store=_Store(), log_file=tmp_path / "rank0.log")
    with guard:
        raise KeyError("tokens")
    assert guard.exit_code == 1
    assert capsys.readouterr().err == ""  # under torchrun the agent prints the error file's line
    data = json.loads(error_file.read_text())["message"]
    assert data["message"] == data["extraInfo"]["py_callstack"] == "rank 0: KeyError: 'tokens'"
    assert "Traceback" in (tmp_path / "rank0.log").read_text()


def test_secondary_line_names_the_failed_or_silent_peer(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    store = _Store()
    for rank, step in ((1, 3), (2, 4)):
        store.set(f"ava/0/heartbeat/{rank}", str(step))
    store.set("ava/0/failed/2", "4\tRuntimeError: boom")
    guard = RankErrors(0, 3, store=store, grace_s=0.2)
    with guard:
        guard.heartbeat(4)
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:9614. This is typically caused by x")
    assert guard.exit_code == 1
    assert capsys.readouterr().err == (
        "rank 0: rank 2 failed at step 4; rank 1 stopped answering at step 3 "
        "(this rank reached step 4; RuntimeError: Connection closed by peer [127.0.0.1]:9614)\n")
    assert store.data["ava/0/alive/0"] == b"4"


class _HangingStore(_Store):
    """A store whose host stopped: every call blocks."""

    def set(self, key: str, value: str) -> None:
        time.sleep(30)

    def check(self, keys: list[str]) -> bool:
        time.sleep(30)
        return False


def test_a_hanging_store_does_not_hang_the_failure_path(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    guard = RankErrors(0, 2, store=_HangingStore(), grace_s=0.5, store_timeout_s=0.2)
    started = time.monotonic()
    with guard:
        raise RuntimeError("Timed out waiting 5000ms for recv operation to complete")
    assert time.monotonic() - started < 2
    assert capsys.readouterr().err == ("rank 0: stopped before its first step: another rank (no store to tell which) failed or "
                                       "stopped answering (RuntimeError: Timed out waiting 5000ms for recv operation "
                                       "to complete)\n")


def test_a_peer_error_keeps_its_own_message(monkeypatch, capsys):
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    guard = RankErrors(1, 2, store=_Store())
    with guard:
        guard.heartbeat(40)
        raise AvaPeerError("rank 0 stopped the run: replicas drifted apart at step 40")
    assert guard.exit_code == 1
    assert capsys.readouterr().err == "rank 1: stopped at step 40: rank 0 stopped the run: replicas drifted apart at step 40\n"


def test_secondary_error_file_is_dated_after_the_root_cause(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    before = int(time.time())
    RankErrorHandler(0).write_report("rank 0: stopped", secondary=True)
    stamp = int(json.loads((tmp_path / "error.json").read_text())["message"]["extraInfo"]["timestamp"])
    assert stamp >= before + 1


def test_record_rank_errors_writes_the_one_line_for_torchrun(monkeypatch, tmp_path):
    from Ava.training.rank_aware_error_handler import record_rank_errors

    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))

    def main():
        raise AvaConfigError("data.path: no such file")

    with pytest.raises(AvaConfigError):
        record_rank_errors(main, rank=3)()
    data = json.loads((tmp_path / "error.json").read_text())["message"]
    assert data["extraInfo"]["py_callstack"] == "rank 3: data.path: no such file"


def test_torchrun_command():
    assert torchrun_command(4, ["train", "configs/tiny.yaml", "training.max_steps=3"]) == [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4",
        "-m", "Ava", "train", "configs/tiny.yaml", "training.max_steps=3"]


HELLO = """
import os, sys, time
rank = int(os.environ["RANK"])
open(os.path.join(sys.argv[1], f"rank{rank}.pid"), "w").write(str(os.getpid()))
print(f"hello from rank {rank} of {os.environ['WORLD_SIZE']}", flush=True)
if sys.argv[2] == "sleep":
    time.sleep(120)
sys.exit(3 if sys.argv[2] == "fail" and rank == 1 else 0)
"""


@pytest.mark.slow
def test_launch_local_runs_the_module_and_returns_its_exit_code(tmp_path, monkeypatch, capfd):
    from Ava.training.launch import launch_local

    (tmp_path / "ava_hello.py").write_text(HELLO)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert launch_local(2, [str(tmp_path), "ok"], module="ava_hello") == 0
    out = capfd.readouterr().out
    assert "hello from rank 0 of 2" in out and "hello from rank 1 of 2" in out
    assert launch_local(2, [str(tmp_path), "fail"], module="ava_hello") != 0


@pytest.mark.slow
def test_launch_local_forwards_sigterm_and_leaves_no_workers(tmp_path):
    (tmp_path / "ava_hello.py").write_text(HELLO)
    code = ("import sys; from Ava.training.launch import launch_local; "
            f"sys.exit(launch_local(2, [{str(tmp_path)!r}, 'sleep'], module='ava_hello'))")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO / 'src'}"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = list(_pids(tmp_path).values())
        assert len(workers) == 2, proc.stdout.read().decode() if proc.poll() is not None else "no workers"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _pids(tmp_path).values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert code != 0
    assert took < 30
    assert not any(_alive(pid) for pid in workers)


# Last: its job was started by the first torchrun test and waited out while the others ran.
@pytest.mark.slow
def test_stopped_rank_times_out_named_and_leaves_no_orphans(stopped_job):
    stopped_job.thread.join(timeout=90)
    if stopped_job.error is not None:
        raise stopped_job.error
    assert stopped_job.pids is not None and stopped_job.stopped_at is not None
    code, output, _ = stopped_job.job.finish(timeout_s=GROUP_TIMEOUT_S + 40)
    assert stopped_job.exited_at is not None, output
    took = stopped_job.exited_at - stopped_job.stopped_at
    assert code != 0, output
    assert took < GROUP_TIMEOUT_S + 40, output
    assert re.search(r"rank 0: rank 1 stopped answering at step \d+ \(this rank reached step \d+; ", output), output
    assert output.count("rank 0: rank 1 stopped answering") == 1, output
    assert not any(_alive(pid) for pid in stopped_job.pids)
    print(f"SIGSTOP to exit: {took:.1f} s")
