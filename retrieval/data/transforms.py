"""Train and eval transforms built from a backbone's :class:`Preprocessing`."""

from __future__ import annotations

from collections.abc import Sequence

from torchvision import transforms as T

from retrieval.models.backbone import Preprocessing

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
    "nearest": T.InterpolationMode.NEAREST,
}


def _interpolation(pre: Preprocessing) -> T.InterpolationMode:
    return _INTERPOLATION.get(pre.interpolation, T.InterpolationMode.BILINEAR)


def eval_transform(pre: Preprocessing) -> T.Compose:
    """Resize the short side to ``input_size / crop_pct``, centre-crop ``input_size``, normalise."""
    resize = round(pre.input_size / pre.crop_pct)
    return T.Compose(
        [
            T.Resize(resize, interpolation=_interpolation(pre)),
            T.CenterCrop(pre.input_size),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def train_transform(
    pre: Preprocessing,
    scale: Sequence[float] = (0.25, 1.0),
    hflip: bool = True,
    color_jitter: float = 0.0,
) -> T.Compose:
    """Random resized crop to ``input_size`` (area fraction in ``scale``), optional horizontal
    flip and colour jitter, then the backbone's normalisation."""
    steps: list = [
        T.RandomResizedCrop(pre.input_size, scale=tuple(scale), interpolation=_interpolation(pre))
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    if color_jitter > 0:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    steps += [T.ToTensor(), T.Normalize(pre.mean, pre.std)]
    return T.Compose(steps)
