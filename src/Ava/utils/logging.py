"""Logging set-up: one format for console and ``logs/train.log``, friendly to progress bars.

Library modules only call ``logging.getLogger(__name__)``; the entry points (CLI, trainer) call
:func:`setup_logging` once. Console records go through ``tqdm.write`` so they never tear a
progress bar.
"""

from __future__ import annotations

import logging
from pathlib import Path

from tqdm import tqdm

_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_DATEFMT = "%H:%M:%S"


class TqdmHandler(logging.Handler):
    """Console handler that writes above an active tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never crash the run
            self.handleError(record)


def setup_logging(level: str = "INFO", log_file: Path | None = None, console_level: str | None = None) -> logging.Logger:
    """Configure the ``Ava`` logger tree (console, and ``log_file`` when given).

    Idempotent: handlers added by an earlier call are replaced, so a second run in the same
    process does not log twice or into the first run's file.

    Args:
        level: logging level name.
        log_file: file that receives every record of the run (created with its parents).
        console_level: the console's own threshold (e.g. ``ERROR`` on the ranks of a distributed
            run other than rank 0, which keep everything in their own log file); None = ``level``.

    Returns:
        The root ``Ava`` logger.
    """
    root = logging.getLogger(__package__.rsplit(".", 1)[0])  # "Ava" or "src.Ava"
    root.setLevel(level)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    console = TqdmHandler()
    if console_level is not None:
        console.setLevel(console_level)
    console.setFormatter(logging.Formatter(_CONSOLE_FORMAT, _DATEFMT))
    root.addHandler(console)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FORMAT, "%Y-%m-%d %H:%M:%S"))
        root.addHandler(file_handler)
    return root
