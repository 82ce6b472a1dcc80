"""Atomic checkpoints: safetensors weights + a ``weights_only``-loadable state file.

A checkpoint is a folder ``checkpoints/step_N/``::

    model.safetensors   weights (safetensors; tied weights stored once)
    config.yaml         the run's resolved config (its ``model`` section rebuilds the model)
    tokenizer.json      the tokenizer, so the folder alone is enough to generate
    state.pt            optimizer, scheduler, RNG states, step, tokens (torch.load(weights_only=True))
    manifest.json       size and sha256 of every file above

It is written into a hidden temporary folder, every file fsynced, then renamed into place, and
only then is ``checkpoints/latest`` (a symlink) switched to it: a crash at any moment leaves the
previous checkpoint intact and never a half-written one under a real name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_model

from ..errors import AvaCheckpointError

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
STATE_VERSION = 1


def save_checkpoint(
    directory: Path,
    step: int,
    model: torch.nn.Module,
    config_yaml: str,
    state: dict[str, Any],
    tokenizer_file: Path | None = None,
) -> Path:
    """Write ``directory/step_{step}`` atomically and point ``directory/latest`` at it.

    Args:
        directory: the run's ``checkpoints/`` folder.
        step: optimizer step the checkpoint belongs to.
        model: the model (its ``state_dict`` goes to safetensors).
        config_yaml: the resolved config as YAML text.
        state: training state (tensors, numbers, strings, lists, dicts only: it is loaded with
            ``weights_only=True``).
        tokenizer_file: tokenizer.json to copy in.

    Returns:
        The final checkpoint folder.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"step_{step}"
    tmp = directory / f".tmp-step_{step}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS_FILE))
    torch.save({"version": STATE_VERSION, "step": step, **state}, tmp / STATE_FILE)
    (tmp / CONFIG_FILE).write_text(config_yaml, encoding="utf-8")
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, tmp / TOKENIZER_FILE)
    manifest = {name: _describe_file(tmp / name) for name in sorted(os.listdir(tmp))}
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    for name in os.listdir(tmp):
        _fsync_file(tmp / name)
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step: move the old one aside first
        old = directory / f".old-step_{step}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _point_latest(directory, final.name)
    _fsync_dir(directory)
    logger.info("saved checkpoint %s", final)
    return final


def load_training_state(checkpoint: Path) -> dict[str, Any]:
    """The state dict of a checkpoint folder, loaded with ``weights_only=True``."""
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise AvaCheckpointError(f"{path} is missing; pass a checkpoint folder (checkpoints/step_N)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt files
        raise AvaCheckpointError(f"{path} cannot be loaded ({err}); use an earlier checkpoint") from err


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a ``checkpoints/`` folder or a checkpoint folder."""
    path = Path(path)
    for candidate in (path, path / "checkpoints" / LATEST, path / LATEST):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate.resolve()
    raise AvaCheckpointError(
        f"no checkpoint at {path}: expected {WEIGHTS_FILE} there or in {path}/checkpoints/{LATEST}; "
        "pass a run folder (runs/<name>_<time>) or a checkpoint folder"
    )


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


def _point_latest(directory: Path, target: str) -> None:
    tmp_link = directory / f".{LATEST}-{os.getpid()}"
    if tmp_link.is_symlink() or tmp_link.exists():
        tmp_link.unlink()
    os.symlink(target, tmp_link)
    os.replace(tmp_link, directory / LATEST)


def _describe_file(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
