"""One progress-bar convention for every long job (training, prepare, eval, lr-find, generate
--file, export/import): a tqdm bar with rate and ETA on stderr, so stdout stays clean for results.

Shown when stderr is a terminal unless ``show`` says otherwise; in a log file (not a terminal) it
is off by default, since a carriage-return bar makes an unreadable log.
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(total: int | None, desc: str, unit: str, *, show: bool | None = None,
                 initial: int = 0) -> tqdm:
    """A tqdm bar on stderr: ``total`` items of ``unit`` (``None`` when unknown), shown per ``show``
    (``None`` = when stderr is a terminal). Use it as a context manager and call ``update(n)``."""
    shown = sys.stderr.isatty() if show is None else show
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not shown,
                file=sys.stderr, dynamic_ncols=True, mininterval=0.5)
