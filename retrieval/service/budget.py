"""What bounds the service's memory and time: request deadlines, and lanes of decode slots
with bounded wait queues (a full queue answers 503 at once instead of piling work up).

A decode reserves a slot of its lane before it starts and gives it back when its thread
ends, even when the request itself has already been answered 504: the memory a decode holds
is bounded by the slots, not by what clients send.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import anyio.to_thread

T = TypeVar("T")

#: Bytes per pixel a decode holds at its peak, at worst: the decoded image (4 bytes a pixel
#: for RGB, RGBA, CMYK and 32-bit modes) and one converted full-size copy of it (an image too
#: small to reduce, converted or transposed); reduced decodes hold about half.
WORST_BYTES_PER_PIXEL = 8
#: Images up to this many pixels decode in the small lane (cheap: queries from cameras
#: and phones are resized well below it; a 2,000 x 2,000 image is 4 M pixels).
SMALL_PIXELS = 4_000_000


class Busy(Exception):
    """Too much work is waiting already: answered 503 with ``Retry-After: retry_after``."""

    def __init__(self, what: str, retry_after: int) -> None:
        super().__init__(f"the server is busy ({what}); retry in {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceeded(Exception):
    """A request ran past its deadline; the stage it was about to start is named."""


@dataclass(frozen=True)
class Deadline:
    """The monotonic time ``at`` which a request must be answered (504 after)."""

    at: float
    timeout_s: float

    @classmethod
    def after(cls, timeout_s: float) -> Deadline:
        return cls(time.monotonic() + timeout_s, timeout_s)

    def left(self) -> float:
        return self.at - time.monotonic()

    def passed(self) -> bool:
        return self.left() <= 0

    def check(self, stage: str) -> None:
        """Raise DeadlineExceeded if the deadline has passed (called between stages)."""
        if self.passed():
            raise DeadlineExceeded(f"the request took over {self.timeout_s:g} s (before {stage})")


def machine_memory_bytes() -> int:
    """Physical memory of the machine (or of the container's cgroup limit when lower)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    with contextlib.suppress(OSError, ValueError):
        limit = open("/sys/fs/cgroup/memory.max").read().strip()  # noqa: SIM115
        if limit != "max":
            total = min(total, int(limit))
    return int(total)


def default_decode_memory() -> int:
    """The memory large decodes may hold together by default: 1/8 of the machine's, at most
    2 GiB (the rest is for the model, the index, request bodies and the neighbours)."""
    return min(2 << 30, machine_memory_bytes() // 8)


def default_decode_slots(max_pixels: int, memory_bytes: int, cores: int | None = None) -> int:
    """``min(cores, memory_bytes // worst-case bytes of one decode)``, at least 1."""
    worst = WORST_BYTES_PER_PIXEL * max_pixels
    return max(1, min(cores or os.cpu_count() or 1, memory_bytes // worst))


class Lane:
    """At most ``slots`` jobs at a time, at most ``queue`` waiting for a slot (FIFO); a job
    that finds the queue full gets Busy, one still waiting at its deadline DeadlineExceeded.
    The loop that first uses a lane owns it; slots are given back from any thread."""

    def __init__(self, name: str, slots: int, queue: int) -> None:
        if slots < 1 or queue < 0:
            raise ValueError(f"lane {name}: slots must be >= 1 and queue >= 0")
        self.name, self.slots, self.queue = name, slots, queue
        self.busy = 0
        self.refused = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._recent: collections.deque[float] = collections.deque(maxlen=16)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.done())

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for a job arriving now (1 to 60)."""
        typical = sorted(self._recent)[len(self._recent) // 2] if self._recent else 1.0
        return max(1, min(60, math.ceil(typical * (self.waiting + 1) / self.slots)))

    async def run(self, fn: Callable[[], T], deadline: Deadline, abandon: bool = True) -> T:
        """``fn()`` in a worker thread once a slot is free. If the request is cancelled (its
        timeout) while ``fn`` runs, the await ends at once (with ``abandon``; else once ``fn``
        returns); the slot stays taken until ``fn`` returns, so the work in flight never
        exceeds the slots."""
        await self._acquire(deadline)
        loop = asyncio.get_running_loop()
        start = time.monotonic()
        owner: list[str] = []  # who gives the slot back: the thread once it starts, else us
        lock = threading.Lock()

        def job() -> T:
            with lock:
                if owner:  # the request gave up before the thread started
                    raise DeadlineExceeded("abandoned before it started")
                owner.append("thread")
            try:
                return fn()
            finally:
                self._recent.append(time.monotonic() - start)
                with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                    loop.call_soon_threadsafe(self._release)

        try:
            return await anyio.to_thread.run_sync(job, abandon_on_cancel=abandon)
        except BaseException:
            with lock:
                if not owner:
                    owner.append("caller")
                    self._release()
            raise

    async def _acquire(self, deadline: Deadline) -> None:
        self._loop = asyncio.get_running_loop()
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
            return
        if self.waiting >= self.queue:
            self.refused += 1
            raise Busy(
                f"{self.name} decodes: {self.busy} running, {self.waiting} waiting",
                self.retry_after(),
            )
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(max(0.0, deadline.left())):
                await waiter  # set by _release, which hands its slot over
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                self._release()
            raise DeadlineExceeded(
                f"the request took over {deadline.timeout_s:g} s (waiting for a decode slot)"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self._release()  # handed a slot just as it gave up: pass it on
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def _release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to it; busy stays
                return
        self.busy -= 1

    def snapshot(self) -> dict[str, int]:
        return {
            "slots": self.slots,
            "queue": self.queue,
            "running": self.busy,
            "waiting": self.waiting,
            "refused": self.refused,
        }
