"""What the service does, apart from HTTP: embed uploads (batched and cached), search, add and
remove items. :mod:`retrieval.service.app` and :mod:`retrieval.service.routes` map requests
onto it.

Micro-batching: queries that arrive together are embedded in one model call.

Each request preprocesses its own image, then awaits :meth:`MicroBatcher.embed`. One worker
task takes the first waiting query, waits at most ``max_wait_s`` for more (up to
``max_batch``), runs the model once on the stacked batch in a dedicated thread and hands each
request its row. Under load the model is busy while new queries queue up, so batches grow with
concurrency and throughput with them; a lone query waits only ``max_wait_s``. A query whose
deadline has passed by the time its batch runs is dropped (DeadlineExceeded) before the model
sees it, so a backlog of late queries costs no model time.

Embeddings of repeated uploads are kept a while in a small least-recently-used cache whose
entries expire (:class:`ExpiringCache`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import anyio.to_thread
import numpy as np

from retrieval.data.images import ImageLoadError, ImageTooLargeError, open_checked
from retrieval.infra.checks import positive_int
from retrieval.search import Retriever
from retrieval.search.duplicate_finder import DuplicateReport, Threshold, choose_threshold
from retrieval.search.duplicates import Normalisation
from retrieval.search.retriever import Hit
from retrieval.service.budget import SMALL_PIXELS, Deadline, DeadlineExceeded, Lane
from retrieval.service.guard import ServiceStats, UploadSlots
from retrieval.service.item_images import (
    ACCEPTED,
    Thumbnails,
    UploadFolder,
    content_key,
    sniff_image,
)
from retrieval.service.settings import ServiceSettings

V = TypeVar("V")


class ExpiringCache(Generic[V]):
    """At most ``size`` entries, each kept ``ttl_s`` seconds; thread-safe. ``size=0`` or
    ``ttl_s=0`` disables it (every lookup misses)."""

    def __init__(
        self, size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.size, self.ttl_s, self._clock = size, ttl_s, clock
        self._entries: OrderedDict[str, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> V | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            stored_at, value = entry
            if self._clock() - stored_at > self.ttl_s:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return value

    def put(self, key: str, value: V) -> None:
        if self.size <= 0 or self.ttl_s <= 0:
            return
        with self._lock:
            self._entries[key] = (self._clock(), value)
            self._entries.move_to_end(key)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


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


log = logging.getLogger("retrieval.service")


class BadUpload(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class OutOfSpace(Exception):
    """The server's disk is full (or its quota spent): answered 507, nothing written."""


#: The errors of a write that found no space left
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class AddOutcome:
    added: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    #: per added item, the items already in the bundle above the duplicate threshold
    near: list[dict[str, Any]] = field(default_factory=list)


def check_image_bytes(data: bytes, name: str) -> str:
    """The extension of an upload's format; BadUpload (400 empty, 415 not an image) else."""
    if not data:
        raise BadUpload(400, f"the upload '{name}' is empty")
    extension = sniff_image(data)
    if extension is None:
        raise BadUpload(415, f"the upload '{name}' is not a {ACCEPTED} image (judged by its bytes)")
    return extension


