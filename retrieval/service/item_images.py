"""The images of items in the service: uploads in, pictures out.

Uploaded images: the type is judged from the bytes (never the file name or the declared
content type), and images added over HTTP are stored under a folder of the service's own,
named by their content. Each is written to a temp file (``.NAME.*.tmp``) renamed into place,
so a killed write leaves only such a temp file, and a killed add (file written, store commit
never made) a file no item references: :meth:`UploadFolder.sweep` clears both at start.

An item's picture for the page: JPEG thumbnails made from its image file and kept in
memory, and the full image (the file itself when browsers show its format, else a JPEG of it,
or a PNG when a side is over JPEG's :data:`JPEG_MAX_SIDE`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from PIL import Image

from retrieval.data.images import open_checked, open_rgb
from retrieval.infra.io import atomic_write

#: Leading bytes of the formats the service accepts, and the extension files get.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", ".jpg"),
    (b"\x89PNG\r\n\x1a\n", ".png"),
    (b"GIF87a", ".gif"),
    (b"GIF89a", ".gif"),
    (b"BM", ".bmp"),
    (b"II*\x00", ".tif"),
    (b"MM\x00*", ".tif"),
)


ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"


#: Names of the files :meth:`UploadFolder.store` writes, and of its temp files (atomic_write);
#: :meth:`UploadFolder.sweep` touches nothing else (the folder may hold other files).
_STORED_NAME = re.compile(r"[0-9a-f]{64}\.(jpg|png|gif|bmp|tif|webp)")


_TEMP_NAME = re.compile(r"\.[0-9a-f]{64}\.(jpg|png|gif|bmp|tif|webp)\..+\.tmp")


def sniff_image(data: bytes) -> str | None:
    """The file extension of the image format ``data`` starts with (``.jpg``, ``.png``,
    ``.webp``, ...), or None when it is none of the accepted formats."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    for magic, extension in _SIGNATURES:
        if data.startswith(magic):
            return extension
    return None


def content_key(data: bytes) -> str:
    """Hex sha256 of the bytes: the cache key and the stored file's name."""
    return hashlib.sha256(data).hexdigest()


class UploadFolder:
    """Images added over HTTP, stored as ``<sha256><ext>`` under ``root`` (created on first
    use). Names come from the content only, so no part of a request reaches a path."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path_for(self, data: bytes, extension: str) -> Path:
        return self.root / f"{content_key(data)}{extension}"

    def store(self, data: bytes, extension: str) -> tuple[Path, bool]:
        """Write ``data`` atomically; returns ``(path, created)`` (False: it was there)."""
        path = self.path_for(data, extension)
        if path.is_file():
            return path, False
        self.root.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as handle:
            handle.write(data)
        return path, True

    def owns(self, uri: str) -> bool:
        """Whether ``uri`` is a file this folder stored (the only files the service deletes)."""
        try:
            return Path(uri).resolve().parent == self.root.resolve()
        except (OSError, ValueError):
            return False

    def discard(self, uri: str) -> None:
        """Delete a stored file of this folder; anything else is left alone."""
        if self.owns(uri):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(uri)

    @property
    def orphans(self) -> Path:
        """Where :meth:`sweep` moves files no item references (not served, not deleted)."""
        return self.root / ".orphans"

    def sweep(self, referenced: Callable[[Path], bool]) -> tuple[list[Path], list[Path]]:
        """Clear what interrupted adds left: temp files of unfinished writes are deleted and
        stored files for which ``referenced(path)`` is False are moved to :attr:`orphans`.
        Returns ``(moved, deleted)``, the paths as they were; nothing if the folder is absent.
        Run it while no add is in progress (the service does, before it serves)."""
        moved: list[Path] = []
        deleted: list[Path] = []
        if not self.root.is_dir():
            return moved, deleted
        for path in sorted(self.root.iterdir()):
            if not path.is_file() or path.is_symlink():
                continue
            if _TEMP_NAME.fullmatch(path.name):
                path.unlink(missing_ok=True)
                deleted.append(path)
            elif _STORED_NAME.fullmatch(path.name) and not referenced(path):
                self.orphans.mkdir(exist_ok=True)
                os.replace(path, self.orphans / path.name)
                moved.append(path)
        return moved, deleted


#: Formats every browser shows, as Pillow names them, and their media types; files in other
#: formats (TIFF) are sent converted (:meth:`Thumbnails.converted`).
SHOWN = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",  # a phone's JPEG with a second picture; shown as a JPEG
    "PNG": "image/png",
    "WEBP": "image/webp",
    "GIF": "image/gif",
    "BMP": "image/bmp",
}


#: The longest side a JPEG can have (libjpeg's limit); a longer image is converted to a PNG
JPEG_MAX_SIDE = 65_500


class Thumbnails:
    """Thumbnails (longest side ``size_px``) of item images, least recently used evicted.

    Item uris are paths written by export or by ``add`` (the bundle's own records), turned
    into files by ``path_of`` (:meth:`Retriever.item_file
    <retrieval.search.retriever.Retriever.item_file>`). Request input never reaches here.
    """

    def __init__(
        self, path_of: Callable[[str], Path], size_px: int, max_pixels: int, entries: int = 1024
    ) -> None:
        self.path_of, self.size_px, self.max_pixels = path_of, size_px, max_pixels
        self.entries = entries
        self._cache: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def full(self, item_id: int, uri: str) -> tuple[Path, str | None]:
        """The item's file and its media type when browsers show its format, else None (send
        :meth:`converted` of it instead). Reads the header only.

        Raises:
            FileNotFoundError: the item's file is not on this machine.
            ImageTooLargeError: its header gives more than ``max_pixels`` pixels.
            ImageLoadError: the file is not a readable image.
        """
        path = self.path_of(uri)
        if not path.is_file():
            raise FileNotFoundError(f"item {item_id}'s image is not available on this server")
        with open_checked(path, self.max_pixels, f"item {item_id}'s image") as header:
            return path, SHOWN.get(str(header.format))

    def converted(self, path: Path) -> tuple[bytes, str]:
        """The whole image at ``path`` in a format every browser shows, and its media type: a
        JPEG of the same size, or a PNG when a side is over :data:`JPEG_MAX_SIDE` (which a
        JPEG cannot hold). A full decode: run it in the large lane.

        Raises:
            ImageLoadError: as :func:`~retrieval.data.images.open_rgb`.
        """
        image = open_rgb(path, self.max_pixels)
        buffer = io.BytesIO()
        if max(image.size) > JPEG_MAX_SIDE:
            image.save(buffer, format="PNG")
            return buffer.getvalue(), "image/png"
        image.save(buffer, format="JPEG", quality=92)
        return buffer.getvalue(), "image/jpeg"

    def cached(self, item_id: int, uri: str) -> bytes | None:
        """The thumbnail if it is in memory already, else None (nothing is decoded)."""
        with self._lock:
            return self._cache.get((item_id, uri))

    def get(self, item_id: int, uri: str) -> bytes:
        """JPEG bytes of the item's thumbnail.

        Raises:
            FileNotFoundError: the item's file is not on this machine.
            ImageLoadError: the file is no longer a readable image.
        """
        key = (item_id, uri)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        path = self.path_of(uri)
        if not path.is_file():
            raise FileNotFoundError(f"item {item_id}'s image is not available on this server")
        image = open_rgb(path, self.max_pixels)
        image.thumbnail((self.size_px, self.size_px), Image.Resampling.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
        return data
