"""Copy-detection edits: the strong, hand-made changes a copied image goes through (crops,
recompression, blur, rotation, colour changes, overlays, borders), for building benchmark
queries and for SSCD-style instance training.

``apply_edit(image, kind, rng)`` applies one named edit; :class:`CopyEditAugment` is the
training transform that applies a few random ones. Every edit takes an RGB image of any size
(other modes are converted to RGB first) and returns a new RGB image; all randomness comes
from the ``random.Random`` passed in. Images down to 1x1 pixel do not crash: sizes are
relative to the image with a floor of one pixel (a 1x1 image cannot be cropped and comes back
unchanged from ``crop``).

The drawn edits: coloured boxes, borders, text and pasted
sprites (emoji images or drawn shapes).

Every function takes an RGB image and a ``random.Random`` and returns a new RGB image of the
same size (a border grows the canvas); all randomness comes from that generator, so a seeded
generator gives identical pixels. Sizes are relative to the image, with a floor of one pixel,
so images down to 1x1 work (the overlay may then cover all of it or be clipped at the edges).
"""

from __future__ import annotations

import io
import math
import random
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from retrieval.data.images import images_in_folder
from retrieval.infra.checks import positive_int

Colour = tuple[int, int, int]


def random_colour(rng: random.Random) -> Colour:
    """A uniformly random RGB colour."""
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def _rect_of_area(rng: random.Random, size: tuple[int, int], area: float) -> list[int]:
    """``[x0, y0, x1, y1]`` of a rectangle of about ``area`` pixels (aspect 1:3..3:1, clipped
    to the image) at a random position fully inside the image."""
    width, height = size
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))
    w = min(width, max(1, round(math.sqrt(area * aspect))))
    h = min(height, max(1, round(area / w)))
    x0, y0 = rng.randint(0, width - w), rng.randint(0, height - h)
    return [x0, y0, x0 + w - 1, y0 + h - 1]


def draw_boxes(image: Image.Image, rng: random.Random) -> Image.Image:
    """1-4 filled rectangles of random colours, opaque or semi-transparent (alpha 110-220),
    that together cover about 10-35% of the image (less where they overlap)."""
    count = rng.randint(1, 4)
    total = rng.uniform(0.10, 0.35) * image.width * image.height
    weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
    canvas = image.convert("RGBA")
    for weight in weights:
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        alpha = 255 if rng.random() < 0.5 else rng.randint(110, 220)
        box = _rect_of_area(rng, canvas.size, total * weight / sum(weights))
        ImageDraw.Draw(layer).rectangle(box, fill=(*random_colour(rng), alpha))
        canvas = Image.alpha_composite(canvas, layer)
    return canvas.convert("RGB")


def add_border(image: Image.Image, rng: random.Random) -> Image.Image:
    """A solid band of 5-20% of the side (at least 1 px) on all four sides or on a random
    non-empty subset of them; the canvas grows, the image is kept whole."""
    sides = [True] * 4 if rng.random() < 0.5 else [False] * 4
    if not any(sides):
        for index in rng.sample(range(4), rng.randint(1, 3)):
            sides[index] = True
    lengths = (image.width, image.height, image.width, image.height)  # left, top, right, bottom
    band = tuple(
        max(1, round(rng.uniform(0.05, 0.20) * length)) if on else 0
        for on, length in zip(sides, lengths, strict=True)
    )
    return ImageOps.expand(image, border=band, fill=random_colour(rng))


def _random_word(rng: random.Random) -> str:
    letters = string.ascii_letters + string.digits
    return "".join(rng.choice(letters) for _ in range(rng.randint(3, 8)))


