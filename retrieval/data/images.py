"""Safe image loading (pixel limit checked from the header, EXIF orientation, RGB) and a cheap
integrity scan of image files before training.

:func:`open_rgb` decodes a path, encoded bytes or a binary file into an RGB image;
:func:`open_checked` opens one lazily (header only, pixel limit enforced) for callers that
decode it their own way or only need its size and format; :func:`check_aspect` refuses a lazily
opened image too elongated to decode within what its pixel count says it costs.

Conversion of decoded images of any mode to RGB: alpha composited onto white, palette and
CMYK / YCbCr converted, 16/32-bit integer and float grayscale mapped to 8 bits.

Large images are converted a strip of rows at a time, so the conversion's intermediates (RGBA,
the white backdrop, 16-bit values as float64) only ever exist for a strip; every step is per
pixel, so the result equals converting the whole image at once.
"""

from __future__ import annotations

import io
import math
import os
import threading
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from retrieval.infra.checks import positive_int

__all__ = ["reduced_rgb", "to_rgb"]


#: What :func:`open_rgb` and :func:`image_source` take: a path, encoded bytes or a binary file.
ImageInput = str | os.PathLike[str] | bytes | bytearray | memoryview | BinaryIO


DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (Image.MAX_IMAGE_PIXELS)


#: The longest side may be at most this many times the shortest (:func:`check_aspect`).
#: Beyond what the pixel count says, a decode costs Pillow 8 bytes a row: 1 x 4,000,000 pixels
#: hold 46 MiB where 2,000 x 2,000 hold 16 MiB. Within this ratio the rows add at most
#: ``8 * sqrt(1000 * pixels)`` bytes (2.4 MiB at 89 M pixels), so the pixel count bounds it.
MAX_ASPECT_RATIO = 1000


_JPEG_TAIL = 1024


_OPEN_LOCK = threading.Lock()  # warnings.catch_warnings changes process-wide state


#: EXIF Orientation -> transposition, the table ``PIL.ImageOps.exif_transpose`` uses
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


#: transpositions that swap width and height
SWAPS_AXES = frozenset(
    {
        Image.Transpose.ROTATE_90,
        Image.Transpose.ROTATE_270,
        Image.Transpose.TRANSPOSE,
        Image.Transpose.TRANSVERSE,
    }
)


class ImageLoadError(OSError):
    """An image file cannot be used; the message names the file and the reason."""


class ImageTooLargeError(ImageLoadError):
    """An image has more pixels than allowed (seen from its header, before decoding)."""


class ImageShapeError(ImageLoadError):
    """An image's long side is over :data:`MAX_ASPECT_RATIO` times its short side (seen from
    its header, before decoding)."""


@dataclass(frozen=True)
class BadImage:
    """A file that failed the integrity scan and why."""

    path: Path
    reason: str


def open_checked(
    source: Path | bytes, max_pixels: int, label: str | None = None
) -> ImageFile.ImageFile:
    """Open a file or in-memory bytes lazily (header only) and enforce the pixel limit before
    any decoding. ``label`` names the source in messages (default: the path, or ``<N bytes>``).

    Pillow's own limit (``Image.MAX_IMAGE_PIXELS``) still applies, with its
    DecompressionBombWarning raised as an error, so a ``max_pixels`` above it has no effect.
    Raises ImageLoadError for a missing, empty or unidentifiable source, ImageTooLargeError
    for one over the limit.
    """
    opened: Path | io.BytesIO
    if isinstance(source, bytes):
        name, opened, nothing = label or f"<{len(source)} bytes>", io.BytesIO(source), "no bytes"
    else:
        name, opened, nothing = label or str(source), source, "file of 0 bytes"
    try:
        if (not source) if isinstance(source, bytes) else source.stat().st_size == 0:
            raise ImageLoadError(f"{name}: empty ({nothing})")
        with _OPEN_LOCK, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(f"{name}: over Pillow's pixel limit ({err})") from None
    except UnidentifiedImageError:
        raise ImageLoadError(f"{name}: not an image format Pillow can identify") from None
    except ImageLoadError:
        raise
    except Exception as err:  # OSError for files; Pillow's parsers raise others on bad headers
        raise ImageLoadError(f"{name}: cannot be opened ({type(err).__name__}: {err})") from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageTooLargeError(
            f"{name}: {width}x{height} = {width * height} pixels is over the limit of "
            f"{max_pixels} pixels; raise max_pixels to allow it, or downscale the image"
        )
    return image


def check_aspect(image: Image.Image, label: str) -> None:
    """Refuse a lazily opened ``image`` (closing it) whose long side is over
    :data:`MAX_ASPECT_RATIO` times its short side: ImageShapeError naming ``label``, its size
    and the limit. Reads the header only."""
    width, height = image.size
    long, short = max(width, height), max(1, min(width, height))
    if long > MAX_ASPECT_RATIO * short:
        image.close()
        raise ImageShapeError(
            f"{label}: {width}x{height} pixels has an aspect ratio of {math.ceil(long / short)}:1,"
            f" over the limit of {MAX_ASPECT_RATIO}:1; crop it to a less elongated picture"
        )


