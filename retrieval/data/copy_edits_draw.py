"""Drawn edits for :mod:`retrieval.data.copy_edits`: coloured boxes, borders, text and pasted
sprites (emoji images or drawn shapes).

Every function takes an RGB image and a ``random.Random`` and returns a new RGB image of the
same size (a border grows the canvas); all randomness comes from that generator, so a seeded
generator gives identical pixels. Sizes are relative to the image, with a floor of one pixel,
so images down to 1x1 work (the overlay may then cover all of it or be clipped at the edges).
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

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
