"""Micro-batching: queries that arrive together are embedded in one model call.

Each request preprocesses its own image, then awaits :meth:`MicroBatcher.embed`. One worker
task takes the first waiting query, waits at most ``max_wait_s`` for more (up to
``max_batch``), runs the model once on the stacked batch in a dedicated thread and hands each
request its row. Under load the model is busy while new queries queue up, so batches grow with
concurrency and throughput with them; a lone query waits only ``max_wait_s``. A query whose
deadline has passed by the time its batch runs is dropped (DeadlineExceeded) before the model
sees it, so a backlog of late queries costs no model time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from retrieval.infra.checks import positive_int
from retrieval.service.budget import DeadlineExceeded

Pending = tuple[np.ndarray, "asyncio.Future[np.ndarray]", float]


class MicroBatcher:
    """Batches calls of ``embed_fn``: ``B`` prepared images (each ``(3, H, W)`` float32, shapes
    may differ) -> ``(B, dim)``.

    Args:
        embed_fn: the model; called from one worker thread, one batch at a time.
        max_batch: most queries per call.
        max_wait_s: how long the first query of a batch waits for company.
        on_batch: called with each batch's size (for statistics).
    """

    def __init__(
        self,
        embed_fn: Callable[[list[np.ndarray]], np.ndarray],
        max_batch: int = 16,
        max_wait_s: float = 0.002,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        positive_int(max_batch, "max_batch")
        self.embed_fn, self.max_batch, self.max_wait_s = embed_fn, max_batch, max_wait_s
        self.on_batch = on_batch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Pending] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def embed(self, item: np.ndarray, deadline: float = float("inf")) -> np.ndarray:
        """The embedding of one preprocessed query ``item``: (dim,) float32. The model's
        error, if it fails, is raised here (and in every request of the same batch);
        DeadlineExceeded when its batch starts after ``deadline`` (``time.monotonic()``)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop or self._worker is None or self._worker.done():
            self._loop, self._queue = loop, asyncio.Queue()
            self._worker = loop.create_task(self._run(self._queue))
        assert self._queue is not None
        future: asyncio.Future[np.ndarray] = loop.create_future()
        self._queue.put_nowait((item, future, deadline))
        return await future

    async def _run(self, queue: asyncio.Queue[Pending]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            self._drain(queue, batch)
            if len(batch) < self.max_batch and self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
                self._drain(queue, batch)
            now = time.monotonic()
            for _, future, deadline in batch:
                if deadline <= now and not future.done():
                    future.set_exception(
                        DeadlineExceeded("the query's deadline passed before embedding")
                    )
            live = [(x, f) for x, f, _ in batch if not f.done()]  # late or cancelled: gone
            if not live:
                continue
            try:
                images = [x for x, _ in live]
                vectors = await loop.run_in_executor(self._executor, self.embed_fn, images)
            except Exception as err:  # the model's failure belongs to every waiting request
                for _, future in live:
                    if not future.done():
                        future.set_exception(err)
                continue
            if self.on_batch is not None:
                self.on_batch(len(live))
            for (_, future), vector in zip(live, vectors, strict=True):
                if not future.done():
                    future.set_result(vector)

    def _drain(self, queue: asyncio.Queue[Pending], batch: list[Pending]) -> None:
        while len(batch) < self.max_batch:
            try:
                batch.append(queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def aclose(self) -> None:
        """Stop the worker (pending requests are cancelled) and its thread."""
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        self._executor.shutdown(wait=False, cancel_futures=True)
