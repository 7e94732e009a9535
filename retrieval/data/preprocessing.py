"""How images are prepared for a model, for training, export and serving alike: one
:class:`Preprocessing` (the square input size, normalisation, interpolation and resize mode a
model's weights expect, read from its weights' config and never guessed) and its Pillow and
NumPy pipeline (no torch), which serving uses. :func:`retrieval.data.transforms.eval_transform`
is the same preprocessing in torchvision, tested equal.

Resize modes: ``crop`` (the weights' own) resizes the short side to ``resize`` =
``round(input_size / crop_pct)`` pixels (the long side to ``int(resize * long / short)``, as
torchvision computes it) with Pillow's antialiased ``Image.resize`` and cuts out the centre
``input_size`` square (offsets rounded half to even, as torchvision does); ``squash`` resizes the
whole image to that square without keeping its aspect; ``pad`` resizes the long side to
``input_size`` (the short side to ``int(input_size * short / long)``, at least 1) and, after
normalising, pads the short side with zeros (the mean colour), centred; ``short`` resizes the
short side to ``input_size`` and keeps the aspect up to :data:`MAX_ASPECT`
(:func:`short_side_size`), so the input is ``(3, h, w)`` with ``min(h, w) == input_size``;
``long`` resizes the long side to ``input_size`` and keeps the aspect
(:func:`long_side_size`, the papers' "1024 px longest side"): ``max(h, w) == input_size``.
``short`` and ``long`` make inputs of different shapes, so the model must take any size (CNNs);
all modes but ``crop`` cut nothing away, as copy detection needs. Pixels are scaled to [0, 1]
and normalised with ``mean`` and ``std`` in float32.

:meth:`Preprocessing.prepare` decodes a file or encoded bytes straight to that input
(:func:`prepare_source`, a large image at a reduced scale), with the checks of
:func:`retrieval.data.images.open_rgb` (pixel limit from the header before decoding, EXIF
orientation), and refuses an aspect ratio over :data:`~retrieval.data.images.MAX_ASPECT_RATIO`.

Memory, whatever the image's shape: :func:`prepare_source` refuses from the header an image over
the pixel limit or over the aspect ratio limit; the decode then holds the image (and a reduced
or converted copy), and the resize makes at most about :data:`RESIZE_PIXELS` pixels more:
``crop`` resizes only the square it keeps once resizing the whole image would make more;
``squash``, ``pad``, ``short`` and ``long`` make at most ``2 * side**2`` pixels, plus Pillow's
first pass over an image already reduced to a few times that size.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from retrieval.data.images import (
    DEFAULT_MAX_PIXELS,
    SWAPS_AXES,
    ImageInput,
    ImageLoadError,
    check_aspect,
    decode_rgb,
    image_source,
    open_checked,
    orientation,
    reduced_rgb,
    to_rgb,
)
from retrieval.infra.checks import is_int, positive_int

RESIZE_MODES = ("crop", "squash", "pad", "short", "long")
#: the modes that keep an image's aspect, so that inputs differ in shape and the model must be
#: exported for any height and width (``model.json``'s ``any_size``)
ANY_SIZE_MODES = ("short", "long")
#: ``short`` and ``long`` keep an image's aspect up to this ratio of its long side to its short
#: side; beyond it the short side is stretched (bounds the pixels a panorama or a strip costs,
#: and keeps a strip wide enough for a CNN's strides)
MAX_ASPECT = 2.0


def short_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """``(width, height)`` of an image resized by ``resize_mode=short``: the short side becomes
    ``side``, the long side keeps the aspect (rounded, at least ``side``) up to
    ``MAX_ASPECT * side``. A square image gives ``(side, side)``; 400 x 300 at 224 gives
    299 x 224; 1000 x 100 gives 448 x 224."""
    longest = int(MAX_ASPECT * side)
    if width >= height:
        return min(longest, max(side, round(side * width / max(height, 1)))), side
    return side, min(longest, max(side, round(side * height / max(width, 1))))


def long_side_size(width: int, height: int, side: int) -> tuple[int, int]:
    """``(width, height)`` of an image resized by ``resize_mode=long`` (the instance-retrieval
    papers' "1024 px longest side"): the long side becomes ``side``, the short side keeps the
    aspect (rounded, at most ``side``) down to ``side / MAX_ASPECT``. A square image gives
    ``(side, side)``; 1600 x 1200 at 1024 gives 1024 x 768; 1000 x 100 at 224 gives
    224 x 112."""
    shortest = math.ceil(side / MAX_ASPECT)
    if width >= height:
        return side, min(side, max(shortest, round(side * height / max(width, 1))))
    return min(side, max(shortest, round(side * width / max(height, 1)))), side


def kept_aspect_size(width: int, height: int, side: int, mode: str) -> tuple[int, int]:
    """``(width, height)`` of an image resized by one of :data:`ANY_SIZE_MODES`:
    :func:`short_side_size` or :func:`long_side_size`."""
    if mode == "short":
        return short_side_size(width, height, side)
    if mode == "long":
        return long_side_size(width, height, side)
    raise ValueError(f"resize_mode {mode!r} does not keep the aspect; {list(ANY_SIZE_MODES)} do")


#: the interpolations a model's input may be resized with, as Pillow's filters (torchvision's
#: modes of the same names)
FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}
INTERPOLATIONS = tuple(FILTERS)
#: the largest ``input_size`` there may be: a (3, S, 2S) float32 input is 100 MB
MAX_INPUT_SIZE = 2048
#: the fields of a bundle's ``preprocessing.json`` (:meth:`Preprocessing.to_json`), in order
JSON_FIELDS = ("input_size", "resize", "interpolation", "mean", "std", "color_mode", "resize_mode")
#: ``preprocessing.json`` fields that bundles written before them lack, and their values
JSON_OPTIONAL = {"color_mode": "RGB", "resize_mode": "crop"}


def _bad(field: str, rule: str, value: Any) -> ValueError:
    return ValueError(f"preprocessing field '{field}' must be {rule}, got {value!r}")


def _triple(field: str, value: Any, positive: bool) -> tuple[float, float, float]:
    rule = "3 positive finite numbers" if positive else "3 finite numbers"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or len(value) != 3:
        raise _bad(field, rule, value)
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
        raise _bad(field, rule, value)
    out = tuple(float(v) for v in value)
    if not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise _bad(field, rule, value)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model: a PIL image -> float32 ``(3, input_size,
    input_size)`` (``short`` and ``long``: ``(3, h, w)``), normalised.

    Fields: ``input_size`` (side of the square input, 1 to :data:`MAX_INPUT_SIZE`), ``mean`` /
    ``std`` (per channel, on the [0, 1] scale), ``interpolation`` (one of
    :data:`INTERPOLATIONS`), ``crop_pct`` (``crop`` only: the share of the resized short side
    kept, 0.5 to 1) and ``resize_mode`` (one of :data:`RESIZE_MODES`, see the module doc).
    Every field is checked on construction; a bad one raises ValueError naming it.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        positive_int(self.input_size, "preprocessing field 'input_size'", maximum=MAX_INPUT_SIZE)
        if self.interpolation not in INTERPOLATIONS:
            raise _bad("interpolation", f"one of {list(INTERPOLATIONS)}", self.interpolation)
        pct = self.crop_pct
        if isinstance(pct, bool) or not isinstance(pct, int | float) or not 0.5 <= pct <= 1:
            raise _bad("crop_pct", "a number from 0.5 to 1", pct)
        if self.resize_mode not in RESIZE_MODES:
            raise _bad("resize_mode", f"one of {list(RESIZE_MODES)}", self.resize_mode)
        object.__setattr__(self, "crop_pct", float(pct))
        object.__setattr__(self, "mean", _triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _triple("std", self.std, positive=True))

    def with_size(self, input_size: int | None, resize_mode: str | None = None) -> Preprocessing:
        """The same preprocessing at another input size and resize mode (``None`` keeps each)."""
        changes: dict[str, Any] = {}
        if input_size is not None:
            changes["input_size"] = int(input_size)
        if resize_mode is not None:
            changes["resize_mode"] = str(resize_mode)
        return replace(self, **changes) if changes else self

    @property
    def any_size(self) -> bool:
        """Whether inputs keep the image's aspect (differ in shape): :data:`ANY_SIZE_MODES`.
        The model must then be exported for any height and width."""
        return self.resize_mode in ANY_SIZE_MODES

    @property
    def resize(self) -> int:
        """The short side before cropping under ``crop`` (``round(input_size / crop_pct)``, as
        torchvision's eval transform computes it); ``input_size`` under the other modes."""
        if self.resize_mode != "crop":
            return self.input_size
        return round(self.input_size / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        """The fields (what model fingerprints and descriptions record)."""
        return asdict(self)

    def to_json(self) -> dict[str, Any]:
        """A bundle's ``preprocessing.json``: :data:`JSON_FIELDS`, the resize in pixels (lists
        for tuples); :meth:`from_json` reads it back."""
        return {
            "input_size": self.input_size,
            "resize": self.resize,
            "interpolation": self.interpolation,
            "mean": list(self.mean),
            "std": list(self.std),
            "color_mode": "RGB",
            "resize_mode": self.resize_mode,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Preprocessing:
        """Read :meth:`to_json`'s fields. ``color_mode`` and ``resize_mode`` may be absent
        (bundles written before them: ``RGB`` and ``crop``). Raises ValueError naming missing,
        unknown or bad fields (``resize``: an integer from ``input_size`` to twice it)."""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"preprocessing must be a mapping of fields, got {type(data).__name__}"
            )
        unknown = sorted(set(data) - set(JSON_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown preprocessing fields {unknown}; known fields: {list(JSON_FIELDS)}"
            )
        missing = [n for n in JSON_FIELDS if n not in data and n not in JSON_OPTIONAL]
        if missing:
            raise ValueError(f"preprocessing lacks the fields {missing}")
        fields = {**JSON_OPTIONAL, **data}
        if fields["color_mode"] != "RGB":
            raise _bad("color_mode", "one of ['RGB']", fields["color_mode"])
        side, resize = fields["input_size"], fields["resize"]
        positive_int(side, "preprocessing field 'input_size'", maximum=MAX_INPUT_SIZE)
        if not is_int(resize) or not side <= resize <= 2 * side:
            rule = f"an integer from input_size ({side}) to twice it ({2 * side})"
            raise _bad("resize", rule, resize)
        return cls(
            input_size=side,
            mean=fields["mean"],
            std=fields["std"],
            interpolation=fields["interpolation"],
            crop_pct=side / resize,
            resize_mode=fields["resize_mode"],
        )

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a ``width`` x ``height`` image once resized, before it is cropped
        (``crop``: short side to ``resize``, as torchvision does) or padded (``pad``: long side
        to ``input_size``); ``squash``: ``(input_size, input_size)``; ``short`` and ``long``:
        :func:`~retrieval.data.preprocessing.kept_aspect_size`."""
        side = self.input_size
        if self.resize_mode == "squash":
            return side, side
        if self.any_size:
            return kept_aspect_size(width, height, side, self.resize_mode)
        if self.resize_mode == "pad":
            if width >= height:
                return side, max(1, int(side * height / width))
            return max(1, int(side * width / height)), side
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def __call__(self, image: Image.Image) -> np.ndarray:
        """``image`` (any mode; non-RGB is converted like
        :func:`~retrieval.data.images.open_rgb` does) -> ``(3, input_size, input_size)``
        float32 (``short`` and ``long``: ``(3, h, w)``, see :meth:`resized_size`)."""
        if not isinstance(image, Image.Image):
            raise TypeError(f"Preprocessing takes a PIL image, got {type(image).__name__}")
        rgb = image if image.mode == "RGB" else to_rgb(image)
        return model_input(self, rgb, self.resized_size(*rgb.size))

    def batch(self, images: Sequence[Image.Image]) -> np.ndarray:
        """``B`` images -> ``(B, 3, input_size, input_size)`` float32; ``B`` may be 0. Under
        ``short`` and ``long`` the images must come out in one shape (ValueError otherwise):
        :meth:`Runtime.embed_many <retrieval.bundle.runtime.Runtime.embed_many>` embeds a mix."""
        if len(images) == 0:
            return np.zeros((0, 3, self.input_size, self.input_size), dtype=np.float32)
        return np.stack([self(image) for image in images])

    def prepare(
        self,
        source: ImageInput,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        name: str | None = None,
        check: Callable[[str], None] | None = None,
    ) -> np.ndarray:
        """Decode a file, encoded bytes or a binary file straight to the model input,
        ``(3, S, S)`` float32, with the checks of :func:`~retrieval.data.images.open_rgb`,
        keeping only what the model needs in memory.

        An image at least ``2 * REDUCING_GAP`` (:data:`REDUCING_GAP`)
        times larger than its resized size is decoded at a reduced scale: a JPEG by its
        decoder (``draft``: 1/2, 1/4 or 1/8), any image by averaging ``f`` x ``f`` blocks
        (``Image.reduce``, strip by strip, alpha composited onto white first), always to at
        least ``REDUCING_GAP`` times the resized size; the antialiased resize then covers the
        same region of the image. Memory: the decoded image and small strips, never a
        converted full-size copy. The result differs from ``self(open_rgb(source))`` by at
        most a few grey levels at some pixels (tests bound it); smaller images take exactly
        that path and give the same array, as do all images with ``nearest`` interpolation
        (which picks pixels; averaging would change it). ``check(stage)`` is called between
        stages (``decode``, ``reduce``, ``resize``) and may raise to abandon the work.

        Memory: the image's pixels plus a fixed amount, whatever its shape (the module doc).

        Raises:
            ImageLoadError: as :func:`~retrieval.data.images.open_rgb` (ImageTooLargeError
                over ``max_pixels``), and ImageShapeError over the aspect ratio limit.
            TypeError: ``source`` is neither a path, nor bytes, nor a binary file.
        """
        return prepare_source(self, source, max_pixels, name, check)


#: :func:`prepare_source` first reduces an image by an integer factor when it stays at least this
#: many times larger than its resized size (as ``Image.resize(reducing_gap=...)``)
REDUCING_GAP = 3.0


#: A ``crop`` resize that would make more pixels than this resizes only the square it keeps
#: (``Image.resize(box=...)``): within a grey level of resizing the whole image and cropping
#: it, as torchvision does and as smaller resizes still do (at a short side of 256, images up
#: to 1:64)
RESIZE_PIXELS = 1 << 22


Box = tuple[float, float, float, float]


def model_input(
    pre: Preprocessing, rgb: Image.Image, size: tuple[int, int], box: Box | None = None
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


def prepare_source(
    pre: Preprocessing,
    source: ImageInput,
    max_pixels: int,
    name: str | None = None,
    check: Callable[[str], None] | None = None,
) -> np.ndarray:
    """The body of :meth:`Preprocessing.prepare`
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
    pre: Preprocessing, image: Image.Image, check: Callable[[str], None]
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
