"""Atomic, verified checkpoints: safetensors weights + a ``weights_only``-loadable state file.

A checkpoint is a folder ``checkpoints/step_N/``::

    model.safetensors   weights (safetensors; tied weights stored once; buffers such as router
                        biases included)
    config.yaml         the run's resolved config (its ``model`` section rebuilds the model)
    tokenizer.json      the tokenizer, so the folder alone is enough to generate
    state.pt            optimizer, scheduler, RNG states, data cursor, health state, step, tokens
                        (``torch.load(weights_only=True)``)
    manifest.json       step, val loss, and size + sha256 of every file above

It is written into a hidden temporary folder, every file fsynced, then renamed into place, and
only then is ``checkpoints/latest`` (a symlink) switched to it: a crash at any moment leaves the
previous checkpoint intact and never a half-written one under a real name. On load the manifest
is checked; a truncated or corrupted checkpoint is reported and the previous good one is used
(resume), or the load fails naming the file (``from_pretrained``: generate, eval, export).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.serialization as torch_serialization
from safetensors.torch import load_file, save_file

# The folder layout is shared with models/ (save_pretrained, from_pretrained), which may not import utils/.
from ..config.checkpoint_layout import (
    BEST, CONFIG_FILE, LATEST, MANIFEST_FILE, STATE_FILE, TOKENIZER_FILE, WEIGHTS_FILE, describe_file,
    manifest_problems, set_default_mode,
    resolve_checkpoint as resolve_checkpoint, verify_files as verify_files,
)
from ..errors import AvaCheckpointError

logger = logging.getLogger(__name__)

STATE_VERSION = 2  # 2: step/tokens/val losses under "progress" (the trainer's stateful registry)
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class CheckpointSnapshot:
    """Everything a checkpoint holds, detached from the live training objects.

    Attributes:
        step: optimizer step.
        weights: name → tensor (CPU copies when taken for an asynchronous save; shared
            tensors appear once).
        state: training state (tensors, numbers, strings, lists, dicts only).
        config_yaml: the resolved config as YAML text.
        tokenizer_file: tokenizer.json to copy in.
        val_loss: validation loss at this step (for keep-best), if known.
        extra_files: further small text files by name (a fine-tune's ``lora.json``).
    """

    step: int
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]
    config_yaml: str
    tokenizer_file: Path | None = None
    val_loss: float | None = None
    extra_files: dict[str, str] = field(default_factory=dict)


def take_snapshot(
    step: int,
    model: torch.nn.Module | dict[str, torch.Tensor],
    config_yaml: str,
    state: dict[str, Any],
    tokenizer_file: Path | None = None,
    val_loss: float | None = None,
    copy: bool = False,
    buffers: dict[str, torch.Tensor] | None = None,
    extra_files: dict[str, str] | None = None,
) -> CheckpointSnapshot:
    """Capture the model and training state for :func:`write_checkpoint`.

    Args:
        model: the model, or its state dict (tied tensors are stored once either way).
        copy: copy every tensor to CPU, so training may go on while the snapshot is written.
        buffers: CPU tensors of an earlier snapshot to copy into when shapes match (reusing
            them avoids allocating, and page-faulting, hundreds of MiB per save); updated in
            place with any new allocation.
    """
    weights = unique_tensors(model.state_dict() if isinstance(model, torch.nn.Module) else model)
    if copy:
        buffers = {} if buffers is None else buffers
        weights = {k: _copy_into(v, buffers, f"weights/{k}") for k, v in weights.items()}
        state = _copy_tensors(state, buffers, "state")
    return CheckpointSnapshot(step, weights, state, config_yaml, tokenizer_file, val_loss, dict(extra_files or {}))


def write_checkpoint(directory: Path, snap: CheckpointSnapshot) -> Path:
    """Write ``directory/step_{step}`` atomically and point ``directory/latest`` at it.

    Returns:
        The final checkpoint folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{snap.step}"
    tmp = directory / f".tmp-step_{snap.step}-{os.getpid()}-{threading.get_ident()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # Hashing and fsyncing a file (both release the GIL) overlap with writing the next one.
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="ava-ckpt-hash") as pool:
            pending = {}
            save_file({k: v.contiguous() for k, v in snap.weights.items()}, str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt"})
            set_default_mode(tmp / WEIGHTS_FILE)  # safetensors writes 0600; others get 0666 - umask
            pending[WEIGHTS_FILE] = pool.submit(describe_and_sync, tmp / WEIGHTS_FILE)
            # The zip CRC32 that torch.save computes by default costs ~2/3 of its time here and
            # is redundant with the manifest's sha256, which verification checks on load.
            with torch_serialization.config.patch({"save.compute_crc32": False}):
                torch.save({"version": STATE_VERSION, "step": snap.step, **snap.state}, tmp / STATE_FILE)
            pending[STATE_FILE] = pool.submit(describe_and_sync, tmp / STATE_FILE)
            (tmp / CONFIG_FILE).write_text(snap.config_yaml, encoding="utf-8")
            pending[CONFIG_FILE] = pool.submit(describe_and_sync, tmp / CONFIG_FILE)
            if snap.tokenizer_file is not None:
                shutil.copyfile(snap.tokenizer_file, tmp / TOKENIZER_FILE)
                pending[TOKENIZER_FILE] = pool.submit(describe_and_sync, tmp / TOKENIZER_FILE)
            for name, text in snap.extra_files.items():
                (tmp / name).write_text(text, encoding="utf-8")
                pending[name] = pool.submit(describe_and_sync, tmp / name)
            files = {name: pending[name].result() for name in sorted(pending)}
        manifest = {"step": snap.step, "val_loss": snap.val_loss, "files": files}
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
        fsync_file(tmp / MANIFEST_FILE)
        fsync_dir(tmp)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AvaCheckpointError(write_failure_message(directory, final.name, err, _snapshot_bytes(snap))) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    install_checkpoint(directory, tmp, final)
    logger.info("saved checkpoint %s", final)
    return final


def write_failure_message(directory: Path, name: str, err: BaseException, needed_bytes: int) -> str:
    """One line for a checkpoint write that failed (a full disk, a file-size limit, a vanished
    folder): what failed, where, the space needed and free, and that the previous checkpoint is
    intact (the partial folder is already removed)."""
    import resource

    reason = (err.strerror if isinstance(err, OSError) and err.strerror else str(err).strip().splitlines()[0]
              if str(err).strip() else type(err).__name__)
    facts = [f"about {_mib(needed_bytes)} needed"]
    try:
        facts.append(f"{_mib(shutil.disk_usage(directory).free)} free on that disk")
    except OSError:
        pass
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
        facts.append(f"file size limit (ulimit -f) {_mib(limit)}")
    latest = directory / LATEST
    previous = (f"the previous checkpoint {os.readlink(latest)} is intact and `--resume auto` continues from it"
                if latest.is_symlink() and latest.resolve().is_dir() else "no earlier checkpoint exists")
    return (f"writing checkpoint {name} in {directory} failed ({type(err).__name__}: {reason}); "
            f"{', '.join(facts)}; {previous}; free some space (or lower checkpoint.keep_last) and resume")


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _snapshot_bytes(snap: CheckpointSnapshot) -> int:
    def size(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(size(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(size(v) for v in value)
        return 0

    return size(snap.weights) + size(snap.state)


def install_checkpoint(directory: Path, tmp: Path, final: Path) -> None:
    """Rename a finished, fsynced ``tmp`` checkpoint folder to ``final`` (an older one of the same
    step is moved aside first) and point ``directory/latest`` at it."""
    if final.exists():  # re-saving the same step: move the old one aside first
        old = directory / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    point_link(directory, LATEST, final.name)
    fsync_dir(directory)


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    config_yaml: str,
    state: dict[str, Any],
    tokenizer_file: Path | None = None,
    val_loss: float | None = None,
) -> Path:
    """Synchronous :func:`take_snapshot` + :func:`write_checkpoint`."""
    snap = take_snapshot(step, model, config_yaml, state, tokenizer_file, val_loss)
    return write_checkpoint(directory, snap)


class CheckpointWriter:
    """Writes checkpoints, optionally from a background thread, and prunes old ones.

    With ``asynchronous=True`` a save copies the state to CPU memory (the only part that blocks
    training) and a thread writes it; the next save, :meth:`wait` or :meth:`close` waits for the
    previous write, so at most one is in flight and a failed write is raised, not lost.

    Args:
        directory: the run's ``checkpoints/`` folder.
        keep_last: keep the N newest checkpoints (None = all).
        keep_best: also keep the N with the lowest val loss, linked as ``best`` (0 = off).
        asynchronous: write from a background thread.
    """

    def __init__(self, directory: Path, keep_last: int | None = 3, keep_best: int = 1,
                 asynchronous: bool = False) -> None:
        self.directory = directory
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.asynchronous = asynchronous
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_path: Path | None = None
        self._buffers: dict[str, torch.Tensor] = {}  # reused by every asynchronous snapshot
        remove_stale_temporaries(directory)

    def save(self, step: int, model: torch.nn.Module | dict[str, torch.Tensor], config_yaml: str, state: dict[str, Any],
             tokenizer_file: Path | None = None, val_loss: float | None = None,
             extra_files: dict[str, str] | None = None) -> Path:
        """Save ``step``; returns the folder the checkpoint has (or will have, when async)."""
        self.wait()
        snap = take_snapshot(step, model, config_yaml, state, tokenizer_file, val_loss,
                             copy=self.asynchronous, buffers=self._buffers, extra_files=extra_files)
        final = self.directory / f"step_{step}"
        if self.asynchronous:
            self._thread = threading.Thread(target=self._write, args=(snap,), name="ava-checkpoint",
                                            daemon=False)
            self._thread.start()
        else:
            self._write(snap)
            self._raise_pending()
        self.last_path = final
        return final

    def wait(self) -> None:
        """Block until the write in flight (if any) is on disk; re-raise its error."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._raise_pending()

    close = wait

    def _write(self, snap: CheckpointSnapshot) -> None:
        try:
            write_checkpoint(self.directory, snap)
            prune_checkpoints(self.directory, self.keep_last, self.keep_best)
        except BaseException as err:  # surfaced by wait() on the training thread
            self._error = err

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err


# --------------------------------------------------------------------------------------------
# reading, verifying, pruning
# --------------------------------------------------------------------------------------------


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete what a killed save left behind (hidden ``.tmp-*``/``.old-*`` folders, link temps)."""
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.name.startswith((".tmp-", ".old-", f".{LATEST}-", f".{BEST}-"))]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if stale:
        logger.warning("removed %d unfinished checkpoint file(s) left by an interrupted save in %s", len(stale), directory)
    return stale


def verify_checkpoint(folder: Path) -> list[str]:
    """Problems of a checkpoint folder (missing manifest or files, size or sha256 mismatch).

    The check itself lives in :mod:`Ava.config.checkpoint_layout`, which ``from_pretrained``
    (models/) shares.
    """
    return manifest_problems(folder)


def list_checkpoints(directory: Path) -> list[Path]:
    """``step_N`` folders of ``directory``, newest step first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def find_good_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint of ``directory`` that passes :func:`verify_checkpoint`.

    Bad ones are reported in the log and skipped, so a run whose last save was corrupted
    resumes from the one before.
    """
    for folder in list_checkpoints(directory):
        problems = verify_checkpoint(folder)
        if not problems:
            return folder
        logger.error("checkpoint %s is damaged (%s); falling back to an earlier one", folder, "; ".join(problems))
    return None


def prune_checkpoints(directory: Path, keep_last: int | None, keep_best: int) -> list[Path]:
    """Delete checkpoints that are neither among the newest ``keep_last`` nor the best ``keep_best``.

    Also points ``best`` at the lowest-val-loss checkpoint. Returns the deleted folders.
    """
    folders = list_checkpoints(directory)
    keep = set(folders if keep_last is None else folders[:keep_last])
    scored = []
    for folder in folders:
        loss = _manifest(folder).get("val_loss")
        if loss is not None:
            scored.append((loss, folder))
    scored.sort(key=lambda item: item[0])
    if keep_best > 0 and scored:
        keep.update(folder for _, folder in scored[:keep_best])
        point_link(directory, BEST, scored[0][1].name)
    latest = directory / LATEST
    if latest.is_symlink():
        keep.add(directory / os.readlink(latest))
    deleted = [folder for folder in folders if folder not in keep]
    for folder in deleted:
        shutil.rmtree(folder)
    return deleted


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The state dict of a checkpoint folder, loaded with ``weights_only=True``."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise AvaCheckpointError(f"{path} is missing; pass a checkpoint folder (checkpoints/step_N)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files
        raise AvaCheckpointError(f"{path} cannot be loaded ({err}); use an earlier checkpoint") from err
    if state.get("version", 1) == 1 and "progress" not in state:  # version 1 kept the counters at the top
        state["progress"] = {"step": state.get("step", 0), "tokens": state.get("tokens", 0),
                             "best_val": state.get("best_val"), "last_val": state.get("last_val")}
    return state


def read_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint's ``model.safetensors`` (tied tensors once), on the CPU."""
    path = Path(checkpoint) / WEIGHTS_FILE
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors/OS raise several types
        raise AvaCheckpointError(f"{path}: cannot read weights ({err}); use another checkpoint") from err


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as ``weights_only``-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": [py_version, list(py_state), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), np_pos, np_has_gauss, np_gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the second name of tensors that share storage (tied weights), keeping the first.

    Loading restores the tie from the model's own structure (``safetensors.torch.load_model`` in
    ``from_pretrained``, :meth:`~Ava.training.parallel.Parallelism.load_model_state_dict` on resume).
    """
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    unique = {}
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        unique[name] = tensor.detach()
    return unique


def _copy_into(tensor: torch.Tensor, buffers: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """A CPU copy of ``tensor``, written into ``buffers[key]`` when that fits."""
    buffer = buffers.get(key)
    if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
        buffer = buffers[key] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
    return buffer.copy_(tensor.detach())


def _copy_tensors(value: Any, buffers: dict[str, torch.Tensor], path: str) -> Any:
    if isinstance(value, torch.Tensor):
        return _copy_into(value, buffers, path)
    if isinstance(value, dict):
        return {k: _copy_tensors(v, buffers, f"{path}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_tensors(v, buffers, f"{path}/{i}") for i, v in enumerate(value))
    return value


def _manifest(folder: Path) -> dict[str, Any]:
    try:
        return json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def point_link(directory: Path, name: str, target: str) -> None:
    tmp_link = directory / f".{name}-{os.getpid()}-{threading.get_ident()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target, tmp_link)
    os.replace(tmp_link, directory / name)


def describe_and_sync(path: Path) -> dict[str, Any]:
    """Size and sha256 of a freshly written file, which is then fsynced."""
    description = describe_file(path)
    fsync_file(path)
    return description


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
