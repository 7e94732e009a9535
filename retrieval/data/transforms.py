"""Train and eval transforms built from a backbone's :class:`Preprocessing`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as F

from retrieval.data.copy_edits import CopyEditAugment, load_overlays
from retrieval.data.preprocessing import Preprocessing, kept_aspect_size


def _interpolation(pre: Preprocessing) -> T.InterpolationMode:
    """torchvision's mode of ``pre.interpolation`` (one of the same names)."""
    return T.InterpolationMode(pre.interpolation)


class FitLongSide:
    """Resize a PIL image so that its long side is ``size`` pixels, keeping its aspect ratio:
    the short side becomes ``int(size * short / long)``, at least 1."""

    def __init__(self, size: int, interpolation: T.InterpolationMode) -> None:
        self.size, self.interpolation = size, interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        side = self.size
        if width >= height:
            new_w, new_h = side, max(1, int(side * height / width))
        else:
            new_w, new_h = max(1, int(side * width / height)), side
        return F.resize(image, [new_h, new_w], interpolation=self.interpolation)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


class ResizeKeepAspect:
    """Resize a PIL image as ``resize_mode=short`` or ``long`` does
    (:func:`~retrieval.data.preprocessing.kept_aspect_size`): the short or the long side to
    ``size``, aspect kept up to 2:1. :meth:`output_size` says the ``(height, width)`` it will
    produce for an image of a given size, which batching by shape needs before loading."""

    def __init__(self, size: int, interpolation: T.InterpolationMode, mode: str = "short") -> None:
        kept_aspect_size(1, 1, 1, mode)  # ValueError for a mode that does not keep the aspect
        self.size, self.interpolation, self.mode = size, interpolation, mode

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        new_w, new_h = kept_aspect_size(width, height, self.size, self.mode)
        return new_h, new_w

    def __call__(self, image: Image.Image) -> Image.Image:
        size = list(self.output_size(*image.size))
        return F.resize(image, size, interpolation=self.interpolation)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value}, "
            f"mode={self.mode})"
        )


class PadToSquare:
    """Pad a normalised ``(C, h, w)`` tensor with zeros (the mean colour) to ``(C, size, size)``,
    centred: the extra column or row of an odd margin goes right or bottom."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        height, width = pixels.shape[-2:]
        top, left = (self.size - height) // 2, (self.size - width) // 2
        margins = [left, top, self.size - width - left, self.size - height - top]
        return F.pad(pixels, margins, fill=0.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(size={self.size})"


def eval_transform(pre: Preprocessing) -> T.Compose:
    """``pre.resize_mode`` to an ``input_size`` square, then normalise. ``crop``: resize the
    short side to ``input_size / crop_pct`` and centre-crop; ``squash``: resize the whole image
    to ``input_size`` x ``input_size``; ``pad``: :class:`FitLongSide`, then :class:`PadToSquare`
    after normalising; ``short`` and ``long``: :class:`ResizeKeepAspect` (the output is not
    square). Images
    are resized by Pillow (antialiased) in every mode."""
    side, interpolation = pre.input_size, _interpolation(pre)
    normalise = [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    if pre.any_size:
        return T.Compose([ResizeKeepAspect(side, interpolation, pre.resize_mode), *normalise])
    if pre.resize_mode == "squash":
        return T.Compose([T.Resize((side, side), interpolation=interpolation), *normalise])
    if pre.resize_mode == "pad":
        return T.Compose([FitLongSide(side, interpolation), *normalise, PadToSquare(side)])
    resize = round(pre.input_size / pre.crop_pct)
    return T.Compose(
        [
            T.Resize(resize, interpolation=interpolation),
            T.CenterCrop(pre.input_size),
            *normalise,
        ]
    )


class _ShrinkTo:
    """Downscale a PIL image so its long side is at most ``side`` (smaller ones unchanged)."""

    def __init__(self, side: int) -> None:
        self.side = side

    def __call__(self, image: Image.Image) -> Image.Image:
        if max(image.size) <= self.side:
            return image
        shrunk = image.copy()
        shrunk.thumbnail((self.side, self.side), Image.Resampling.BILINEAR)
        return shrunk


def anchor_transform(pre: Preprocessing) -> T.Compose:
    """The plain view of an image in instance training with an anchor view: the whole image
    but for a light random crop (70-100% of the area, aspect 3:4 to 4:3), as the originals a
    copy is searched among look; then the backbone's normalisation."""
    crop = T.RandomResizedCrop(
        pre.input_size, scale=(0.7, 1.0), ratio=(0.75, 4 / 3), interpolation=_interpolation(pre)
    )
    return T.Compose(
        [_ShrinkTo(2 * pre.input_size), crop, T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    )


AUGMENTS = ("standard", "copydetect")
_DEFAULT_SCALE = {"standard": (0.25, 1.0), "copydetect": (0.3, 1.0)}


def train_transform(
    pre: Preprocessing,
    scale: Sequence[float] | None = None,
    hflip: bool = True,
    color_jitter: float = 0.0,
    augment: str = "standard",
    overlay_dir: str | Path | None = None,
    num_edits: Sequence[int] = (1, 3),
    edit_p: float = 0.9,
) -> T.Compose:
    """Random resized crop to ``input_size`` (area fraction in ``scale``), optional horizontal
    flip and colour jitter, then the backbone's normalisation.

    ``augment="copydetect"`` (SSCD-style instance training) first applies
    :class:`~retrieval.data.copy_edits.CopyEditAugment` to the PIL image, so borders, text and
    overlays are cropped with the picture, and uses a gentler crop. ``scale`` defaults to
    (0.25, 1.0) for ``standard`` and (0.3, 1.0) for ``copydetect``. ``overlay_dir`` (copydetect
    only) is a folder of RGBA images (emoji PNGs) pasted by the ``emoji`` edit; without it the
    edit draws shapes; ``num_edits``: how many edits a view gets (fewest, most), with
    probability ``edit_p`` (else none). Raises
    ValueError for another ``augment``, or ``overlay_dir`` with ``standard``.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"augment={augment!r} is not one of {', '.join(AUGMENTS)}")
    if overlay_dir is not None and augment != "copydetect":
        raise ValueError(
            f"overlay_dir={overlay_dir} is used only by augment=copydetect (got {augment!r}); "
            "drop it or set augment=copydetect"
        )
    steps: list = []
    if augment == "copydetect":
        overlays = load_overlays(overlay_dir) if overlay_dir is not None else None
        # edits drawn on a copy at twice the input size, not on a full-size photo: the same
        # picture for the model, at a fraction of the cost of blurring and encoding megapixels
        steps += [
            _ShrinkTo(2 * pre.input_size),
            CopyEditAugment(overlays, (num_edits[0], num_edits[1]), edit_p),
        ]
    area = tuple(scale) if scale is not None else _DEFAULT_SCALE[augment]
    steps.append(T.RandomResizedCrop(pre.input_size, scale=area, interpolation=_interpolation(pre)))
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)
