"""Output locations checked before any work starts.

Every command that writes something (a run folder, a prepared dataset, an export, a report, a
plot) calls one of these first, so a read-only or misspelt location fails in one line (exit 2)
instead of a traceback after minutes of work. The check creates nothing that stays behind: a
folder that did not exist is checked through its nearest existing parent.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import AvaOutputError


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path.cwd()


def check_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Raise :class:`AvaOutputError` unless ``path`` is (or could be created as) a writable folder.

    ``what`` names the setting in the message (``"run.output_dir"``, ``"--out"``). Nothing is
    created: a missing folder is checked through its nearest existing parent.
    """
    path = Path(path).expanduser()
    _check_folder(path, path, what)
    return path


def _check_folder(folder: Path, shown: Path, what: str) -> None:
    """Raise unless ``folder`` exists writable or could be created; messages name ``shown``."""
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise AvaOutputError(
            f"{what} {shown}: {existing} is a file, not a folder; pick another location"
        )
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ava-write-check-"):
            pass
    except OSError as err:
        raise AvaOutputError(
            f"{what} {shown}: cannot write to {existing} ({err.strerror or err}); pick a writable location"
        ) from None


def check_output_file(path: str | os.PathLike, what: str) -> Path:
    """Raise :class:`AvaOutputError` unless the file ``path`` could be written: its folder is (or
    could be created as) writable and ``path`` itself is not a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise AvaOutputError(f"{what} {path}: is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise AvaOutputError(f"{what} {path}: the file is read-only; pick another path")
    _check_folder(path.parent, path, what)
    return path
