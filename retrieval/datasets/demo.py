"""The built-in demo dataset, generated on first use into a folder with its manifest.

The images are drawn by :mod:`retrieval.datasets.demo`; their bytes depend only on (seed,
``DEMO_VERSION``), so every machine trains and validates on the same data.

Drawing of the demo dataset's images: object identities and cluttered scenes.

A label is an object identity (a shape, a texture, two colours and an optional attached marking).
Each of its images shows the object with a random pose, scale, position, colour jitter and
lighting on a cluttered background, with distractor objects, an occluder, blur and noise. Every
random draw comes from a ``numpy.random.default_rng`` seeded per (seed, label, index), drawing
uses Pillow only, and the trigonometry is rounded so that differences between maths libraries
cannot show.
"""

from __future__ import annotations

import colorsys
import contextlib
import csv
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_VERSION = 1  # bump when the generator's output changes


def _write_dataset(folder: Path, params: dict[str, int]) -> None:
    """Render every image into ``folder``, then write its manifest and finally its demo.json."""
    num_labels, seed, image_size = params["num_labels"], params["seed"], params["image_size"]
    rows = []
    for label in range(num_labels):
        name = f"obj_{label:0{max(3, len(str(num_labels - 1)))}d}"
        (folder / "images" / name).mkdir(parents=True)
        split = "train" if label < num_labels // 2 else "test"
        for index in range(params["images_per_label"]):
            path = f"images/{name}/{index:03d}.jpg"
            image = render_demo_image(seed, label, index, image_size)
            image.save(folder / path, format="JPEG", quality=90)
            rows.append((path, name, split))
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "label", "split"))
        writer.writerows(rows)
    (folder / "demo.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def _is_complete(root: Path, params: dict[str, int]) -> bool:
    """Whether ``root`` holds a finished demo dataset made with exactly ``params``."""
    try:
        found = json.loads((root / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(found == params and (root / "manifest.csv").is_file())


def _move_into_place(tmp: Path, root: Path, params: dict[str, int]) -> None:
    """Rename ``tmp`` to ``root``, replacing an outdated demo; keep a racing process's result."""
    if (root / "demo.json").is_file() and not _is_complete(root, params):
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(root, old / "demo")
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty, or it does not exist
        root.rmdir()
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_complete(root, params):
            raise


def prepare_demo(
    root: str | Path,
    num_labels: int = 120,
    images_per_label: int = 24,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Generate the demo dataset under ``root`` on first use and return its manifest CSV path.

    Layout: ``root/images/<label>/<index>.jpg`` and ``root/manifest.csv`` with columns
    ``path,label,split`` (paths relative to ``root``, labels like ``obj_007``). Labels are sorted;
    the first half (rounded down) forms split ``train`` and the rest split ``test``. A dataset
    whose ``demo.json`` matches the arguments and ``DEMO_VERSION`` is reused as is; a demo made
    with other arguments is replaced; a non-empty ``root`` without ``demo.json`` is refused. The
    dataset is written to a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a partial dataset at ``root``.
    """
    if num_labels < 2 or images_per_label < 1 or image_size < 16:
        raise ValueError("the demo needs num_labels >= 2, images_per_label >= 1, image_size >= 16")
    root = Path(root).expanduser().absolute()
    params = {
        "version": DEMO_VERSION,
        "num_labels": num_labels,
        "images_per_label": images_per_label,
        "image_size": image_size,
        "seed": seed,
    }
    if _is_complete(root, params):
        return root / "manifest.csv"
    foreign = not root.is_dir() or any(root.iterdir())
    if root.exists() and not (root / "demo.json").is_file() and foreign:
        raise FileExistsError(
            f"{root} exists and holds no demo dataset (no demo.json) and is not an empty "
            "folder; pass an empty or new folder for the demo dataset"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"generating the demo dataset ({num_labels * images_per_label} images) in {root} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)
        _write_dataset(tmp, params)
        _move_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "manifest.csv"


_SUPERSAMPLE = 2


_TEXTURES = ("solid", "stripes", "dots", "checker", "gradient", "rings")


_SHAPES = ("polygon", "star", "ellipse", "ring", "cross", "compound")


Polygon = list[tuple[float, float]]


Colour = tuple[float, float, float]


@dataclass(frozen=True)
class _Identity:
    """What stays fixed across the images of one label, in object coordinates (radius ~1)."""

    parts: tuple[tuple[Polygon, bool], ...]  # (polygon, True to add or False to cut a hole)
    texture: str
    texture_params: tuple[float, float]  # (angle, period)
    primary: Colour
    secondary: Colour
    mark: tuple[Polygon, Colour] | None


def _cos_sin(angle: float) -> tuple[float, float]:
    """Cosine and sine rounded to 6 decimals, identical whichever maths library computes them."""
    return round(math.cos(angle), 6), round(math.sin(angle), 6)


def _ngon(
    n: int,
    radii: list[float],
    sy: float = 1.0,
    phase: float = 0.0,
    dx: float = 0.0,
    dy: float = 0.0,
) -> Polygon:
    """A polygon with ``n`` vertices whose radii cycle through ``radii``."""
    points = []
    for k in range(n):
        c, s = _cos_sin(phase + 2 * math.pi * k / n)
        r = radii[k % len(radii)]
        points.append((dx + r * c, dy + sy * r * s))
    return points


def _primitive(rng: np.random.Generator, kind: str) -> list[tuple[Polygon, bool]]:
    """The polygons of one shape of the given kind, centred on the origin."""
    if kind == "polygon":
        return [(_ngon(int(rng.integers(3, 9)), [1.0], phase=rng.uniform(0, 1)), True)]
    if kind == "star":
        n = int(rng.integers(4, 9))
        return [(_ngon(2 * n, [1.0, rng.uniform(0.35, 0.65)]), True)]
    if kind == "ellipse":
        return [(_ngon(40, [1.0], sy=rng.uniform(0.35, 0.75)), True)]
    if kind == "ring":
        n = int(rng.choice([5, 6, 8, 40]))
        return [(_ngon(n, [1.0]), True), (_ngon(n, [rng.uniform(0.4, 0.65)]), False)]
    if kind == "cross":
        w, h = rng.uniform(0.2, 0.4), rng.uniform(0.7, 1.0)
        bar = [(-1.0, -w), (1.0, -w), (1.0, w), (-1.0, w)]
        return [(bar, True), ([(-w, -h), (w, -h), (w, h), (-w, h)], True)]
    kind_a, kind_b = rng.choice(_SHAPES[:5], size=2)  # compound: two parts side by side
    part_a, part_b = _primitive(rng, str(kind_a)), _primitive(rng, str(kind_b))
    scale_b, offset = rng.uniform(0.35, 0.6), rng.uniform(0.5, 0.8)
    moved_a = [([(0.6 * x - 0.35, 0.6 * y) for x, y in p], add) for p, add in part_a]
    moved_b = [([(scale_b * x + offset, scale_b * y) for x, y in p], add) for p, add in part_b]
    return moved_a + moved_b


def _colour(rng: np.random.Generator, hue: float | None = None) -> Colour:
    """A random fairly saturated RGB colour in [0, 255], optionally with a given hue."""
    h = rng.uniform(0, 1) if hue is None else hue % 1.0
    r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.45, 1.0), rng.uniform(0.45, 1.0))
    return 255 * r, 255 * g, 255 * b


def _make_identity(rng: np.random.Generator, shape: str, texture: str) -> _Identity:
    """Draw the fixed appearance of an object with the given shape kind and texture."""
    hue = rng.uniform(0, 1)
    mark = None
    if rng.uniform() < 0.7:
        n, size = int(rng.choice([3, 4, 40])), rng.uniform(0.18, 0.3)
        c, s = _cos_sin(rng.uniform(0, 2 * math.pi))
        r = rng.uniform(0.5, 0.9)
        mark = ([(r * c + x, r * s + y) for x, y in _ngon(n, [size])], _colour(rng))
    parts = tuple(_primitive(rng, shape))
    texture_params = (rng.uniform(0, math.pi), rng.uniform(0.25, 0.5))
    primary = _colour(rng, hue)
    secondary = _colour(rng, hue + rng.uniform(0.25, 0.75))
    return _Identity(parts, texture, texture_params, primary, secondary, mark)


def _identity(seed: int, label: int) -> _Identity:
    """The identity of ``label``; shape and texture kinds cycle so that both splits see all."""
    shape = _SHAPES[label % len(_SHAPES)]
    texture = _TEXTURES[(label // len(_SHAPES) + label) % len(_TEXTURES)]
    return _make_identity(np.random.default_rng([seed, 1, label]), shape, texture)


def _texture(ident: _Identity, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Primary-colour weight in [0, 1] of the identity's texture at object coordinates (u, v)."""
    c, s = _cos_sin(ident.texture_params[0])
    period = ident.texture_params[1]
    if ident.texture == "stripes":
        weight = (u * c + v * s) / period % 1.0 < 0.5
    elif ident.texture == "dots":
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        weight = du * du + dv * dv > 0.09
    elif ident.texture == "checker":
        weight = (np.floor(u / period) + np.floor(v / period)) % 2
    elif ident.texture == "gradient":
        weight = np.clip((u * c + v * s + 1.0) / 2.0, 0.0, 1.0)
    elif ident.texture == "rings":
        weight = np.sqrt(u * u + v * v) / period % 1.0 < 0.5
    else:
        weight = np.ones_like(u)
    return np.asarray(weight, dtype=np.float32)


def _paint(canvas: Image.Image, ident: _Identity, pose: tuple[float, ...], jitter: Any) -> None:
    """Draw ``ident`` at pose (cx, cy, scale, angle) onto ``canvas``, colours shifted by jitter."""
    cx, cy, scale, angle = pose
    c, s = _cos_sin(angle)

    def place(poly: Polygon) -> Polygon:
        return [(cx + scale * (c * x - s * y), cy + scale * (s * x + c * y)) for x, y in poly]

    mask = Image.new("L", canvas.size, 0)
    draw = ImageDraw.Draw(mask)
    for poly, add in ident.parts:
        draw.polygon(place(poly), fill=255 if add else 0)
    box = mask.getbbox()
    if box is None:
        return
    dx = np.arange(box[0], box[2], dtype=np.float32)[None, :] - np.float32(cx)
    dy = np.arange(box[1], box[3], dtype=np.float32)[:, None] - np.float32(cy)
    weight = _texture(ident, (dx * c + dy * s) / scale, (dy * c - dx * s) / scale)[..., None]
    primary = np.asarray(ident.primary, dtype=np.float32) + jitter
    secondary = np.asarray(ident.secondary, dtype=np.float32) + jitter
    colour = np.clip(secondary + weight * (primary - secondary) + 0.5, 0, 255).astype(np.uint8)
    canvas.paste(Image.fromarray(colour, "RGB"), box, mask.crop(box))
    if ident.mark is not None:
        fill = np.clip(np.asarray(ident.mark[1], dtype=np.float32) + jitter + 0.5, 0, 255)
        ImageDraw.Draw(canvas).polygon(place(ident.mark[0]), fill=tuple(int(t) for t in fill))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Low-frequency colour noise with random clutter strokes, discs and triangles."""
    lowres = rng.uniform(0, 255, size=(3, 3, 3)).astype(np.uint8)
    base = Image.fromarray(lowres, "RGB").resize((size, size), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0, x1, y1 = (float(t) for t in rng.uniform(-0.1, 1.1, size=4) * size)
        fill = tuple(int(t) for t in rng.integers(0, 256, size=3))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            draw.line([(x0, y0), (x1, y1)], fill=fill, width=int(rng.integers(2, size // 12)))
        elif kind == 1:
            r = rng.uniform(0.03, 0.12) * size
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=fill)
        else:
            draw.polygon(_ngon(3, [rng.uniform(0.05, 0.15) * size], dx=x0, dy=y0), fill=fill)
    return base


def render_demo_image(seed: int, label: int, index: int, image_size: int = 128) -> Image.Image:
    """Render image ``index`` of ``label``: the label's object on a random cluttered scene."""
    rng = np.random.default_rng([seed, 2, label, index])
    size = image_size * _SUPERSAMPLE
    canvas = _background(rng, size)
    for _ in range(int(rng.integers(0, 3))):  # small distractor objects
        other = _make_identity(rng, str(rng.choice(_SHAPES)), str(rng.choice(_TEXTURES)))
        pose = (*rng.uniform(0, size, size=2), rng.uniform(0.08, 0.2) * size, rng.uniform(0, 6.3))
        _paint(canvas, other, pose, 0.0)
    scale = rng.uniform(0.45, 0.9) * size / 2
    centre = size / 2 + rng.uniform(-0.25, 0.25, size=2) * size
    jitter = rng.normal(0.0, 10.0, size=3).astype(np.float32)
    _paint(canvas, _identity(seed, label), (*centre, scale, rng.uniform(0, 2 * math.pi)), jitter)
    if rng.uniform() < 0.5:  # an occluder near the object
        occluder = _make_identity(rng, str(rng.choice(_SHAPES[:3])), "solid")
        pose = (*(centre + rng.normal(0, 0.6, size=2) * scale), 0.4 * scale, rng.uniform(0, 6.3))
        _paint(canvas, occluder, pose, 0.0)
    image = canvas.reduce(_SUPERSAMPLE).filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.2)))
    ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
    light = rng.uniform(0.65, 1.25) + rng.uniform(-0.3, 0.3) * ramp[None, :, None]
    noise = rng.normal(0.0, rng.uniform(0.0, 8.0), size=(image_size, image_size, 3))
    pixels = np.asarray(image, dtype=np.float32) * light + noise.astype(np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")
