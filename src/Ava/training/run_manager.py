"""Run folders: ``<output_dir>/<name>_<timestamp>/`` with everything needed to reproduce a run.

Layout::

    runs/<name>_<YYYYmmdd-HHMMSS>/
        config.yaml        resolved config (enough to reproduce the run)
        metadata.json      versions, git commit, seed, hardware, command line
        tokenizer.json     the tokenizer the run trained or loaded
        logs/train.log     every log record of the run
        metrics.jsonl      one JSON object per logged step / evaluation
        tensorboard/       TensorBoard event files
        checkpoints/       step_N/ folders and a ``latest`` link
        summary.json       final losses, steps, tokens, wall time
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import yaml

from ..config import EnhancedTrainingConfig
from ..config.feature_compatibility import resume_changes
from ..errors import AvaCheckpointError
from ..utils.checkpoint import find_good_checkpoint, list_checkpoints, verify_checkpoint

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class RunPaths:
    """The files and folders of one run."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def metadata(self) -> Path:
        return self.root / "metadata.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer.json"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "train.log"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


def create_run_folder(config: EnhancedTrainingConfig, now: datetime | None = None) -> tuple[RunPaths, "RunLock"]:
    """Make a new, unique run folder, lock it, and write the resolved config and metadata into it.

    Args:
        config: the resolved config (``run.output_dir``, ``run.name``, ``run.seed`` are used).
        now: timestamp of the folder name (default: the current local time).

    Returns:
        The run's paths and the :class:`RunLock` this process holds on it.
    """
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = Path(config.run.output_dir) / f"{config.run.name}_{stamp}"
    root, n = base, 1
    while True:
        try:
            root.mkdir(parents=True, exist_ok=False)
            break
        except FileExistsError:  # two runs started in the same second
            n += 1
            root = base.with_name(f"{base.name}-{n}")
    paths = RunPaths(root)
    lock = RunLock.acquire(root)
    (root / "logs").mkdir()
    paths.checkpoints.mkdir()
    config.to_yaml(paths.config)
    paths.metadata.write_text(json.dumps(collect_metadata(config), indent=2), encoding="utf-8")
    return paths, lock


