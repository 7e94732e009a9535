"""From a decoded or encoded image to a :class:`~retrieval.bundle.preprocess.Preprocessor`'s
model input, with Pillow and NumPy only (no torch).

:func:`model_input` resizes, crops or pads and normalises an RGB image; :func:`prepare` decodes
a file or encoded bytes straight to that input, a large image at a reduced scale (see there).

Memory, whatever the image's shape: :func:`prepare` refuses from the header an image over the
pixel limit or over :data:`~retrieval.data.images.MAX_ASPECT_RATIO`; the decode then holds the
image (and a reduced or converted copy), and the resize makes at most about
:data:`RESIZE_PIXELS` pixels more: ``crop`` resizes only the square it keeps once resizing the
whole image would make more; ``squash``, ``pad``, ``short`` and ``long`` make at most
``2 * side**2`` pixels, plus Pillow's first pass over an image already reduced to a few times
that size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from retrieval.data.images import (
    SWAPS_AXES,
    ImageInput,
    ImageLoadError,
    check_aspect,
    decode_rgb,
    image_source,
    open_checked,
    orientation,
)
from retrieval.data.rgb import reduced_rgb, to_rgb

if TYPE_CHECKING:
    from retrieval.bundle.preprocess import Preprocessor

__all__ = ["FILTERS", "REDUCING_GAP", "RESIZE_PIXELS", "model_input", "prepare"]

FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
#: :func:`prepare` first reduces an image by an integer factor when it stays at least this
#: many times larger than its resized size (as ``Image.resize(reducing_gap=...)``)
REDUCING_GAP = 3.0
#: A ``crop`` resize that would make more pixels than this resizes only the square it keeps
#: (``Image.resize(box=...)``): within a grey level of resizing the whole image and cropping
#: it, as torchvision does and as smaller resizes still do (at a short side of 256, images up
#: to 1:64)
RESIZE_PIXELS = 1 << 22
Box = tuple[float, float, float, float]


def model_input(
    pre: Preprocessor, rgb: Image.Image, size: tuple[int, int], box: Box | None = None
) -> np.ndarray:
    """Resize ``rgb`` (its region ``box``, when reduced) to ``size``, crop / pad and normalise
    it as ``pre`` says: ``(3, input_size, input_size)`` float32. A ``crop`` resize over
    :data:`RESIZE_PIXELS` makes only the centre square (see there)."""
    side = pre.input_size
    whole = (0.0, 0.0, float(rgb.width), float(rgb.height))
    top = left = 0
    if pre.resize_mode == "crop":
        size, box, (top, left) = _crop_plan(size, box or whole, side)
    if box is not None and box != whole:
        rgb = rgb.resize(size, FILTERS[pre.interpolation], box=box)
    elif size != rgb.size:
        rgb = rgb.resize(size, FILTERS[pre.interpolation])
    pixels = np.asarray(rgb, dtype=np.uint8)
    if pre.resize_mode == "crop":
        pixels = pixels[top : top + side, left : left + side]
    chw = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(pre.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(pre.std, dtype=np.float32)[:, None, None]
    out = (chw - mean) / std
    if pre.resize_mode == "pad":  # zeros: the mean colour once normalised
        top, left = (side - size[1]) // 2, (side - size[0]) // 2
        margins = ((0, 0), (top, side - size[1] - top), (left, side - size[0] - left))
        out = np.pad(out, margins)
    return np.ascontiguousarray(out)


def _crop_plan(
    size: tuple[int, int], box: Box, side: int
) -> tuple[tuple[int, int], Box, tuple[int, int]]:
    """How ``crop`` makes the centre ``side`` square of region ``box`` resized to ``size``:
    ``(size to resize to, region to resize, (top, left) of the square in the result)``. Up to
    :data:`RESIZE_PIXELS`: all of ``box`` to ``size``, the square then cut out at offsets rounded
    as torchvision rounds them; over it: only the square's own region, to ``(side, side)``."""
    top = int(round((size[1] - side) / 2.0))
    left = int(round((size[0] - side) / 2.0))
    if size[0] * size[1] <= RESIZE_PIXELS:
        return size, box, (top, left)
    x0, y0, x1, y1 = box
    sx, sy = (x1 - x0) / size[0], (y1 - y0) / size[1]
    kept = (
        x0 + left * sx,
        y0 + top * sy,
        min(x1, x0 + (left + side) * sx),
        min(y1, y0 + (top + side) * sy),
    )
    return (side, side), kept, (0, 0)