class SearchService:
    """A loaded bundle behind the HTTP API. Searches run concurrently; writes (add, remove)
    are serialised, and the Retriever keeps searches consistent while they happen."""

    def __init__(self, retriever: Retriever, settings: ServiceSettings) -> None:
        self.retriever, self.settings = retriever, settings
        self.stats = ServiceStats()
        self.batcher = MicroBatcher(
            retriever.embed_pixels,
            max_batch=settings.batch_size,
            max_wait_s=settings.batch_wait_ms / 1000.0,
            on_batch=self.stats.record_batch,
        )
        self.cache: ExpiringCache[np.ndarray] = ExpiringCache(
            settings.cache_size, settings.cache_ttl_s
        )
        self.thumbnails = Thumbnails(
            retriever.item_file, settings.thumbnail_px, settings.max_pixels
        )
        self.uploads = UploadFolder(settings.uploads_dir or retriever.folder / "uploads")
        self._write_lock = threading.Lock()
        self._writes = 0  # adds and removals so far: what a cached grouping was computed at
        self._groups_lock = threading.Lock()
        self._groups: dict[tuple[float | None, str], tuple[int, DuplicateReport]] = {}
        #: decodes of images over SMALL_PIXELS (memory-bound) and of the rest (CPU-bound)
        self.large = Lane("large", settings.large_decode_slots(), settings.decode_queue)
        self.small = Lane("small", settings.small_decode_slots(), settings.max_requests)
        self.upload_slots = UploadSlots(settings.max_requests, settings.max_receiving)
        self.swept = self.sweep_uploads()

    @property
    def max_pixels(self) -> int:
        return min(self.settings.max_pixels, self.retriever.max_pixels)

    # searching -----------------------------------------------------------------------------
    async def embed_upload(self, data: bytes, name: str, deadline: Deadline) -> np.ndarray:
        """The embedding of an uploaded image: (dim,) float32. An identical upload seen in the
        last ``cache_ttl_s`` seconds is not decoded or embedded again. The decode waits for a
        slot of its lane (Busy when the lane's queue is full); every stage checks
        ``deadline`` (DeadlineExceeded)."""
        check_image_bytes(data, name)
        key = content_key(data)
        cached = self.cache.get(key)
        self.stats.record_cache(cached is not None)
        if cached is not None:
            return cached
        pixels = await self.small.run(lambda: self._pixels(data, name), deadline)
        lane = self.small if pixels <= SMALL_PIXELS else self.large
        vector = await self.batcher.embed(
            await lane.run(lambda: self.decode(data, name, deadline.check), deadline),
            deadline.at,
        )
        self.cache.put(key, vector)
        return vector

    def _pixels(self, data: bytes, name: str) -> int:
        """Width x height from the header (413 over the limit, 422 unreadable)."""
        with _bad_uploads(name), open_checked(data, self.max_pixels, name) as image:
            return int(image.width * image.height)

    def decode(self, data: bytes, name: str, check: Callable[[str], None]) -> np.ndarray:
        """The model input of an upload, (3, S, S) float32, large images decoded at a reduced
        scale (see :meth:`Preprocessing.prepare`); runs in a lane's thread."""
        with _bad_uploads(name):
            return self.retriever.prepare(data, self.max_pixels, name, check)

    async def search(
        self,
        vector: np.ndarray,
        k: int,
        label: str | None,
        rerank: bool | None = None,
        deadline: Deadline | None = None,
        offset: int = 0,
        exclude: int | None = None,
    ) -> tuple[list[Hit], bool]:
        """Results ``offset`` to ``offset + k`` of the ranking of ``vector`` (best first), with
        the item ``exclude`` left out of the ranking (an item's own similar list), and whether
        the ranking goes on past them. Pages of one ranking do not overlap: equal scores are
        ordered by ascending id, and every page is cut from the same search of ``max_k`` + 1
        results (one past the last page: is there more?), so re-ranking and approximate
        indexes order one pool whatever the page."""
        want = self.settings.max_k + 1 + (exclude is not None)

        def run() -> list[list[Hit]]:
            if deadline is not None:
                deadline.check("search")
            return self.retriever.search(vector[None, :], want, 32, label, rerank)

        found = (await anyio.to_thread.run_sync(run, abandon_on_cancel=True))[0]
        ranked = [hit for hit in found if hit.id != exclude]
        return ranked[offset : offset + k], len(ranked) > offset + k

    def sweep_uploads(self) -> list[Path]:
        """Move aside (to ``uploads/.orphans/``) the upload files no item references (an add
        killed before its store commit) and delete temp files of interrupted writes; logged."""
        items = self.retriever.items
        uris = items.removed_uris()

        def referenced(path: Path) -> bool:
            uri = str(path.resolve())
            if uri in uris:
                return True
            found = items.get(items.find_by_sha256(path.stem)).values()
            return any(it.uri == uri for it in found)

        moved, temps = self.uploads.sweep(referenced)
        if temps:
            log.warning(
                "removed %d unfinished upload file(s) from %s", len(temps), self.uploads.root
            )
        if moved:
            log.warning(
                "moved %d upload file(s) that no item references to %s: %s",
                len(moved),
                self.uploads.orphans,
                ", ".join(p.name for p in moved[:5]),
            )
        return moved

    # writing -------------------------------------------------------------------------------
    def add(self, uploads: Sequence[tuple[str, bytes]], labels: Sequence[str | None]) -> AddOutcome:
        """Store and add uploaded images (``(name, bytes)``), one label each. Images that are
        not accepted are listed in ``rejected`` with the reason; nothing half-added remains.
        OutOfSpace when the disk is full (nothing added, the files this call stored deleted)."""
        outcome = AddOutcome()
        with self._write_lock, _out_of_space("added"):
            stored: list[tuple[str, Path, bool, str | None]] = []
            try:
                for (name, data), label in zip(uploads, labels, strict=True):
                    try:
                        extension = check_image_bytes(data, name)
                    except BadUpload as err:
                        outcome.rejected.append({"name": name, "reason": str(err)})
                        continue
                    path, created = self.uploads.store(data, extension)
                    stored.append((name, path, created, label))
                if not stored:
                    return outcome
                report = self.retriever.add(  # one image decoded at a time
                    [p for _, p, _, _ in stored], [lab for *_, lab in stored], batch_size=1
                )
            except BaseException:
                for _, path, created, _ in stored:
                    if created:
                        self.uploads.discard(str(path))
                raise
            by_path = {str(p.resolve()): (name, created) for name, p, created, _ in stored}
            self._writes += 1
            for item_id in report.added:
                item = self.retriever.item(item_id)
                outcome.added.append({"id": item_id, "name": by_path[item.uri][0]})
                outcome.near += self._near_copies(item_id, item.vector, by_path[item.uri][0])
            for uri, existing in report.duplicates:
                name, created = by_path[uri]
                outcome.duplicates.append({"id": existing, "name": name})
                if created and self.retriever.item(existing).uri != uri:
                    self.uploads.discard(uri)
            for uri, reason in report.unreadable:
                name, created = by_path[uri]
                outcome.rejected.append({"name": name, "reason": _reason_text(reason, uri)})
                if created:
                    self.uploads.discard(uri)
        return outcome

    def remove(self, item_id: int) -> None:
        """Remove an item (KeyError if unknown or already removed; OutOfSpace when the disk
        is full); its file is deleted when the service stored it and no other item uses it."""
        with self._write_lock, _out_of_space("removed"):
            item = self.retriever.item(item_id)
            self.retriever.remove([item_id])
            self._writes += 1
            self.uploads.discard(item.uri)  # only a file the service stored itself

    # duplicates ----------------------------------------------------------------------------
    @property
    def duplicate_threshold(self) -> Threshold | None:
        """The bundle's calibrated near-duplicate threshold (None without a calibration)."""
        calibration = self.retriever.manifest.get("duplicates")
        if not calibration:
            return None
        return choose_threshold(calibration, None, None, str(self.retriever.folder))

    def _near_copies(self, item_id: int, vector: np.ndarray, name: str) -> list[dict[str, Any]]:
        """The items above the duplicate threshold of a just-added item (none without one),
        scored as ``retrieval duplicates`` scores them (normalised as calibrated)."""
        threshold = self.duplicate_threshold
        if threshold is None:
            return []
        norm = threshold.norm
        want = 11 if norm is None else max(11, norm.k + 1)
        hits = [h for h in self.retriever.search(vector[None, :], want, rerank=False)[0]]
        others = [h for h in hits if h.id != item_id][:10]
        scores: np.ndarray = np.array([h.score for h in others], dtype=np.float32)
        if norm is not None and others:
            own = _background(norm, [h.score for h in hits if h.id != item_id])
            found = self.retriever.search(
                np.stack([self.retriever.item(h.id).vector for h in others]),
                norm.k + 1,
                rerank=False,
            )
            theirs = np.array(
                [
                    _background(norm, [x.score for x in row if x.id != h.id])
                    for h, row in zip(others, found, strict=True)
                ]
            )
            scores = scores - (own + theirs) / 2
        similar = [
            {"id": h.id, "name": Path(h.uri).name, "score": round(float(score), 6)}
            for h, score in zip(others, scores, strict=True)
            if score >= threshold.value
        ]
        return [{"id": item_id, "name": name, "similar": similar}] if similar else []

    def duplicates(self, threshold: float | None, keep: str) -> DuplicateReport:
        """The bundle's duplicate groups (:meth:`Retriever.duplicates`), computed once per
        state of the items and setting: one grouping runs at a time, later requests read it."""
        key = (threshold, keep)
        with self._groups_lock:
            cached = self._groups.get(key)
            if cached is not None and cached[0] == self._writes:
                return cached[1]
            writes = self._writes
            report = self.retriever.duplicates(threshold=threshold, keep=keep)
            if len(self._groups) >= 8:
                self._groups.clear()
            self._groups[key] = (writes, report)
            return report