class RunLock:
    """An advisory lock on a run folder, so two trainings never write into the same run.

    ``fcntl.flock`` on ``<run>/.lock`` (which records the holder's pid, host and start time): the
    operating system releases it when the holder exits, crashes or is killed, so a lock left by a
    crash is never stale. Take it with :meth:`acquire`; :meth:`release` (or process exit) frees it.
    """

    FILE = ".lock"

    def __init__(self, root: Path, fd: int) -> None:
        self.root, self._fd = root, fd

    @classmethod
    def acquire(cls, root: Path) -> "RunLock":
        """Lock ``root``, or raise :class:`AvaCheckpointError` naming the process that holds it."""
        import fcntl

        fd = os.open(root / cls.FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown"
            os.close(fd)
            raise AvaCheckpointError(
                f"run folder {root} is in use by another training ({holder}); wait for it to finish or stop "
                "it, or start a new run (without --resume)"
            ) from None
        os.ftruncate(fd, 0)
        started = datetime.now().astimezone().isoformat(timespec="seconds")
        os.pwrite(fd, f"pid {os.getpid()} on {platform.node()}, since {started}\n".encode(), 0)
        return cls(root, fd)

    def release(self) -> None:
        """Free the lock (the ``.lock`` file stays: removing it could race a waiting process)."""
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None


def collect_metadata(config: EnhancedTrainingConfig) -> dict[str, Any]:
    """Versions, git state, seed, hardware and command line of the current process."""
    import safetensors
    import tokenizers

    from .. import __version__

    return {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": sys.argv,
        "seed": config.run.seed,
        "versions": {
            "ava": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "tokenizers": tokenizers.__version__,
            "safetensors": safetensors.__version__,
        },
        "git": git_state(Path(__file__).resolve().parent),
        "hardware": hardware_info(),
    }


def git_state(directory: Path) -> dict[str, Any] | None:
    """Commit and dirty flag of the git checkout holding ``directory`` (None outside git)."""
    def git(*args: str) -> str:
        out = subprocess.run(
            ["git", *args], cwd=directory, capture_output=True, text=True, timeout=10, check=True
        )
        return out.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def hardware_info() -> dict[str, Any]:
    """CPU, thread and accelerator description of this machine."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda_version"] = torch.version.cuda
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class TrainingSummary:
    """What ``train()`` returns (also written to ``summary.json`` in the run folder)."""

    run_dir: str
    checkpoint: str
    steps: int
    tokens: int
    final_train_loss: float
    final_val_loss: float | None
    best_val_loss: float | None
    wall_time_s: float
    tokens_per_second: float
    sample: str | None
    skipped_steps: list[list[Any]] = field(default_factory=list)
    rollbacks: list[int] = field(default_factory=list)
    stopped_early: bool = False
    resumed_from: str | None = None
    stopped_by_alarm: str | None = None  # the MoE collapse alarm's message when it ended the run

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_summary(paths: RunPaths, summary: dict[str, Any]) -> None:
    """Write ``summary.json`` atomically."""
    tmp = paths.summary.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    os.replace(tmp, paths.summary)


def resolve_resume(config: EnhancedTrainingConfig, resume: str | Path) -> tuple[Path | None, Path | None]:
    """The run folder and checkpoint to resume from.

    Args:
        config: the run's config (``run.output_dir`` and ``run.name`` locate ``auto`` runs).
        resume: ``"auto"``, a run folder or a checkpoint folder.

    Returns:
        ``(run_dir, checkpoint)``, or ``(None, None)`` for ``auto`` when there is nothing to
        resume (a fresh run starts).

    Raises:
        AvaCheckpointError: an explicit path with no usable checkpoint.
    """
    if str(resume) == "auto":
        base = Path(config.run.output_dir)
        runs = sorted(base.glob(f"{config.run.name}_*"), reverse=True) if base.is_dir() else []
        for run_dir in runs:
            checkpoint = find_good_checkpoint(run_dir / "checkpoints")
            if checkpoint is not None:
                return run_dir, checkpoint
        logger.info("--resume auto: no run of '%s' with a checkpoint in %s; starting a new run", config.run.name, base)
        return None, None
    path = Path(resume)
    if (path / "checkpoints").is_dir():
        run_dir = path
        checkpoint = find_good_checkpoint(path / "checkpoints")
    elif path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        run_dir = path.parent.parent
        checkpoint = path.resolve() if path.is_dir() and not verify_checkpoint(path) else None
        if checkpoint is None:
            logger.error("checkpoint %s is missing or damaged; using the newest good one before it", path)
            older = [c for c in list_checkpoints(path.parent) if _step_of(c) < _step_of(path)]
            checkpoint = next((c for c in older if not verify_checkpoint(c)), None)
    else:
        raise AvaCheckpointError(
            f"--resume {path}: not a run folder (with checkpoints/) or a checkpoint folder "
            "(runs/<run>/checkpoints/step_N); pass one of those, or --resume auto"
        )
    if checkpoint is None:
        raise AvaCheckpointError(f"--resume {path}: no usable checkpoint in {run_dir / 'checkpoints'}")
    return run_dir, checkpoint


def check_resume_config(run_dir: Path, config: EnhancedTrainingConfig) -> list[str]:
    """Compare ``config`` with the run's saved one; refuse changes that break the run.

    Returns:
        ``"key: old -> new"`` for each allowed change (to be logged).

    Raises:
        AvaConfigError: a change of any key outside
            :data:`~Ava.config.feature_compatibility.RESUMABLE_CHANGES`, listing them all.
    """
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise AvaCheckpointError(f"{run_dir / 'config.yaml'}: cannot read the run's config ({err})") from err
    return resume_changes(saved, config, run_dir)


def _step_of(folder: Path) -> int:
    try:
        return int(folder.name.split("_", 1)[1])
    except (IndexError, ValueError):
        return -1
