"""Stop handling: SIGINT/SIGTERM as a flag the training loop polls between steps (the loop
then saves a checkpoint and stops), and evaluation batches that stop once it is set."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop polls (handlers restored by `close`).

    Attributes:
      signal_name: `"SIGINT"` / `"SIGTERM"` once one arrived, else `None`.

    Handlers are installed only from the main thread (Python's rule); elsewhere the request
    never fires.
    """

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name

    def close(self) -> None:
        """Restores the handlers that were installed before."""
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


class Interrupted(Exception):
    """A signal arrived during an evaluation (raised between its batches)."""


def interruptible(batches: Iterable[T], stop: StopRequest) -> Iterator[T]:
    """`batches`, stopping with `Interrupted` before the next one once a signal arrived (and
    after the last one, so that a result is never taken for complete after a signal)."""
    for batch in batches:
        if stop.signal_name is not None:
            raise Interrupted
        yield batch
    if stop.signal_name is not None:
        raise Interrupted
