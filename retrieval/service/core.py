"""What the service does, apart from HTTP: embed uploads (batched and cached), search, add and
remove items. :mod:`retrieval.service.app` maps requests onto it."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from retrieval.data.images import ImageLoadError
from retrieval.search import Hit, Retriever
from retrieval.service.batching import MicroBatcher
from retrieval.service.cache import ExpiringCache
from retrieval.service.settings import ServiceSettings
from retrieval.service.stats import ServiceStats
from retrieval.service.thumbnails import Thumbnails
from retrieval.service.uploads import ACCEPTED, UploadFolder, content_key, sniff_image


class BadUpload(ValueError):
    """An upload the service refuses; ``status`` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class AddOutcome:
    added: list[dict[str, Any]] = field(default_factory=list)
    duplicates: list[dict[str, Any]] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)


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
        self.thumbnails = Thumbnails(retriever.folder, settings.thumbnail_px, settings.max_pixels)
        self.uploads = UploadFolder(settings.uploads_dir or retriever.folder / "uploads")
        self._write_lock = threading.Lock()

    # searching -----------------------------------------------------------------------------
    async def embed_upload(self, data: bytes, name: str) -> np.ndarray:
        """The embedding of an uploaded image: (dim,) float32. An identical upload seen in the
        last ``cache_ttl_s`` seconds is not decoded or embedded again."""
        check_image_bytes(data, name)
        key = content_key(data)
        cached = self.cache.get(key)
        self.stats.record_cache(cached is not None)
        if cached is not None:
            return cached
        pixels = await run_in_threadpool(self._prepare, data, name)
        vector = await self.batcher.embed(pixels)
        self.cache.put(key, vector)
        return vector

    def _prepare(self, data: bytes, name: str) -> np.ndarray:
        from retrieval.data.images import ImageTooLargeError

        try:
            return self.retriever.prepare(data, self.settings.max_pixels)
        except ImageTooLargeError as err:
            raise BadUpload(413, f"'{name}': {_reason(err)}") from None
        except ImageLoadError as err:
            raise BadUpload(422, f"'{name}' cannot be read as an image: {_reason(err)}") from None

    async def search(
        self, vector: np.ndarray, k: int, label: str | None, rerank: bool | None = None
    ) -> list[Hit]:
        hits = await run_in_threadpool(self.retriever.search, vector[None, :], k, 32, label, rerank)
        return hits[0]

    # writing -------------------------------------------------------------------------------
    def add(self, uploads: Sequence[tuple[str, bytes]], labels: Sequence[str | None]) -> AddOutcome:
        """Store and add uploaded images (``(name, bytes)``), one label each. Images that are
        not accepted are listed in ``rejected`` with the reason; nothing half-added remains."""
        outcome = AddOutcome()
        with self._write_lock:
            stored: list[tuple[str, Path, bool, str | None]] = []
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
            try:
                report = self.retriever.add(
                    [p for _, p, _, _ in stored], [lab for *_, lab in stored]
                )
            except BaseException:
                for _, path, created, _ in stored:
                    if created:
                        self.uploads.discard(str(path))
                raise
            by_path = {str(p.resolve()): (name, created) for name, p, created, _ in stored}
            for item_id in report.added:
                item = self.retriever.item(item_id)
                outcome.added.append({"id": item_id, "name": by_path[item.uri][0]})
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
        """Remove an item (KeyError if unknown or already removed); its file is deleted when the
        service stored it and no other item uses it."""
        with self._write_lock:
            item = self.retriever.item(item_id)
            self.retriever.remove([item_id])
            self.uploads.discard(item.uri)  # only a file the service stored itself


def _reason(err: Exception) -> str:
    """An image error's reason without the source name it starts with."""
    text = str(err)
    return text.split(": ", 1)[1] if ": " in text else text


def _reason_text(reason: str, uri: str) -> str:
    return reason.removeprefix(f"{uri}: ")
