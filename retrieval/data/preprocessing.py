"""How images are prepared for a model: the square input size, normalisation, interpolation
and resize mode its pretrained weights expect (plain data, no torch)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

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


@dataclass(frozen=True)
class Preprocessing:
    """How images must be prepared for a backbone: read from its weights' config, never guessed.

    ``input_size`` is the square side in pixels. ``resize_mode`` says how evaluation makes an
    image that square: ``crop`` (the weights' own) resizes the short side to
    ``input_size / crop_pct`` and crops the centre; ``squash`` resizes the whole image to
    ``input_size`` x ``input_size`` without keeping its aspect ratio; ``pad`` resizes the long
    side to ``input_size`` and pads the short one, centred, with the normalisation mean colour;
    ``short`` resizes the short side to ``input_size`` and keeps the aspect (up to
    :data:`MAX_ASPECT`, see :func:`short_side_size`), and ``long`` resizes the long side to
    ``input_size`` and keeps the aspect (:func:`long_side_size`, the papers' "1024 px longest
    side" of Revisited Oxford and Paris), so inputs differ in shape and a model must take any
    size (CNNs). ``squash``, ``pad``, ``short`` and ``long`` cut nothing away, as copy
    detection needs (``crop_pct`` is unused).

    Raises:
        ValueError: ``resize_mode`` is not one of :data:`RESIZE_MODES`.
    """

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(
                f"preprocessing field 'resize_mode' must be one of {list(RESIZE_MODES)}, "
                f"got {self.resize_mode!r}"
            )

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
        """Whether inputs keep the image's aspect (differ in shape): :data:`ANY_SIZE_MODES`."""
        return self.resize_mode in ANY_SIZE_MODES

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
