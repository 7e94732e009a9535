"""Evaluation preprocessing with Pillow and NumPy only (no torch), for serving a bundle.

:class:`Preprocessor` reproduces :func:`retrieval.data.transforms.eval_transform` exactly. With
``resize_mode="crop"`` the short side is resized to ``resize`` pixels (the long side to
``int(resize * long / short)``, as torchvision computes it) with Pillow's antialiased
``Image.resize`` and the centre ``input_size`` x ``input_size`` square is cropped (offsets
rounded half to even, as torchvision does); ``"squash"`` resizes the whole image to that square;
``"pad"`` resizes the long side to ``input_size`` (the short side to
``int(input_size * short / long)``, at least 1) and, after normalising, pads the short side with
zeros (the mean colour), centred; ``"short"`` resizes the short side to ``input_size`` and keeps
the aspect up to 2:1 (:func:`~retrieval.data.preprocessing.short_side_size`), so its output is
``(3, h, w)`` with ``min(h, w) == input_size``; ``"long"`` resizes the long side to
``input_size`` and keeps the aspect up to 2:1
(:func:`~retrieval.data.preprocessing.long_side_size`): ``max(h, w) == input_size``. Pixels
are scaled to [0, 1] and normalised with ``mean`` and ``std`` in float32.
:meth:`Preprocessor.prepare` decodes a file or encoded bytes straight to that input
(:mod:`retrieval.bundle.decode`); :func:`retrieval.data.images.open_rgb` opens one as an RGB
image with the same checks (pixel limit from the header before decoding, EXIF orientation);
``prepare`` also refuses an aspect ratio over
:data:`~retrieval.data.images.MAX_ASPECT_RATIO`. A ``crop`` resize that would make over
:data:`~retrieval.bundle.decode.RESIZE_PIXELS` pixels resizes only the square it keeps, within
a grey level of the whole resize.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from retrieval.bundle import decode
from retrieval.bundle.decode import FILTERS
from retrieval.data.images import DEFAULT_MAX_PIXELS, ImageInput
from retrieval.data.preprocessing import ANY_SIZE_MODES, RESIZE_MODES, kept_aspect_size
from retrieval.data.rgb import to_rgb
from retrieval.infra.checks import is_int, positive_int

if TYPE_CHECKING:
    from retrieval.data.preprocessing import Preprocessing

__all__ = ["Preprocessor"]

COLOR_MODES = ("RGB",)
#: the largest ``input_size`` a bundle may ask for: a (3, S, 2S) float32 input is 100 MB
MAX_INPUT_SIZE = 2048
OPTIONAL = {"color_mode": "RGB", "resize_mode": "crop"}  # absent from older bundles


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
class Preprocessor:
    """A PIL RGB image -> float32 array ``(3, input_size, input_size)``, normalised.

    Fields: ``input_size`` (side of the square output), ``resize`` (short side before cropping,
    at least ``input_size``; used by ``crop`` only), ``interpolation`` (``bilinear`` |
    ``bicubic`` | ``nearest``), ``mean`` / ``std`` (per channel, on the [0, 1] scale),
    ``color_mode`` (only ``RGB``) and ``resize_mode`` (``crop`` | ``squash`` | ``pad`` |
    ``short`` | ``long``, see the module doc). Every field is checked on construction; a bad
    one raises ValueError naming it.
    """

    input_size: int
    resize: int
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    color_mode: str = "RGB"
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        positive_int(self.input_size, "preprocessing field 'input_size'", maximum=MAX_INPUT_SIZE)
        most = 2 * self.input_size  # crop_pct >= 0.5
        if not is_int(self.resize) or not self.input_size <= self.resize <= most:
            rule = f"an integer from input_size ({self.input_size}) to twice it ({most})"
            raise _bad("resize", rule, self.resize)
        if self.interpolation not in FILTERS:
            raise _bad("interpolation", f"one of {sorted(FILTERS)}", self.interpolation)
        if self.color_mode not in COLOR_MODES:
            raise _bad("color_mode", f"one of {list(COLOR_MODES)}", self.color_mode)
        if self.resize_mode not in RESIZE_MODES:
            raise _bad("resize_mode", f"one of {list(RESIZE_MODES)}", self.resize_mode)
        object.__setattr__(self, "mean", _triple("mean", self.mean, positive=False))
        object.__setattr__(self, "std", _triple("std", self.std, positive=True))

    @classmethod
    def from_preprocessing(cls, pre: Preprocessing) -> Preprocessor:
        """The preprocessing ``eval_transform(pre)`` applies; like it, an interpolation other
        than bilinear / bicubic / nearest falls back to bilinear. ``resize`` is
        ``input_size`` unless ``pre.resize_mode`` is ``crop`` (nothing else is cropped)."""
        interpolation = pre.interpolation if pre.interpolation in FILTERS else "bilinear"
        crop = pre.resize_mode == "crop"
        return cls(
            input_size=int(pre.input_size),
            resize=round(pre.input_size / pre.crop_pct) if crop else int(pre.input_size),
            interpolation=interpolation,
            mean=tuple(pre.mean),  # type: ignore[arg-type]
            std=tuple(pre.std),  # type: ignore[arg-type]
            resize_mode=pre.resize_mode,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (tuples become lists); ``from_dict`` reads it back."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocessor:
        """Build from ``to_dict`` output. Raises ValueError naming missing, unknown or bad
        fields. ``color_mode`` and ``resize_mode`` may be absent (bundles written before them):
        ``RGB`` and ``crop``."""
        if not isinstance(data, Mapping):
            raise ValueError(
                f"preprocessing must be a mapping of fields, got {type(data).__name__}"
            )
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}; known fields: {names}")
        missing = [n for n in names if n not in data and n not in OPTIONAL]
        if missing:
            raise ValueError(f"preprocessing lacks the fields {missing}")
        return cls(**dict(data))

    @property
    def any_size(self) -> bool:
        """Whether inputs keep the image's aspect (``short``, ``long``): the model must then be
        exported for any height and width."""
        return self.resize_mode in ANY_SIZE_MODES

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
            raise TypeError(f"Preprocessor takes a PIL image, got {type(image).__name__}")
        rgb = image if image.mode == "RGB" else to_rgb(image)
        return decode.model_input(self, rgb, self.resized_size(*rgb.size))

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

        An image at least ``2 * REDUCING_GAP`` (:data:`retrieval.bundle.decode.REDUCING_GAP`)
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

        Whatever the image's shape, the memory is bounded by its pixels plus a fixed amount
        (:mod:`retrieval.bundle.decode`): an image whose long side is over
        :data:`~retrieval.data.images.MAX_ASPECT_RATIO` times its short side is refused from
        its header, and a ``crop`` of a long image resizes only the square it keeps.

        Raises:
            ImageLoadError: as :func:`~retrieval.data.images.open_rgb` (ImageTooLargeError
                over ``max_pixels``), and ImageShapeError over the aspect ratio limit.
            TypeError: ``source`` is neither a path, nor bytes, nor a binary file.
        """
        return decode.prepare(self, source, max_pixels, name, check)
