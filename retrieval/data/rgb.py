"""Conversion of decoded images of any mode to RGB: alpha composited onto white, palette and
CMYK / YCbCr converted, 16/32-bit integer and float grayscale mapped to 8 bits.

Large images are converted a strip of rows at a time, so the conversion's intermediates (RGBA,
the white backdrop, 16-bit values as float64) only ever exist for a strip; every step is per
pixel, so the result equals converting the whole image at once.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["reduced_rgb", "to_rgb"]

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
