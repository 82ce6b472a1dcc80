"""Write metric records from a background thread, so file and TensorBoard I/O never stalls training.

:class:`AsyncSink` wraps any object with ``write(step, split, values)`` and ``close()``: records
go into a queue and one daemon thread hands them to the wrapped sink in order. ``close()``
drains the queue; an error in the thread is re-raised on the next ``write``/``close``.
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Protocol


class MetricsSink(Protocol):
    def write(self, step: int, split: str, values: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


_STOP = object()


class AsyncSink:
    """Queue records for ``sink`` and write them from a background thread.

    Args:
        sink: the synchronous writer.
        max_pending: records queued before ``write`` blocks (back-pressure, bounded memory).
    """

    def __init__(self, sink: MetricsSink, max_pending: int = 10_000) -> None:
        self.sink = sink
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ava-metrics", daemon=True)
        self._thread.start()

    def write(self, step: int, split: str, values: dict[str, Any]) -> None:
        self._raise_pending()
        self._queue.put((step, split, dict(values)))

    def flush(self) -> None:
        """Block until every queued record has been written."""
        self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join()
        self.sink.close()
        self._raise_pending()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                if self._error is None:
                    self.sink.write(*item)
            except BaseException as err:  # surfaced on the training thread
                self._error = err
            finally:
                self._queue.task_done()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            raise err
