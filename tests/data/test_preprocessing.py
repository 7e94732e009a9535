"""Tests for retrieval.data.preprocessing: the one Preprocessing type, its NumPy pipeline's parity
with eval_transform, its bundle file form, and safe image opening."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFile, ImageFilter

from retrieval.data.images import ImageLoadError
from retrieval.data.images import open_rgb as open_image
from retrieval.data.preprocessing import RESIZE_MODES, Preprocessing
from retrieval.data.transforms import eval_transform
from retrieval.datasets.demo import render_demo_image

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
PREPROCESSINGS = [
    Preprocessing(64, *IMAGENET, interpolation="bilinear", crop_pct=0.875),
    Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.95),
    Preprocessing(48, *IMAGENET, interpolation="bicubic", crop_pct=1.0),
    Preprocessing(40, *IMAGENET, interpolation="nearest", crop_pct=0.9),
]


def _scene(width: int, height: int, seed: int) -> Image.Image:
    """Noise, a gradient and a few filled shapes: high and low frequencies, like a photo."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    noise = rng.normal(0, 40, (height, width, 3))
    pixels = np.clip(ramp * rng.uniform(0.3, 1.0, 3) + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(1))
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, 2).tolist())
        y0, y1 = sorted(rng.integers(0, height, 2).tolist())
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour, outline=(0, 0, 0))
    return image


def _images() -> list[Image.Image]:
    """Real-looking images of many sizes and aspect ratios (down- and upscaled by Resize)."""
    demo = [render_demo_image(seed=0, label=label, index=1, image_size=128) for label in range(3)]
    return [
        *demo,
        demo[0].resize((200, 150)),
        _scene(97, 203, 1),
        _scene(640, 480, 2),
        _scene(300, 300, 3),
        _scene(50, 40, 4),
        _scene(1001, 333, 5),
        _scene(225, 224, 6),
        _scene(7, 300, 11),
        _scene(2000, 3, 12),
    ]


WHOLE_IMAGE = [
    Preprocessing(37, *IMAGENET, interpolation="bilinear", resize_mode="squash"),
    Preprocessing(64, *IMAGENET, interpolation="bicubic", crop_pct=0.95, resize_mode="squash"),
    Preprocessing(40, *IMAGENET, interpolation="nearest", resize_mode="squash"),
    Preprocessing(37, *IMAGENET, interpolation="bilinear", resize_mode="pad"),
    Preprocessing(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), interpolation="bicubic", resize_mode="pad"),
    Preprocessing(41, *IMAGENET, interpolation="nearest", resize_mode="pad"),
]


@pytest.mark.parametrize(
    "pre",
    PREPROCESSINGS + WHOLE_IMAGE,
    ids=lambda p: f"{p.resize_mode}-{p.interpolation}{p.input_size}",
)
def test_matches_eval_transform(pre: Preprocessing) -> None:
    reference = eval_transform(pre)
    for image in _images():
        expected = reference(image).numpy()
        got = pre(image)
        side = pre.input_size
        assert got.dtype == np.float32 and got.shape == expected.shape == (3, side, side)
        assert np.abs(got - expected).max() <= 1e-5, image.size


def _framed(width: int, height: int) -> Image.Image:
    """A grey picture in a 10-pixel pure red frame: what a cropping resize cuts away."""
    image = Image.new("RGB", (width, height), (255, 0, 0))
    ImageDraw.Draw(image).rectangle((10, 10, width - 11, height - 11), fill=(128, 128, 128))
    return image


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_only_crop_cuts_the_frame_away(mode: str) -> None:
    pre = Preprocessing(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), crop_pct=0.8, resize_mode=mode)
    out = pre(_framed(120, 80))
    red = np.array([1.0, -1.0, -1.0], dtype=np.float32)  # (255, 0, 0) normalised
    picture = out[:, 16, :]  # the middle row, left to right
    columns = [c for c in range(out.shape[2]) if np.abs(picture[:, c]).max() > 0]
    first, last = picture[:, columns[0]], picture[:, columns[-1]]
    framed = bool(np.allclose(first, red, atol=0.05) and np.allclose(last, red, atol=0.05))
    assert framed == (mode != "crop")


def test_pad_centres_the_image_on_the_mean_colour() -> None:
    mean = (0.25, 0.5, 0.75)
    pre = Preprocessing(33, mean, (0.2, 0.2, 0.2), resize_mode="pad")
    out = pre(Image.new("RGB", (99, 30), (255, 255, 255)))
    # 99 x 30 -> 33 x 10: 23 rows of padding, 11 above and 12 below
    assert (out[:, :11] == 0).all() and (out[:, 21:] == 0).all()
    white = (1 - np.asarray(mean, dtype=np.float32)) / np.float32(0.2)
    np.testing.assert_allclose(out[:, 11:21], np.broadcast_to(white[:, None, None], (3, 10, 33)))
    tall = pre(Image.new("RGB", (1, 500), (255, 255, 255)))
    assert (tall[:, :, :16] == 0).all() and (tall[:, :, 17:] == 0).all()  # at least 1 column
    assert (tall[:, :, 16] != 0).all()


