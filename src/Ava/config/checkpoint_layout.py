"""The files of a checkpoint folder, and how a path a user gives resolves to one.

A checkpoint folder holds ``model.safetensors`` (weights), ``config.yaml`` (the resolved config,
whose ``model`` section rebuilds the model), ``tokenizer.json``, ``state.pt`` (training state) and
``manifest.json``; a run keeps them as ``checkpoints/step_N/`` with ``checkpoints/latest`` (and
``best``) pointing at one. The layout lives here, in the bottom layer, because both ends of a
checkpoint use it: the model saves and loads its weights and config
(``EnhancedMoEModel.save_pretrained`` / ``from_pretrained``; ``models/`` imports only ``layers/``,
``losses/`` and ``config/``) and the training checkpointer (:mod:`Ava.utils.checkpoint`) writes
the rest. The manifest's size + sha256 of every file is checked here too, so that every load of
a checkpoint's weights (training resume, ``from_pretrained``, and so generate, eval and export)
refuses a damaged file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import AvaCheckpointError

WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FILE = "manifest.json"
LATEST = "latest"
BEST = "best"
# A sharded (multi-process) checkpoint keeps its model and optimizer as torch.distributed.checkpoint
# (DCP) files in this subfolder (``.metadata`` + one ``__R_0.distcp`` per writing rank) instead of
# ``model.safetensors``, until ``ava checkpoint consolidate`` adds that file.
SHARDED_DIR = "sharded"
SHARDED_METADATA = ".metadata"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, a ``checkpoints/`` folder or a checkpoint folder.

    Args:
        path: what the user passed.

    Returns:
        The checkpoint folder (resolved, so a ``latest`` link is followed).

    Raises:
        AvaCheckpointError: the path does not exist, is a file, or none of the three holds
            ``model.safetensors`` (a run folder without a checkpoint is told apart).
    """
    path = Path(path)
    for candidate in (path, path / "checkpoints" / LATEST, path / LATEST):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate.resolve()
    if not path.exists():
        raise AvaCheckpointError(
            f"no checkpoint at {path}: the path does not exist (relative to {Path.cwd()}); check its "
            f"spelling, and pass a run folder (runs/<name>_<time>) or a checkpoint folder (with {WEIGHTS_FILE})"
        )
    if not path.is_dir():
        raise AvaCheckpointError(
            f"no checkpoint at {path}: it is a file, not a folder; pass a run folder (runs/<name>_<time>) "
            f"or a checkpoint folder (with {WEIGHTS_FILE})"
        )
    sharded = resolve_sharded_checkpoint(path)
    if sharded is not None:
        raise AvaCheckpointError(
            f"{sharded} is a sharded checkpoint (written by several processes) without {WEIGHTS_FILE}; "
            f"run `ava checkpoint consolidate {path}` first"
        )
    if (path / "checkpoints").is_dir() or (path / CONFIG_FILE).is_file():
        steps = sorted(p.name for p in (path / "checkpoints").glob("step_*") if (p / WEIGHTS_FILE).is_file())
        if steps:  # checkpoints without a `latest` link
            raise AvaCheckpointError(
                f"no checkpoint at {path}: checkpoints/{LATEST} is missing; pass one of its checkpoint folders "
                f"({', '.join(f'{path}/checkpoints/{s}' for s in steps[-3:])})"
            )
        raise AvaCheckpointError(
            f"no checkpoint at {path}: the run folder holds no checkpoint yet (it stopped before its first "
            "save: training.save_every, checkpoint.every_minutes or the end of training); train again, or pass "
            "another run"
        )
    raise AvaCheckpointError(
        f"no checkpoint at {path}: expected {WEIGHTS_FILE} there or in {path}/checkpoints/{LATEST}; "
        "pass a run folder (runs/<name>_<time>) or a checkpoint folder"
    )


def resolve_sharded_checkpoint(path: str | Path) -> Path | None:
    """The sharded checkpoint folder that ``path`` names, tried like :func:`resolve_checkpoint`.

    Args:
        path: a run folder, a ``checkpoints/`` folder or a checkpoint folder.

    Returns:
        The (resolved) folder whose ``sharded/.metadata`` exists, or None when none of the three
        candidates is a sharded checkpoint (call :func:`resolve_checkpoint` for the error message).
    """
    path = Path(path)
    for candidate in (path, path / "checkpoints" / LATEST, path / LATEST):
        if (candidate / SHARDED_DIR / SHARDED_METADATA).is_file():
            return candidate.resolve()
    return None


# --------------------------------------------------------------------------------------------
# the manifest: size + sha256 of every file, checked on load
# --------------------------------------------------------------------------------------------


def describe_file(path: Path) -> dict[str, Any]:
    """Size and sha256 of ``path``, as the manifest records them."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of a checkpoint folder.

    Raises:
        AvaCheckpointError: ``manifest.json`` is missing, unreadable or has no ``files``.
    """
    path = Path(folder) / MANIFEST_FILE
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(manifest, dict) or not isinstance(manifest["files"], dict):
            raise ValueError("no `files` table")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise AvaCheckpointError(f"{path} is missing or unreadable ({err})") from err
    return manifest


def manifest_problems(folder: Path, names: Iterable[str] | None = None) -> list[str]:
    """Problems of a checkpoint folder against its manifest (missing file, size or sha256 mismatch).

    Args:
        folder: the checkpoint folder.
        names: check only these of the manifest's files (None = all of them).

    Returns:
        One line per problem, naming the file; a missing or unreadable manifest is one problem.
    """
    folder = Path(folder)
    try:
        files = read_manifest(folder)["files"]
    except AvaCheckpointError as err:
        return [str(err)]
    wanted = files if names is None else [name for name in names if name in files]
    problems = []
    for name in wanted:
        expected, path = files[name], folder / name
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != expected.get("bytes"):  # cheap: no hashing when the size already differs
            problems.append(f"{path} has {size} bytes, expected {expected.get('bytes')} (truncated?)")
        elif describe_file(path)["sha256"] != expected.get("sha256"):
            problems.append(f"{path} fails its sha256 check (corrupted)")
    return problems


def verify_files(folder: Path, names: Iterable[str] | None = None) -> None:
    """Check ``names`` of a checkpoint folder against its ``manifest.json``, when it has one.

    A folder without a manifest (``save_pretrained``, an import or a HF export) has nothing to
    check and passes.

    Raises:
        AvaCheckpointError: a file is missing, truncated or corrupted (or the manifest is
            unreadable), naming the file, the problem and the fix.
    """
    folder = Path(folder)
    if not (folder / MANIFEST_FILE).exists():
        return
    problems = manifest_problems(folder, names)
    if problems:
        raise AvaCheckpointError(
            f"checkpoint {folder} is damaged: {'; '.join(problems)}; load an earlier checkpoint "
            f"(checkpoints/step_N), or pass --no-verify (verify=False) to load it unchecked"
        )


# --------------------------------------------------------------------------------------------
# file modes
# --------------------------------------------------------------------------------------------


def _umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def set_default_mode(path: Path) -> None:
    """Give a freshly written file the mode ``open()`` would have (0666 less the umask).

    ``safetensors`` writes through a private temporary file (mode 0600) that it renames into
    place, so without this, weights would be unreadable to others where every other file is.
    """
    os.chmod(path, 0o666 & ~_umask())