def draw_text(image: Image.Image, rng: random.Random) -> Image.Image:
    """2-5 lines of 1-4 random words, each line in its own colour and font size (6-18% of the
    image height, at least 6 px), Pillow's default font, starting in the upper-left part of
    the image; lines may run past the right or bottom edge and are clipped there."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    x = rng.randint(0, max(0, round(canvas.width * 0.4)))
    y = rng.randint(0, max(0, round(canvas.height * 0.4)))
    for _ in range(rng.randint(2, 5)):
        size = max(6, round(rng.uniform(0.06, 0.18) * canvas.height))
        font = ImageFont.load_default(size=size)
        line = " ".join(_random_word(rng) for _ in range(rng.randint(1, 4)))
        draw.text((x, y), line, fill=random_colour(rng), font=font)
        y += round(size * 1.2)
    return canvas


def _shape_sprite(rng: random.Random, side: int) -> Image.Image:
    """A ``side`` x ``side`` RGBA sprite holding one random ellipse or 3-8-sided polygon in a
    random colour on a transparent background."""
    sprite = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(sprite)
    fill = (*random_colour(rng), 255)
    if rng.random() < 0.5:
        draw.ellipse([0, 0, side - 1, side - 1], fill=fill)
    else:
        corners = rng.randint(3, 8)
        turn = rng.uniform(0, 2 * math.pi)
        half = (side - 1) / 2
        points = [
            (
                half + half * math.cos(turn + 2 * math.pi * i / corners),
                half + half * math.sin(turn + 2 * math.pi * i / corners),
            )
            for i in range(corners)
        ]
        draw.polygon(points, fill=fill)
    return sprite


def paste_overlays(
    image: Image.Image, rng: random.Random, overlays: Sequence[Image.Image] = ()
) -> Image.Image:
    """Alpha-composite 1-3 sprites onto the image, each scaled so its longer side is 15-45%
    of the image's shorter side (at least 1 px), at a random position fully inside the image.

    Sprites are drawn from ``overlays`` (any mode; converted to RGBA, so RGBA transparency is
    kept); with no overlays, random filled ellipses and polygons are drawn instead.
    """
    canvas = image.convert("RGBA")
    short = min(canvas.size)
    for _ in range(rng.randint(1, 3)):
        side = max(1, round(rng.uniform(0.15, 0.45) * short))
        if overlays:
            sprite = rng.choice(list(overlays)).convert("RGBA")
            scale = side / max(sprite.size)
            target = (max(1, round(sprite.width * scale)), max(1, round(sprite.height * scale)))
            sprite = sprite.resize(target, Image.Resampling.BILINEAR)
        else:
            sprite = _shape_sprite(rng, side)
        x = rng.randint(0, max(0, canvas.width - sprite.width))
        y = rng.randint(0, max(0, canvas.height - sprite.height))
        layer = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
        layer.paste(sprite, (x, y))
        canvas = Image.alpha_composite(canvas, layer)
    return canvas.convert("RGB")


EDIT_KINDS: tuple[str, ...] = (
    "crop",
    "jpeg",
    "blur",
    "rotate",
    "color",
    "grayscale",
    "mirror",
    "rescale",
    "boxes",
    "text",
    "emoji",
    "border",
    "combo",
)


SINGLE_KINDS: tuple[str, ...] = tuple(k for k in EDIT_KINDS if k != "combo")


CROP_AREA = (0.45, 0.80)


def _crop_size(rng: random.Random, width: int, height: int) -> tuple[int, int]:
    """Width and height of a crop keeping a fraction in ``CROP_AREA`` of the pixels, with a
    random aspect; the whole image when no integer size fits (1x1)."""
    low, high = CROP_AREA
    area = width * height
    fraction = rng.uniform(low, high)
    share = rng.random()  # how the area loss splits between width and height
    w = min(width, max(1, round(width * fraction**share)))
    h_low, h_high = math.ceil(low * area / w), min(height, math.floor(high * area / w))
    if h_low <= h_high:
        return w, min(h_high, max(h_low, round(height * fraction ** (1 - share))))
    fits = [
        (a, b)
        for a in range(1, width + 1)
        for b in range(1, height + 1)
        if low <= a * b / area <= high
    ]
    return min(fits, key=lambda s: abs(s[0] * s[1] / area - fraction)) if fits else (width, height)


def _crop(image: Image.Image, rng: random.Random) -> Image.Image:
    w, h = _crop_size(rng, image.width, image.height)
    x, y = rng.randint(0, image.width - w), rng.randint(0, image.height - h)
    return image.crop((x, y, x + w, y + h))


def _jpeg(image: Image.Image, rng: random.Random) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=rng.randint(8, 20))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def _blur(image: Image.Image, rng: random.Random) -> Image.Image:
    # sigma 0.5-1.5 % of the long side: hard, yet the picture stays recognisable
    radius = max(1.0, rng.uniform(0.005, 0.015) * max(image.size))
    return image.filter(ImageFilter.GaussianBlur(radius))


def _rotate(image: Image.Image, rng: random.Random) -> Image.Image:
    angle = rng.uniform(5, 25) * rng.choice((-1, 1))
    expand = rng.random() < 0.5
    fill = random_colour(rng)
    return image.rotate(angle, Image.Resampling.BILINEAR, expand=expand, fillcolor=fill)


def _color(image: Image.Image, rng: random.Random) -> Image.Image:
    """Hue shift by 15-85% of the colour circle, then strong saturation, contrast and
    brightness changes (each factor in 0.3-0.7 or 1.4-2.0)."""
    hue, sat, val = image.convert("HSV").split()
    shift = round(rng.uniform(0.15, 0.85) * 256)
    hue = hue.point(lambda v: (v + shift) % 256)
    edited = Image.merge("HSV", (hue, sat, val)).convert("RGB")
    for enhancer in (ImageEnhance.Color, ImageEnhance.Contrast, ImageEnhance.Brightness):
        factor = rng.uniform(0.3, 0.7) if rng.random() < 0.5 else rng.uniform(1.4, 2.0)
        edited = enhancer(edited).enhance(factor)
    return edited


def _grayscale(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def _mirror(image: Image.Image, rng: random.Random) -> Image.Image:
    return ImageOps.mirror(image)


def _rescale(image: Image.Image, rng: random.Random) -> Image.Image:
    factor = rng.uniform(0.15, 0.35)
    small = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    up = rng.choice((Image.Resampling.NEAREST, Image.Resampling.BILINEAR))
    return image.resize(small, Image.Resampling.BILINEAR).resize(image.size, up)


Edit = Callable[[Image.Image, random.Random], Image.Image]


_EDITS: dict[str, Edit] = {
    "crop": _crop,
    "jpeg": _jpeg,
    "blur": _blur,
    "rotate": _rotate,
    "color": _color,
    "grayscale": _grayscale,
    "mirror": _mirror,
    "rescale": _rescale,
    "boxes": draw_boxes,
    "text": draw_text,
    "border": add_border,
}


def apply_edit(
    image: Image.Image,
    kind: str,
    rng: random.Random,
    overlays: Sequence[Image.Image] = (),
) -> Image.Image:
    """Apply the edit ``kind`` (one of :data:`EDIT_KINDS`) and return a new RGB image.

    Same size as the input except ``crop`` (45-80% of the area kept, random aspect and
    position), ``rotate`` (canvas expanded in half of the draws, corners filled with a random
    solid colour) and ``border`` (canvas grows by 5-20% of the side on some or all sides).
    ``jpeg`` re-encodes at quality 8-20; ``blur`` is Gaussian with a radius of 0.5-1.5% of the
    longer side (at least 1 px); ``rescale`` goes down to 15-35% of the side and back;
    ``emoji`` pastes 1-3 of ``overlays`` (RGBA alpha-composited), or drawn shapes when there
    are none; ``combo`` applies three different other kinds in sequence. The result depends
    only on the image, ``kind``, ``overlays`` and the state of ``rng`` (which is advanced).

    Raises:
        ValueError: ``kind`` is not one of :data:`EDIT_KINDS`.
    """
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown copy edit {kind!r}; valid kinds: {', '.join(EDIT_KINDS)}")
    edited = image if image.mode == "RGB" else image.convert("RGB")
    if kind == "combo":
        for part in rng.sample(SINGLE_KINDS, 3):
            edited = apply_edit(edited, part, rng, overlays)
        return edited
    if kind == "emoji":
        return paste_overlays(edited, rng, overlays)
    return _EDITS[kind](edited, rng)


class CopyEditAugment:
    """Training transform (PIL RGB in, PIL RGB out): with probability ``p`` apply between
    ``num_edits[0]`` and ``num_edits[1]`` distinct random edits from :data:`EDIT_KINDS`
    (``combo`` excluded), in random order; otherwise return the image unchanged.

    Randomness comes from Python's global ``random`` state (seeded per DataLoader worker by
    PyTorch and Lightning) unless ``seed`` is given; then from the transform's own
    ``random.Random(seed)``, deterministic across calls but identical in every worker process
    it is copied to (use it for tests and benchmarks, not multi-worker training). The kinds
    used by the last call are in :attr:`last_kinds` (empty when no edit was applied).
    Picklable.
    """

    def __init__(
        self,
        overlays: Sequence[Image.Image] | None = None,
        num_edits: tuple[int, int] = (1, 3),
        p: float = 0.9,
        seed: int | None = None,
    ) -> None:
        low, high = num_edits
        if not 0 <= low <= high <= len(SINGLE_KINDS):
            raise ValueError(
                f"num_edits={tuple(num_edits)} must satisfy 0 <= low <= high <= {len(SINGLE_KINDS)}"
            )
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p={p} must be a probability in [0, 1]")
        self.overlays = list(overlays or ())
        self.num_edits, self.p = (low, high), p
        self._rng = random.Random(seed) if seed is not None else None
        self.last_kinds: tuple[str, ...] = ()

    def _generator(self) -> random.Random:
        return self._rng if self._rng is not None else random.Random(random.getrandbits(64))

    def choose(self, rng: random.Random) -> tuple[str, ...]:
        """The kinds one call applies, drawn from ``rng``: () with probability ``1 - p``."""
        if rng.random() >= self.p:
            return ()
        return tuple(rng.sample(SINGLE_KINDS, rng.randint(*self.num_edits)))

    def __call__(self, image: Image.Image) -> Image.Image:
        rng = self._generator()
        self.last_kinds = self.choose(rng)
        for kind in self.last_kinds:
            image = apply_edit(image, kind, rng, self.overlays)
        return image

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(overlays={len(self.overlays)}, "
            f"num_edits={self.num_edits}, p={self.p})"
        )


def load_overlays(folder: str | Path, limit: int = 256) -> list[Image.Image]:
    """The first ``limit`` images under ``folder`` (recursively, sorted by path) as fully
    loaded RGBA images, for the ``emoji`` edit.

    Raises:
        ValueError: ``folder`` is not a folder or holds no images (the message names it), or
            ``limit`` < 1.
    """
    positive_int(limit, "limit")
    paths = images_in_folder(folder, name=f"overlay folder {folder}")[:limit]
    overlays = []
    for path in paths:
        with Image.open(path) as opened:
            overlays.append(opened.convert("RGBA"))
    return overlays