def image_source(source: ImageInput, name: str | None = None) -> tuple[Path | bytes, str]:
    """``source`` as :func:`open_checked` takes it, a path or bytes (a binary file is read to
    its end), and the label messages call it: ``name``, else the path or ``<N bytes>``.

    Raises:
        TypeError: ``source`` is neither a path, nor bytes (any buffer), nor a binary file.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        return path, name or str(path)
    data = source.read() if hasattr(source, "read") else source
    try:
        data = bytes(memoryview(data))  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"images are read from a path or bytes (or a binary file), got {type(data).__name__}"
        ) from None
    return data, name or f"<{len(data)} bytes>"


def open_rgb(
    source: ImageInput, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
) -> Image.Image:
    """Decode a path, encoded bytes or a binary file into a fully decoded RGB image.

    The pixel count is read from the header and refused before decoding when over
    ``max_pixels`` (or over Pillow's own limit, see :func:`open_checked`); EXIF orientation is
    applied; L/1/I/F/CMYK/YCbCr become RGB; palette images with transparency and LA/RGBA/PA
    are composited onto white; animated images give their first frame. ``name`` labels the
    source in error messages (default: the path, or ``<N bytes>``).

    Raises:
        ImageLoadError: missing, empty, unidentifiable, too large (ImageTooLargeError),
            truncated or corrupt data, naming the source (truncated files are only accepted
            if the caller set ``ImageFile.LOAD_TRUNCATED_IMAGES``).
        TypeError: ``source`` is neither a path, nor bytes, nor a binary file.
    """
    data, label = image_source(source, name)
    return decode_rgb(open_checked(data, max_pixels, label), label)


def orientation(image: Image.Image) -> Image.Transpose | None:
    """The transposition the image's EXIF Orientation asks for (as ``ImageOps.exif_transpose``
    applies it), or None. Reads the header only, except for formats that keep EXIF after the
    pixel data."""
    return _TRANSPOSE.get(image.getexif().get(ExifTags.Base.Orientation, 1))


def displayed_size(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """``(width, height)`` of the image at ``path`` as :func:`open_rgb` returns it (EXIF
    orientation applied), read from the header. Raises ImageLoadError as :func:`open_checked`."""
    with open_checked(Path(path), max_pixels) as image:
        width, height = image.size
        if orientation(image) in SWAPS_AXES:
            return height, width
        return width, height


def decode_rgb(image: Image.Image, label: str) -> Image.Image:
    """Decode a lazily opened image (closed afterwards) into an RGB image independent of its
    source, EXIF orientation applied. Raises ImageLoadError naming ``label`` for corrupt or
    truncated data.

    Memory: the decoded image and one converted or transposed copy at most (conversions
    work on strips; the source is released as soon as a converted copy exists)."""
    try:
        with image:  # closes the file on exit, not the decoded pixels
            image.load()
            method = orientation(image)
            rgb = to_rgb(image)
        if rgb is not image:
            image.close()  # frees the decoded source
        if method is None:
            return rgb
        oriented = rgb.transpose(method)
        rgb.close()
        return oriented
    except Exception as err:  # Pillow's decoders raise many types for corrupt data
        raise ImageLoadError(f"{label}: cannot be decoded ({type(err).__name__}: {err})") from None


def _jpeg_is_truncated(path: Path) -> bool:
    """True when the last KiB of a JPEG file has no end-of-image marker (0xFFD9)."""
    with open(path, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - _JPEG_TAIL))
        return b"\xff\xd9" not in handle.read()


def _scan_one(path: Path, max_pixels: int) -> BadImage | None:
    """The reason ``path`` is unusable, or None; does not decode pixel data."""
    try:
        image = open_checked(path, max_pixels)
    except ImageLoadError as err:
        return BadImage(path, str(err).removeprefix(f"{path}: "))
    try:
        with image:
            fmt = image.format
            image.verify()
        if fmt == "JPEG" and _jpeg_is_truncated(path):
            return BadImage(path, "truncated JPEG (no end-of-image marker)")
    except Exception as err:  # verify() raises many types for corrupt data
        return BadImage(path, f"failed verification ({type(err).__name__}: {err})")
    return None


def find_unreadable(
    paths: Sequence[Path], max_pixels: int = DEFAULT_MAX_PIXELS, num_threads: int = 2
) -> list[BadImage]:
    """Scan ``paths`` with ``num_threads`` threads and return the bad ones in input order.

    Detects missing and zero-byte files, files Pillow cannot identify, images over the pixel
    limit, files that fail ``Image.verify()`` and JPEGs with no end-of-image marker in their
    last KiB. Pixel data is not decoded, so some corrupt files can still pass; ``open_rgb``
    catches those. An empty ``paths`` gives []. Raises ValueError if ``num_threads`` < 1.
    """
    positive_int(num_threads, "num_threads")
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        results = pool.map(lambda p: _scan_one(Path(p), max_pixels), paths)
        return [bad for bad in results if bad is not None]


def report_unreadable(bad: Sequence[BadImage], total: int, strict: bool, where: str) -> None:
    """Report the result of ``find_unreadable``: nothing if ``bad`` is empty; with ``strict``
    an ImageLoadError; otherwise one UserWarning. Both name the count, ``where`` and the first
    5 files with reasons."""
    if not bad:
        return
    first = f"first {min(len(bad), 5)}: " + "; ".join(f"{b.path} ({b.reason})" for b in bad[:5])
    if strict:
        raise ImageLoadError(
            f"{len(bad)} of {total} images in {where} cannot be read: {first}. Fix or "
            "remove them, or set data.strict_images=false to skip them with a warning"
        )
    warnings.warn(
        f"skipping {len(bad)} of {total} images in {where} that cannot be read: {first}; "
        "set data.strict_images=true to make this an error",
        UserWarning,
        stacklevel=2,
    )


IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})


def list_images(folder: str | Path) -> list[Path]:
    """Image files (by extension) under ``folder``, recursively, sorted; hidden files and
    symlinked folders are skipped."""
    found = [Path(d) / f for d, _, files in os.walk(folder) for f in files if f[0] != "."]
    return sorted(p for p in found if p.suffix.lower() in IMAGE_EXTENSIONS)


def images_in_folder(folder: str | Path, name: str | None = None) -> list[Path]:
    """:func:`list_images` of a folder that must exist and hold images; ``name`` is how error
    messages call it (default: the path).

    Raises:
        ValueError: ``folder`` is not a folder, or holds no image files.
    """
    root = Path(folder)
    name = name or str(root)
    if not root.is_dir():
        raise ValueError(f"{name} is not a folder")
    paths = list_images(root)
    if not paths:
        raise ValueError(f"{name} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths


_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}


_STRIP_BYTES = 4 << 20  # conversions of large images work on strips of about this size


def _high_bit_depth_to_l(image: Image.Image, from_16bit: bool | None = None) -> Image.Image:
    """Map 16/32-bit integer and float grayscale to 8-bit L.

    ``I;16*`` is scaled from 0..65535; ``I`` is scaled the same way when its maximum exceeds
    255 (16-bit data stored as 32-bit), otherwise kept; ``F`` and other values are clipped to
    0..255. ``from_16bit`` overrides that decision (a strip of an image takes the whole
    image's, see :func:`to_rgb`).
    """
    values = np.asarray(image, dtype=np.float64)
    if from_16bit is None:
        from_16bit = _is_16bit(image)
    if from_16bit:
        values = values / 257.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def _is_16bit(image: Image.Image) -> bool:
    """Whether integer grayscale holds 16-bit values (the whole image's maximum, no copy)."""
    if image.mode.startswith("I;16"):
        return True
    if image.mode != "I" or image.width * image.height == 0:
        return False
    return float(image.getextrema()[1]) > 255  # type: ignore[index, arg-type]


def _to_rgb_whole(image: Image.Image, from_16bit: bool | None = None) -> Image.Image:
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode.startswith(("I", "F")):
        image = _high_bit_depth_to_l(image, from_16bit)
    return image.convert("RGB")


def _strip_rows(width: int, multiple: int = 1) -> int:
    """Rows per strip: about ``_STRIP_BYTES`` of 4-byte pixels, a multiple of ``multiple``."""
    rows = max(1, _STRIP_BYTES // max(1, 4 * width))
    return max(multiple, rows - rows % multiple)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB version of a decoded ``image`` (``image`` itself when it is RGB); transparent
    pixels are composited onto white.

    A large image is converted a strip of rows at a time into one new RGB image: the input
    plus the output are the only full-size buffers."""
    if image.mode == "RGB":
        return image
    width, height = image.size
    rows = _strip_rows(width)
    if rows >= height:
        return _to_rgb_whole(image)
    from_16bit = _is_16bit(image)
    out = Image.new("RGB", image.size)
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        out.paste(_to_rgb_whole(strip, from_16bit), (0, top))
    return out


def reduced_rgb(image: Image.Image, factor: tuple[int, int]) -> Image.Image:
    """RGB version of a decoded ``image`` averaged over ``factor`` = (x, y) pixel blocks
    (``Image.reduce``: the size is rounded up, edge blocks average what they cover).

    Converted like :func:`to_rgb` (alpha onto white, palette, 16-bit) a strip of rows at a
    time, each strip reduced at once, so no full-size copy of ``image`` is ever made; the
    result equals reducing the whole converted image."""
    if image.mode == "RGB":
        return image.reduce(factor)
    width, height = image.size
    fx, fy = factor
    out = Image.new("RGB", (-(-width // fx), -(-height // fy)))
    from_16bit = _is_16bit(image)
    rows = _strip_rows(width, fy)
    for top in range(0, height, rows):
        strip = image.crop((0, top, width, min(height, top + rows)))
        out.paste(_to_rgb_whole(strip, from_16bit).reduce(factor), (0, top // fy))
    return out
