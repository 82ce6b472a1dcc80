"""Input files a command reads whole (a prompt file, a multiple-choice file), checked the same way:
a missing file, a folder, text that is not UTF-8 and an unreadable file are one line each, naming
the flag and the file and saying what to give instead."""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import AvaDataError


def read_input_text(path: str | os.PathLike, what: str, expected: str, encoding_fix: str = "UTF-8") -> str:
    """The UTF-8 text of the file ``path`` given by the flag ``what`` (``"--file"``).

    Args:
        path: the file.
        what: the flag or key that named it, for the messages.
        expected: what to give instead of a missing file or a folder ("a text file with one
            prompt per line").
        encoding_fix: what to save a non-UTF-8 file as ("UTF-8", "UTF-8 JSONL").

    Raises:
        AvaDataError: the file is missing, a folder, not UTF-8 or unreadable.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise AvaDataError(f"{what} {path}: is a folder; give {expected}")
    if not path.is_file():
        raise AvaDataError(f"{what} {path}: no such file; give {expected}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise AvaDataError(f"{what} {path}: not UTF-8 text (byte {err.start}); save it as {encoding_fix}") from None
    except OSError as err:
        raise AvaDataError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