@contextlib.contextmanager
def _out_of_space(done: str) -> Iterator[None]:
    """A write that found no space left on the disk as OutOfSpace (507); nothing is ``done``."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        log.error("a write found no space left: %s", err)
        raise OutOfSpace(
            f"the server's disk is full ({err.strerror}): nothing was {done}; "
            "send the request again once space is freed on the server"
        ) from err


@contextlib.contextmanager
def _bad_uploads(name: str) -> Iterator[None]:
    """Image errors as the BadUpload the client sees: 413 over the pixel limit, 422 else."""
    try:
        yield
    except ImageTooLargeError as err:
        raise BadUpload(413, f"'{name}': {_reason(err)}") from None
    except ImageLoadError as err:
        raise BadUpload(422, f"'{name}' cannot be read as an image: {_reason(err)}") from None


def _background(norm: Normalisation, scores: list[float]) -> float:
    """An item's background similarity from its own ranked scores (itself left out)."""
    return float(norm.backgrounds(np.array([scores], dtype=np.float32).reshape(1, -1))[0])


def _reason(err: Exception) -> str:
    """An image error's reason without the source name it starts with."""
    text = str(err)
    return text.split(": ", 1)[1] if ": " in text else text


def _reason_text(reason: str, uri: str) -> str:
    return reason.removeprefix(f"{uri}: ")
