"""Uploaded images: the type is judged from the bytes (never the file name or the declared
content type), and images added over HTTP are stored under a folder of the service's own,
named by their content. Each is written to a temp file (``.NAME.*.tmp``) renamed into place,
so a killed write leaves only such a temp file, and a killed add (file written, store commit
never made) a file no item references: :meth:`UploadFolder.sweep` clears both at start."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

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
