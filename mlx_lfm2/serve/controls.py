"""Work handed to the worker thread: what must not race a forward.

Loading or unloading a resident adapter (``serve.adapters``) changes arrays the next forward
reads, so the event loop never does it itself. It ``call``s a function and awaits the
future; the worker runs the pending calls between two steps (``Scheduler`` runs ``run`` at
the top of each turn of its loop), so a call never lands during a forward. An idle worker
blocks on its job queue: ``call`` wakes it (``wake``, the scheduler's).
"""

from __future__ import annotations

import queue
from concurrent.futures import Future
from typing import Callable


class Controls:
    """The calls waiting for the worker: ``call`` from any thread, ``run`` on the worker."""

    def __init__(self, wake: Callable[[], None]):
        self.pending: queue.Queue = queue.Queue()  # (fn, future)
        self.wake = wake

    def call(self, fn) -> Future:
        """Run ``fn()`` on the worker between two steps -> its future."""
        future: Future = Future()
        self.pending.put((fn, future))
        self.wake()
        return future

    def run(self) -> None:
        """Run every pending call (the worker, between two steps)."""
        while True:
            try:
                fn, future = self.pending.get_nowait()
            except queue.Empty:
                return
            try:
                future.set_result(fn())
            except BaseException as e:  # the caller reports it; the worker lives on
                future.set_exception(e)
