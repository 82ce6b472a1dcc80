"""Ava's user-facing exception types.

Every error a user can cause (a bad config key, a missing file, a malformed data row) is raised as
one of these, with a message that names the offending key/file and says how to fix it. The CLI
prints the message on one line and exits with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations


class AvaError(Exception):
    """Base class of every user-facing Ava error."""


class AvaConfigError(AvaError, ValueError):
    """An invalid configuration: unknown key, bad value or contradictory combination."""


class AvaDataError(AvaError, ValueError):
    """Unusable data: a missing file, an unreadable row, an empty corpus."""


class AvaCheckpointError(AvaError, RuntimeError):
    """A checkpoint or run folder that cannot be loaded."""


class AvaTrainingError(AvaError, RuntimeError):
    """Training stopped on purpose by a health check (e.g. the MoE collapse alarm with action: stop)."""


class AvaPeerError(AvaError, RuntimeError):
    """This rank stopped because another rank of a distributed run failed; that rank reports the cause."""


class AvaOutputError(AvaError, OSError):
    """An output location that cannot be written (a read-only folder, a file where a folder is
    needed, a full disk), found before any work is done or while writing."""
