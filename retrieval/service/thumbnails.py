"""An item's picture for the page: JPEG thumbnails made from its image file and kept in
memory, and the full image (the file itself when browsers show its format, else a JPEG of it,
or a PNG when a side is over JPEG's :data:`JPEG_MAX_SIDE`)."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from retrieval.data.images import open_checked, open_rgb
from retrieval.search.opening import item_path

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

    Item uris are paths written by export or by ``add`` (the bundle's own records); a
    relative one is read relative to the bundle folder. Request input never reaches here.
    """

    def __init__(self, bundle: Path, size_px: int, max_pixels: int, entries: int = 1024) -> None:
        self.bundle, self.size_px, self.max_pixels = Path(bundle), size_px, max_pixels
        self.entries = entries
        self._cache: OrderedDict[tuple[int, str], bytes] = OrderedDict()
        self._lock = threading.Lock()

    def path_of(self, uri: str) -> Path:
        return item_path(self.bundle, uri)

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
