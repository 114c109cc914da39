"""A job's buffered output, bounded: what the worker has produced and the client not yet read.

The worker (a thread) ``put``s each item; the job's coroutine ``get``s them. A client that
stops reading (a slow or stalled reader: the socket fills, the stream's coroutine waits on
it) stops taking items, so they pile up here. The box counts them and their approximate
size; once either reaches its bound it is ``full`` (until the reader has taken half), and the worker stops producing for that
job (``Backpressure``: the batched mode parks its row, see ``engine.batch.BatchGenerator.park``;
the serial mode waits), so memory never grows past the bound. A job that stays full for
``stall_timeout`` seconds is cancelled: the other requests never wait on it.

Items carry no arrays: the scheduler strips the engine's logprob row from each response
before it is queued (a vocabulary-sized row per token is what made a stalled stream costly).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Optional

MAX_ITEMS = 1024  # tokens a stream may have produced and not yet sent
MAX_BYTES = 4 << 20  # their approximate size (text and logprob entries)
STALL_TIMEOUT = 30.0  # seconds a full buffer may stay full before its job is cancelled


def item_bytes(item) -> int:
    """An item's approximate size: its text and logprob entry (the objects' overhead counted)."""
    if not isinstance(item, tuple):
        return 64
    r, entry = item
    size = 128 + 2 * len(getattr(r, "text", "") or "")
    if entry:
        for e in [entry, *entry.get("top_logprobs", ())]:
            size += 160 + 10 * len(e["token"])
    return size


class Outbox:
    """Bounded output of one job (see the module docstring). ``put`` from the worker thread,
    ``get`` on the event loop; ``full`` and ``wait_room`` for the worker."""

    def __init__(self, max_items: int = MAX_ITEMS, max_bytes: int = MAX_BYTES):
        self.max_items, self.max_bytes = max_items, max_bytes
        self.queue: asyncio.Queue = asyncio.Queue()
        self.items = self.bytes = 0
        self.peak_items = self.peak_bytes = 0
        self._lock = threading.Lock()
        self._room = threading.Event()
        self._room.set()

    @property
    def full(self) -> bool:
        return not self._room.is_set()

    def put(self, item, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        size = item_bytes(item)
        with self._lock:
            self.items += 1
            self.bytes += size
            self.peak_items, self.peak_bytes = max(self.peak_items, self.items), max(self.peak_bytes, self.bytes)
            if self.items >= self.max_items or self.bytes >= self.max_bytes:
                self._room.clear()
        loop.call_soon_threadsafe(self.queue.put_nowait, (item, size))

    async def get(self):
        item, size = await self.queue.get()
        with self._lock:
            self.items -= 1
            self.bytes -= size
            if self.items <= self.max_items // 2 and self.bytes <= self.max_bytes // 2:
                self._room.set()  # half empty: the row resumes (not one park/unpark per token)
        return item

    def qsize(self) -> int:
        return self.queue.qsize()

    def wait_room(self, timeout: float) -> bool:
        """Block (the worker, serial mode) until the reader takes items; False: it did not in time."""
        return self._room.wait(timeout)


class Backpressure:
    """What the worker does about readers that fall behind (their outboxes full), counted in
    the scheduler's ``stats`` (``paused``: times a job waited on its reader; ``stalled``:
    jobs cancelled for it)."""

    def __init__(self, stall_timeout: float, stats: dict):
        self.stall_timeout = stall_timeout  # seconds a reader may leave its outbox full
        self.stats = stats

    def rows(self, live: dict, batch) -> None:
        """Batched mode, before each step: park the rows (``live``: uid -> the scheduler's
        ``_Live``) whose readers are behind, resume those that caught up, cancel those stalled
        past ``stall_timeout`` (out of the batch at the next step, their caches kept)."""
        now = time.monotonic()
        for uid, row in live.items():
            full = row.job.out.full
            if full and row.parked is None and batch.park(uid):
                row.parked = now
                self.stats["paused"] += 1
            elif row.parked is not None and not full:
                batch.unpark(uid)
                row.parked = None
            elif row.parked is not None and now - row.parked > self.stall_timeout:
                self.stats["stalled"] += 1
                row.job.stop.set()

    def wait(self, job) -> None:
        """Serial mode, after each token but the last: wait while the job's reader is behind,
        and cancel the job when it does not catch up within ``stall_timeout``."""
        if job.out.full:
            self.stats["paused"] += 1
            if not job.out.wait_room(self.stall_timeout):
                self.stats["stalled"] += 1
                job.stop.set()
