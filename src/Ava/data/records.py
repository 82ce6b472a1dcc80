"""The records that flow through the data pipeline, and the report of what was skipped or repaired.

``Row`` (what a reader yields: one JSONL line, CSV/Parquet row or text file) → ``Document`` (what
the tokenizer sees: text, optionally split into segments that do or do not carry loss) → token
streams (``packing.py``). ``DataReport`` counts every row that was skipped and every character that
was replaced under an explicit policy, so nothing disappears without a number at the end of a run.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


def plural(count: int, noun: str, plural_form: str | None = None) -> str:
    """``plural(1, "document")`` → ``"1 document"``, ``plural(3, "document")`` → ``"3 documents"``,
    ``plural(12000, "token")`` → ``"12,000 tokens"``."""
    return f"{count:,} {noun if count == 1 else plural_form or noun + 's'}"


@dataclass(frozen=True)
class Row:
    """One record read from a file.

    Attributes:
        fields: the columns; a text file is one row ``{"text": contents}``.
        name: stable identifier relative to the source root (``notes.jsonl:12``, ``a.csv:row 3``,
            ``plays/hamlet.txt``), never an absolute path, so splits do not depend on where the
            data lives.
        location: where to look for it: ``path:line`` (JSONL, CSV), ``path:row N`` (Parquet,
            Arrow, JSON arrays) or the file path.
    """

    fields: dict[str, Any]
    name: str
    location: str


@dataclass(frozen=True)
class Document:
    """One training document.

    Attributes:
        name: stable identifier used for sorting and the train/validation split (see ``Row.name``).
        text: the full text (the concatenation of ``segments`` when they are set).
        source: where it was read from (a file path, ``file:line`` or ``archive:member``).
        segments: ``((text, trains), ...)`` for instruction/chat data: ``trains`` False marks text
            (a prompt, a user turn) whose tokens are inputs but never labels. None = all text trains.
        source_name: the ``data.sources[].name`` it came from (per-source accounting, mixtures).
    """

    name: str
    text: str
    source: str
    segments: tuple[tuple[str, bool], ...] | None = None
    source_name: str = ""


@dataclass
class DataReport:
    """Counts of what the readers skipped or repaired under a ``skip``/``replace`` policy.

    Thread-safe; one per pipeline run. ``add(source, kind, location)`` records one event (the
    first few locations of each kind are kept as examples); ``summary()`` is one line per kind.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    MAX_EXAMPLES = 3

    def add(self, source: str, kind: str, location: str = "", count: int = 1) -> None:
        """Record ``count`` events of ``kind`` (e.g. ``"malformed row"``, ``"replaced chars"``)."""
        with self._lock:
            self.counts[(source, kind)] += count
            examples = self.examples.setdefault((source, kind), [])
            if location and len(examples) < self.MAX_EXAMPLES:
                examples.append(location)

    def merge(self, other: DataReport) -> None:
        """Add another report's counts (e.g. from a worker process)."""
        for key, count in other.counts.items():
            self.add(key[0], key[1], count=count)
            for location in other.examples.get(key, []):
                examples = self.examples.setdefault(key, [])
                if len(examples) < self.MAX_EXAMPLES:
                    examples.append(location)

    def total(self, kind: str | None = None) -> int:
        """Events of one kind (all kinds when None)."""
        return sum(c for (_, k), c in self.counts.items() if kind is None or k == kind)

    def skipped(self, source: str | None = None) -> int:
        """Rows and files skipped under ``bad_rows: skip`` (of one source, or all when None)."""
        return sum(c for (s, k), c in self.counts.items()
                   if k.startswith("skipped ") and (source is None or s == source))

    def summary(self) -> list[str]:
        """One line per (source, kind): count and example locations."""
        lines = []
        for (source, kind), count in sorted(self.counts.items()):
            where = ", ".join(self.examples.get((source, kind), []))
            lines.append(f"{source}: {count} {kind}" + (f" (e.g. {where})" if where else ""))
        return lines

    def to_dict(self) -> dict[str, dict[str, int]]:
        """``{source: {kind: count}}`` for JSON reports."""
        out: dict[str, dict[str, int]] = {}
        for (source, kind), count in sorted(self.counts.items()):
            out.setdefault(source, {})[kind] = count
        return out

    @classmethod
    def from_dict(cls, counts: dict[str, dict[str, int]]) -> DataReport:
        """The report of :meth:`to_dict` (e.g. from a prepare manifest); examples are not kept."""
        report = cls()
        for source, kinds in counts.items():
            for kind, count in kinds.items():
                report.add(source, kind, count=count)
        return report

    def log(self) -> None:
        """Log the summary as warnings (nothing when clean)."""
        for line in self.summary():
            logger.warning("data: %s", line)