def test_crop_is_still_resize_then_centre_crop() -> None:
    from torchvision import transforms as T

    pre = Preprocessing(45, *IMAGENET, interpolation="bicubic", crop_pct=0.9)
    assert pre.resize_mode == "crop"
    explicit = T.Compose(
        [
            T.Resize(50, interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(45),
            T.ToTensor(),
            T.Normalize(*IMAGENET),
        ]
    )
    for image in _images():
        np.testing.assert_array_equal(eval_transform(pre)(image).numpy(), explicit(image).numpy())


def test_with_size_keeps_or_changes_the_resize_mode() -> None:
    pre = PREPROCESSINGS[0]
    assert pre.with_size(None) is pre and pre.with_size(None, None) is pre
    squash = pre.with_size(32, "squash")
    assert (squash.input_size, squash.resize_mode, squash.crop_pct) == (32, "squash", 0.875)
    assert squash.with_size(48).resize_mode == "squash"
    assert squash.to_dict()["resize_mode"] == "squash"
    with pytest.raises(ValueError, match=r"field 'resize_mode' must be one of \['crop', 'squash'"):
        pre.with_size(None, "stretch")
    with pytest.raises(ValueError, match="'resize_mode'.*'fill'"):
        Preprocessing(32, *IMAGENET, resize_mode="fill")


def test_non_rgb_images_are_converted_like_the_loader() -> None:
    pre = PREPROCESSINGS[0]
    rgb = _scene(90, 70, 7)
    grey = rgb.convert("L")
    np.testing.assert_array_equal(pre(grey), pre(grey.convert("RGB")))
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)  # fully transparent: composited onto white
    np.testing.assert_allclose(pre(rgba), pre(Image.new("RGB", (90, 70), "white")), atol=1e-6)


def test_batch_stacks_and_accepts_none() -> None:
    pre = PREPROCESSINGS[0]
    images = _images()[:3]
    batch = pre.batch(images)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[1], pre(images[1]))
    empty = pre.batch([])
    assert empty.shape == (0, 3, 64, 64) and empty.dtype == np.float32


def test_bundle_json_round_trip() -> None:
    pre = PREPROCESSINGS[1]
    assert (pre.input_size, pre.resize, pre.interpolation) == (224, 236, "bicubic")
    data = json.loads(json.dumps(pre.to_json()))
    assert data == {
        "input_size": 224,
        "resize": 236,
        "interpolation": "bicubic",
        "mean": [0.5, 0.5, 0.5],
        "std": [0.5, 0.5, 0.5],
        "color_mode": "RGB",
        "resize_mode": "crop",
    }
    read = Preprocessing.from_json(data)
    assert read.to_json() == data and read.crop_pct == pytest.approx(224 / 236)
    del data["color_mode"]  # optional: RGB
    assert Preprocessing.from_json(data).to_json() == read.to_json()
    image = _scene(300, 200, 3)
    np.testing.assert_array_equal(read(image), pre(image))
    squash = pre.with_size(None, "squash")
    assert (squash.resize, squash.resize_mode) == (224, "squash")  # nothing is cropped
    back = Preprocessing.from_json(json.loads(json.dumps(squash.to_json())))
    np.testing.assert_array_equal(back(image), squash(image))


def test_preprocessing_json_written_before_resize_mode_loads_as_crop() -> None:
    old = {k: v for k, v in GOOD.items()}  # the fields bundles stored before resize_mode
    assert "resize_mode" not in old
    pre = Preprocessing.from_json(old)
    assert pre.resize_mode == "crop"
    image = _scene(90, 60, 13)
    reference = Preprocessing(32, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), crop_pct=32 / 36)
    np.testing.assert_allclose(pre(image), eval_transform(reference)(image).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"crop_pct": 0.4}, "crop_pct"),
        ({"crop_pct": 1.01}, "crop_pct"),
        ({"crop_pct": "0.9"}, "crop_pct"),
        ({"input_size": 4096}, "input_size"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
    ],
)
def test_preprocessing_names_the_bad_field(change: dict[str, Any], field: str) -> None:
    fields = {"input_size": 32, "mean": IMAGENET[0], "std": IMAGENET[1], **change}
    with pytest.raises(ValueError, match=f"field '{field}'"):
        Preprocessing(**fields)


def test_a_weights_training_only_interpolation_evaluates_bilinearly() -> None:
    from retrieval.models.backbone import _evaluation_filter

    assert _evaluation_filter("random") == "bilinear"
    assert _evaluation_filter("bicubic") == "bicubic"


GOOD: dict[str, Any] = {
    "input_size": 32,
    "resize": 36,
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.25, 0.25, 0.25],
}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"input_size": 0}, "input_size"),
        ({"input_size": 32.0}, "input_size"),
        ({"input_size": True}, "input_size"),
        ({"resize": 31}, "resize"),
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"mean": "abc"}, "mean"),
        ({"mean": [0.5, float("nan"), 0.5]}, "mean"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"std": [0.2, "x", 0.2]}, "std"),
        ({"color_mode": "BGR"}, "color_mode"),
        ({"resize_mode": "stretch"}, "resize_mode"),
        ({"resize_mode": None}, "resize_mode"),
    ],
)
def test_from_json_names_the_bad_field(change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"field '{field}'"):
        Preprocessing.from_json({**GOOD, **change})