def prepare(
    pre: Preprocessor,
    source: ImageInput,
    max_pixels: int,
    name: str | None = None,
    check: Callable[[str], None] | None = None,
) -> np.ndarray:
    """The body of :meth:`Preprocessor.prepare <retrieval.bundle.preprocess.Preprocessor.prepare>`
    (documented there): decode ``source`` straight to ``pre``'s model input."""
    check = check or (lambda stage: None)
    data, label = image_source(source, name)
    opened = open_checked(data, max_pixels, label)
    check_aspect(opened, label)
    check("decode")
    try:
        reduced = _decode_reduced(pre, opened, check)
    except ImageLoadError:
        raise
    except Exception as err:  # Pillow's decoders raise many types for corrupt data
        opened.close()
        raise ImageLoadError(f"{label}: cannot be decoded ({type(err).__name__}: {err})") from None
    if reduced is None:  # no reduction: exactly the path of pre(open_rgb(...))
        rgb = decode_rgb(opened, label)
        check("resize")
        return pre(rgb)
    rgb, size, box = reduced
    check("resize")
    return model_input(pre, rgb, size, box)


def _decode_reduced(
    pre: Preprocessor, image: Image.Image, check: Callable[[str], None]
) -> tuple[Image.Image, tuple[int, int], Box] | None:
    """``(reduced RGB image, resized size, region of the image in it)`` for an image worth
    reducing (decoded and closed), else None (``image`` left as it is)."""
    method = orientation(image)
    swap = method in SWAPS_AXES
    width, height = image.size
    size = pre.resized_size(*((height, width) if swap else (width, height)))
    target = (size[1], size[0]) if swap else size  # in the stored orientation
    box: Box = (0.0, 0.0, float(width), float(height))
    need = (max(1, int(target[0] * REDUCING_GAP)), max(1, int(target[1] * REDUCING_GAP)))
    drafted = False
    if pre.interpolation == "nearest":
        return None
    if image.format == "JPEG" and min(width // need[0], height // need[1]) >= 2:
        done = image.draft(None, need)
        if done is not None:
            box, drafted = done[1], True
    factor = (max(1, int(box[2] / need[0])), max(1, int(box[3] / need[1])))
    if not drafted and factor == (1, 1):
        return None
    with image:
        image.load()
        check("reduce")
        rgb = reduced_rgb(image, factor) if factor != (1, 1) else to_rgb(image)
        if rgb is not image:
            image.close()
    fx, fy = factor
    box = (box[0] / fx, box[1] / fy, box[2] / fx, box[3] / fy)
    if method is not None:
        box = _transposed_box(box, rgb.size, method)
        rgb = rgb.transpose(method)
    return rgb, size, box


def _transposed_box(box: Box, size: tuple[int, int], method: Image.Transpose) -> Box:
    """Where region ``box`` of an image of ``size`` lands once the image is transposed."""
    w, h = size
    T = Image.Transpose
    move = {
        T.FLIP_LEFT_RIGHT: lambda x, y: (w - x, y),
        T.FLIP_TOP_BOTTOM: lambda x, y: (x, h - y),
        T.ROTATE_180: lambda x, y: (w - x, h - y),
        T.ROTATE_90: lambda x, y: (y, w - x),
        T.ROTATE_270: lambda x, y: (h - y, x),
        T.TRANSPOSE: lambda x, y: (y, x),
        T.TRANSVERSE: lambda x, y: (h - y, w - x),
    }[method]
    (ax, ay), (bx, by) = move(box[0], box[1]), move(box[2], box[3])
    return (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))
