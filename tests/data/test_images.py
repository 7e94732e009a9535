"""Tests for retrieval.data.images with real image files built in tmp_path."""

from __future__ import annotations

import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from retrieval.data.images import (
    BadImage,
    ImageLoadError,
    find_unreadable,
    report_unreadable,
)
from retrieval.data.images import open_rgb as load_rgb


def _save(image: Image.Image, path: Path, **kwargs: Any) -> Path:
    image.save(path, **kwargs)
    return path


def _jpeg(path: Path, size: tuple[int, int] = (32, 24)) -> Path:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return _save(Image.fromarray(pixels), path, quality=90)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def _bilevel_png_bomb(path: Path, side: int) -> Path:
    """A valid all-black mode "1" PNG of side x side pixels that is small on disk."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data)
    path.write_bytes(png + _png_chunk(b"IEND", b""))
    return path


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every attempt to decode pixel data."""
    calls: list[str] = []

    def refuse(self: ImageFile.ImageFile) -> None:
        calls.append(str(self.filename))
        raise RuntimeError("decoding refused by the test")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    return calls


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(image, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    loaded = load_rgb(path)
    assert loaded.size == (20, 40)
    assert loaded.mode == "RGB"
    red_top, blue_bottom = loaded.getpixel((10, 2)), loaded.getpixel((10, 37))
    assert isinstance(red_top, tuple) and isinstance(blue_bottom, tuple)
    assert red_top[0] > 200 and red_top[2] < 50
    assert blue_bottom[2] > 200 and blue_bottom[0] < 50


@pytest.mark.parametrize(
    ("mode", "suffix", "color", "expected"),
    [
        ("L", ".png", 128, (128, 128, 128)),
        ("1", ".png", 1, (255, 255, 255)),
        ("CMYK", ".jpg", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", ".tif", (0, 255, 255, 0), (255, 0, 0)),
        ("YCbCr", ".jpg", (76, 85, 255), (254, 0, 0)),
        ("I", ".tif", 40000, (156, 156, 156)),
        ("F", ".tif", 100.0, (100, 100, 100)),
    ],
)
def test_modes_become_rgb(
    tmp_path: Path, mode: str, suffix: str, color: Any, expected: tuple[int, int, int]
) -> None:
    path = _save(Image.new(mode, (6, 5), color), tmp_path / f"img{suffix}")
    loaded = load_rgb(path)
    assert loaded.mode == "RGB"
    assert loaded.size == (6, 5)
    pixel = np.asarray(loaded)[2, 3].astype(int)
    assert np.abs(pixel - np.array(expected)).max() <= 3, pixel


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    pixels = np.asarray(load_rgb(path))
    assert pixels[0, :, 0].tolist() == [0, 128, 255]


def _white_where_transparent(image: Image.Image, path: Path, **kwargs: Any) -> None:
    loaded = load_rgb(_save(image, path, **kwargs))
    assert loaded.mode == "RGB"
    assert loaded.getpixel((0, 0)) == (255, 255, 255)  # fully transparent pixel
    assert loaded.getpixel((1, 0)) != (255, 255, 255)  # opaque pixel keeps its color


def test_rgba_and_la_are_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (2, 1), (200, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    _white_where_transparent(rgba, tmp_path / "rgba.png")
    la = Image.new("LA", (2, 1), (30, 255))
    la.putpixel((0, 0), (0, 0))
    _white_where_transparent(la, tmp_path / "la.png")


def test_palette_with_transparency_is_composited_on_white(tmp_path: Path) -> None:
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    palette.putpixel((0, 0), 0)
    _white_where_transparent(palette, tmp_path / "palette.png", transparency=0)
    _white_where_transparent(palette, tmp_path / "palette.gif", transparency=0)


@pytest.mark.parametrize(
    ("name", "make", "reason"),
    [
        ("empty.jpg", lambda p: p.write_bytes(b""), "empty"),
        ("text.jpg", lambda p: p.write_text("not an image"), "identify"),
        ("missing.jpg", lambda p: None, "No such file"),
        ("truncated.jpg", None, "decoded"),
    ],
)
def test_bad_files_raise_image_load_error(
    tmp_path: Path, name: str, make: Callable[[Path], object] | None, reason: str
) -> None:
    path = tmp_path / name
    if make is None:
        data = _jpeg(tmp_path / "full.jpg").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        make(path)
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert str(path) in str(info.value)
    assert reason in str(info.value)


def test_pixel_limit_is_checked_from_the_header(tmp_path: Path, decode_calls: list[str]) -> None:
    path = _save(Image.new("RGB", (10, 12)), tmp_path / "small.png")
    with pytest.raises(ImageLoadError, match=r"10x12 = 120 pixels.*limit of 119 pixels"):
        load_rgb(path, max_pixels=119)
    assert decode_calls == []
    with pytest.raises(ImageLoadError, match="decoding refused"):
        load_rgb(path, max_pixels=120)  # at the limit: accepted, so decoding is attempted
    assert decode_calls == [str(path)]


def test_header_only_bomb_is_rejected_without_decoding(
    tmp_path: Path, decode_calls: list[str]
) -> None:
    path = _bilevel_png_bomb(tmp_path / "bomb.png", 20_000)
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageLoadError) as info:
        load_rgb(path)
    assert str(path) in str(info.value) and "400000000 pixels" in str(info.value)
    [bad] = find_unreadable([path])
    assert bad.path == path and "pixel limit" in bad.reason
    assert decode_calls == []


def test_pillow_bomb_warning_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = _save(Image.new("RGB", (12, 12)), tmp_path / "warn.png")  # 144 pixels: a warning
    filters_before = list(warnings.filters)
    with pytest.raises(ImageLoadError, match="limit"):
        load_rgb(path, max_pixels=10**6)
    assert warnings.filters == filters_before


def test_find_unreadable_reports_bad_files_in_order(tmp_path: Path) -> None:
    good = _jpeg(tmp_path / "good.jpg")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "text.jpg"
    text.write_text("hello")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    png = bytearray(_save(Image.new("RGB", (8, 8), (1, 2, 3)), tmp_path / "ok.png").read_bytes())
    corrupt = tmp_path / "corrupt.png"
    png[png.index(b"IDAT") + 6] ^= 0xFF  # breaks the chunk checksum
    corrupt.write_bytes(bytes(png))
    big = _save(Image.new("L", (30, 30)), tmp_path / "big.png")
    missing = tmp_path / "missing.png"
    paths = [good, empty, text, tmp_path / "ok.png", truncated, corrupt, big, missing]
    bad = find_unreadable(paths, max_pixels=800, num_threads=3)
    assert [b.path for b in bad] == [empty, text, truncated, corrupt, big, missing]
    reasons = [b.reason for b in bad]
    assert "empty" in reasons[0]
    assert "identify" in reasons[1]
    assert "truncated" in reasons[2]
    assert "verification" in reasons[3]
    assert "30x30" in reasons[4] and "800" in reasons[4]
    assert "No such file" in reasons[5]


def test_find_unreadable_edge_cases(tmp_path: Path) -> None:
    assert find_unreadable([]) == []
    with pytest.raises(ValueError, match="num_threads"):
        find_unreadable([_jpeg(tmp_path / "a.jpg")], num_threads=0)


def _bad(n: int) -> list[BadImage]:
    return [BadImage(Path(f"/data/img{i}.jpg"), f"reason {i}") for i in range(n)]


def test_report_unreadable_strict_raises() -> None:
    with pytest.raises(ImageLoadError) as info:
        report_unreadable(_bad(7), total=50, strict=True, where="/data/m.csv")
    message = str(info.value)
    assert "7 of 50" in message and "/data/m.csv" in message
    assert "/data/img0.jpg (reason 0)" in message and "/data/img4.jpg" in message
    assert "/data/img5.jpg" not in message


def test_report_unreadable_warns_once() -> None:
    with pytest.warns(UserWarning) as record:
        report_unreadable(_bad(2), total=9, strict=False, where="/data/m.csv")
    assert len(record) == 1
    message = str(record[0].message)
    assert message.startswith("skipping 2 of 9 images in /data/m.csv that cannot be read")
    assert "/data/img1.jpg (reason 1)" in message
    assert "data.strict_images=true" in message


def test_report_unreadable_silent_when_nothing_is_bad() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report_unreadable([], total=9, strict=True, where="m.csv")
        report_unreadable([], total=9, strict=False, where="m.csv")


# Decoding straight to the model input (Preprocessing.prepare): large images are reduced first.

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture with shapes and a little noise, like a photo at that size."""
    from retrieval.datasets.demo import render_demo_image

    side = max(width, height)
    picture = render_demo_image(seed, 3, 2, image_size=min(side, 512)).resize(
        (width, height), Image.Resampling.BICUBIC
    )
    noise = np.random.default_rng(seed).integers(-12, 13, (height, width, 3))
    return Image.fromarray(np.clip(np.asarray(picture) + noise, 0, 255).astype(np.uint8))


def _encoded(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _pre(mode: str = "crop", interpolation: str = "bicubic") -> Any:
    from retrieval.data.preprocessing import Preprocessing

    return Preprocessing(64, *IMAGENET, interpolation, crop_pct=64 / 73, resize_mode=mode)


def _grey_levels(pre: Any, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| of two model inputs, in grey levels (0..255) of the image."""
    return np.abs(a - b) * np.asarray(pre.std, np.float32)[:, None, None] * 255


def _oriented(image: Image.Image, fmt: str, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encoded(image, fmt, exif=exif.tobytes(), **({"quality": 92} if fmt == "JPEG" else {}))


@pytest.mark.parametrize("mode", ["crop", "squash", "pad"])
def test_prepare_equals_the_full_decode_when_no_reduction_is_needed(mode: str) -> None:
    from retrieval.data.images import open_rgb as open_image

    pre = _pre(mode)
    rgba = _photo(300, 200).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((300, 200)))
    sources = [
        _encoded(_photo(380, 250), "JPEG", quality=90),  # under 2 x REDUCING_GAP x the size
        _encoded(rgba, "PNG"),
        _encoded(_photo(200, 300).convert("P"), "GIF"),
        _encoded(
            Image.fromarray((np.arange(200 * 250).reshape(200, 250) % 65536).astype(np.uint16)),
            "PNG",
        ),
        _oriented(_photo(320, 240), "JPEG", 6),
    ]
    for data in sources:
        np.testing.assert_array_equal(pre.prepare(data), pre(open_image(data)))
    nearest = _pre(mode, "nearest")  # never reduced, whatever the size
    big = _encoded(_photo(1200, 900), "JPEG", quality=90)
    np.testing.assert_array_equal(nearest.prepare(big), nearest(open_image(big)))


@pytest.mark.parametrize("mode", ["crop", "squash", "pad"])
@pytest.mark.parametrize("orientation", [1, 3, 6, 8, 5])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_prepare_of_large_images_is_within_a_few_grey_levels(
    mode: str, orientation: int, fmt: str
) -> None:
    """Reduced (JPEG: by its decoder; PNG: block averages), then resized as before: the
    documented tolerance is a mean under 0.5 and a maximum of 8 grey levels."""
    from retrieval.data.images import open_rgb as open_image

    pre = _pre(mode)
    data = _oriented(_photo(1300, 900, seed=orientation), fmt, orientation)
    diff = _grey_levels(pre, pre.prepare(data), pre(open_image(data)))
    assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_prepare_of_large_transparent_and_palette_images_is_within_a_few_grey_levels() -> None:
    from retrieval.data.images import open_rgb as open_image

    pre = _pre()
    rgba = _photo(1500, 1100).convert("RGBA")
    rgba.putalpha(Image.radial_gradient("L").resize((1500, 1100)))
    palette = _photo(1500, 1100).convert("P")
    deep = Image.fromarray(np.asarray(_photo(1500, 1100).convert("L"), np.uint16) * 257)
    for data in (
        _encoded(rgba, "PNG"),
        _encoded(palette, "PNG", transparency=3),
        _encoded(deep, "PNG"),
    ):
        diff = _grey_levels(pre, pre.prepare(data), pre(open_image(data)))
        assert diff.mean() < 0.5 and diff.max() <= 8, (diff.mean(), diff.max())


def test_strip_conversion_equals_converting_the_whole_image() -> None:
    """16-bit scaling is decided from the whole image, not per strip."""
    from retrieval.data.images import _to_rgb_whole
    from retrieval.data.images import to_rgb as _to_rgb

    values = np.zeros((1500, 1200), np.int32)
    values[-10:] = 60000  # only the last strip holds 16-bit values
    values[:10] = 200
    deep = Image.fromarray(values, mode="I")
    rgba = _photo(1200, 1500).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize((1200, 1500)))
    for image in (deep, rgba, _photo(1200, 1500).convert("P")):
        np.testing.assert_array_equal(np.asarray(_to_rgb(image)), np.asarray(_to_rgb_whole(image)))


_PEAK_SCRIPT = """
import sys
from pathlib import Path
from retrieval.data.preprocessing import Preprocessing
from retrieval.data.images import open_rgb as open_image

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

pre = Preprocessing(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
data = Path(sys.argv[1]).read_bytes()
before = status("VmRSS")
pre.prepare(data) if sys.argv[2] == "prepare" else pre(open_image(data))
print(status("VmHWM") - before)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
def test_decoding_a_large_rgba_png_holds_at_most_one_full_size_copy(tmp_path: Path) -> None:
    """Peak memory of one decode (a fresh process's high-water mark) of a 3000 x 3000 RGBA
    PNG, 4 bytes a pixel once decoded: the full decode holds it and one RGB copy (was 23
    bytes a pixel: RGBA, white, composite, RGB and an orientation copy); decoding straight
    to the model input holds it and small strips only."""
    import subprocess
    import sys

    side = 3000
    image = Image.new("RGBA", (side, side), (30, 120, 200, 128))
    image.paste((200, 40, 40, 255), (0, 0, side // 3, side // 3))
    path = _save(image, tmp_path / "big.png")
    pixels = side * side

    def peak(how: str) -> float:
        done = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(path), how],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
        )
        return (int(done.stdout.strip()) - strips) / pixels

    strips = 32 << 20  # a strip's conversion (4 MiB of pixels, a few copies) and the rest
    full, direct = peak("full"), peak("prepare")
    assert full <= 8.0, f"open_image: {full:.1f} bytes a pixel at its peak, beyond the strips"
    assert direct <= 4.0, f"Preprocessing.prepare: {direct:.1f} bytes a pixel beyond the strips"