def test_from_json_names_missing_and_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"lacks the fields \['resize'\]"):
        Preprocessing.from_json({k: v for k, v in GOOD.items() if k != "resize"})
    with pytest.raises(ValueError, match=r"unknown preprocessing fields \['crop_pct'\]"):
        Preprocessing.from_json({**GOOD, "crop_pct": 0.9})
    with pytest.raises(ValueError, match="mapping"):
        Preprocessing.from_json([1, 2])  # type: ignore[arg-type]


# ---------------------------------------------------------------- open_image


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _png_bomb(side: int) -> bytes:
    """A valid all-black bilevel PNG of side x side pixels, small in bytes."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
    return png + _png_chunk(b"IEND", b"")


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every attempt to decode pixel data."""
    calls: list[str] = []

    def refuse(self: ImageFile.ImageFile) -> None:
        calls.append(str(self.size))
        raise RuntimeError("decoding refused by the test")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    return calls


def test_open_image_bytes_equals_path(tmp_path: Path) -> None:
    data = _encode(_scene(120, 80, 9), "JPEG", quality=90)
    path = tmp_path / "scene.jpg"
    path.write_bytes(data)
    from_bytes, from_path = open_image(data), open_image(path)
    assert from_bytes.mode == "RGB" and from_bytes.size == (120, 80)
    np.testing.assert_array_equal(np.asarray(from_bytes), np.asarray(from_path))
    np.testing.assert_array_equal(np.asarray(open_image(str(path))), np.asarray(from_path))
    np.testing.assert_array_equal(np.asarray(open_image(bytearray(data))), np.asarray(from_path))


def test_open_image_applies_exif_and_converts_to_rgb() -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert open_image(_encode(image, "JPEG", exif=exif.tobytes())).size == (20, 40)
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    opened = open_image(_encode(rgba, "PNG"))
    assert opened.mode == "RGB" and opened.getpixel((0, 0)) == (255, 255, 255)
    assert open_image(_encode(Image.new("L", (5, 5), 7), "PNG")).getpixel((2, 2)) == (7, 7, 7)


def test_decompression_bomb_is_refused_before_decoding(decode_calls: list[str]) -> None:
    bomb = _png_bomb(20_000)
    assert len(bomb) < 200_000
    with pytest.raises(ImageLoadError, match=r"bomb\.png: over Pillow's pixel limit"):
        open_image(bomb, name="bomb.png")
    with pytest.raises(ImageLoadError, match=r"3000x3000 = 9000000 pixels is over the limit"):
        open_image(_png_bomb(3000), max_pixels=1_000_000)
    assert decode_calls == []
    with pytest.raises(ImageLoadError, match="decoding refused"):
        open_image(_png_bomb(1000), max_pixels=1_000_000)  # at the limit: decoding is attempted
    assert decode_calls == ["(1000, 1000)"]


def test_truncated_jpeg_is_refused(tmp_path: Path) -> None:
    data = _encode(_scene(200, 150, 10), "JPEG", quality=90)
    with pytest.raises(ImageLoadError, match=r"upload\.jpg: cannot be decoded"):
        open_image(data[: len(data) // 2], name="upload.jpg")
    path = tmp_path / "cut.jpg"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError, match="cut.jpg"):
        open_image(path)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty"),
        (b"%PDF-1.4 definitely not an image" * 10, "not an image format"),
        (
            _png_bomb(8)[:33] + _png_chunk(b"IDAT", b"not zlib") + _png_chunk(b"IEND", b""),
            "cannot be decoded",
        ),
    ],
    ids=["empty", "text", "broken-png"],
)
def test_non_image_bytes_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ImageLoadError, match=f"<{len(data)} bytes>: {reason}"):
        open_image(data)


def test_open_image_rejects_other_types() -> None:
    with pytest.raises(TypeError, match="path or bytes"):
        open_image(12)  # type: ignore[arg-type]


def test_preprocessing_module_does_not_import_torch() -> None:
    code = (
        "import sys, retrieval.data.preprocessing; "
        "assert 'torch' not in sys.modules and 'torchvision' not in sys.modules, 'torch imported'"
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("as_bytes", [True, False], ids=["bytes", "path"])
def test_pixel_limit_is_its_own_error_for_files_and_bytes(tmp_path: Path, as_bytes: bool) -> None:
    from retrieval.data.images import ImageTooLargeError

    path = tmp_path / "wide.png"
    Image.new("RGB", (300, 200)).save(path)
    source = path.read_bytes() if as_bytes else path
    with pytest.raises(ImageTooLargeError, match="60000 pixels is over the limit of 59999"):
        open_image(source, max_pixels=59_999)
    assert open_image(source, max_pixels=60_000).size == (300, 200)
