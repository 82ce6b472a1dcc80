"""Incremental detokenization with stop strings: text pieces as tokens arrive.

A byte-level BPE token can end in the middle of a multi-byte UTF-8 character; decoding such a
prefix gives a trailing U+FFFD. The tracker decodes the row's new ids after each token and
emits only the stable part of the text: it holds back trailing replacement characters (the
character is not complete yet) and any suffix that could be the start of a stop string (it may
still turn into one, and the output must end before a stop string). Concatenating every piece
plus :meth:`TextTracker.finish` gives exactly the final text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextTracker:
    """The text of one row's generated ids, with stop-string detection.

    Args:
        decode: ids → text (special tokens skipped).
        stop_strings: generation stops once the text contains one of these; the text is cut
            before the earliest occurrence.
    """

    def __init__(self, decode: Callable[[Sequence[int]], str], stop_strings: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop_strings = tuple(stop_strings)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of ``text`` already handed out
        self.stopped = False

    def add(self, token: int) -> str:
        """Append one token; returns the newly stable text (possibly empty)."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        cut = self._stop_index()
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            return self.finish()
        stable = len(self.text.rstrip(REPLACEMENT))
        stable -= self._partial_stop_suffix(self.text[:stable])
        stable = max(stable, self.emitted)
        piece = self.text[self.emitted:stable]
        self.emitted = stable
        return piece

    def finish(self) -> str:
        """Everything not handed out yet (call once generation of the row has ended)."""
        piece = self.text[self.emitted:]
        self.emitted = len(self.text)
        return piece

    def _stop_index(self) -> int | None:
        hits = [i for i in (self.text.find(s) for s in self.stop_strings) if i >= 0]
        return min(hits) if hits else None

    def _partial_stop_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stop_strings:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
