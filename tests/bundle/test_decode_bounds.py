"""Hostile shapes through Preprocessing.prepare, Preprocessing(image) and ``retrieval search``:
a shape beyond the aspect ratio limit is refused from its header, and a long image within it
costs its decode and a fixed amount, not a resize of all of it."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from retrieval.data import preprocessing as decode
from retrieval.data.images import ImageLoadError
from retrieval.data.preprocessing import Preprocessing
from tests.bundle.test_cli import run
from tests.data.test_preprocessing import (
    _images,
    _scene,
    decode_calls,  # noqa: F401 (a fixture)
)

HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
ROOT = Path(__file__).resolve().parents[2]


def thin_png(width: int, height: int) -> bytes:
    """A valid all-black bilevel PNG of ``width`` x ``height`` pixels, a few KB in bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    rows = (b"\x00" * (1 + (width + 7) // 8)) * height
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows, 9))
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b"")


@pytest.mark.usefixtures("decode_calls")  # any decode fails the test
@pytest.mark.parametrize("mode", ["crop", "squash", "pad", "short", "long"])
@pytest.mark.parametrize("shape", [(40, 1_000_000), (1, 4_000_000), (4_000_000, 1)])
def test_extreme_aspect_ratios_are_refused_from_the_header(
    shape: tuple[int, int], mode: str
) -> None:
    data = thin_png(*shape)
    assert len(data) < 100_000
    pre = Preprocessing(224, *HALF, "bicubic", resize_mode=mode)
    ratio = max(shape) // min(shape)
    refused = rf"^tall\.png: {shape[0]}x{shape[1]} .*aspect ratio.* {ratio}:1\b.*limit of 1000:1"
    with pytest.raises(ImageLoadError, match=refused):
        pre.prepare(data, max_pixels=50_000_000, name="tall.png")


_PEAK_SCRIPT = """
import sys
from retrieval.data.preprocessing import Preprocessing

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

pre = Preprocessing(224, (0.5,) * 3, (0.5,) * 3, sys.argv[1])
data = open(sys.argv[2], "rb").read()
before = status("VmRSS")
out = pre.prepare(data)
print(*out.shape, (status("VmHWM") - before) >> 20)
"""


def _peak(*argv: str) -> tuple[tuple[int, ...], int]:
    """(shape of the model input, MiB the process grew by making it) in a fresh process."""
    done = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    *shape, grown = (int(v) for v in done.stdout.split())
    return tuple(shape), grown


needs_proc = pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads /proc (Linux)"
)


@needs_proc
@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_a_crop_of_a_long_image_resizes_only_the_square_it_keeps(
    tmp_path: Path, interpolation: str
) -> None:
    """70 x 70,000 (at the aspect ratio limit): resizing all of it to a short side of 256
    makes 256 x 256,000 pixels (over 600 MiB with Pillow's first pass and NumPy's copy);
    the decode itself holds about 25 MiB."""
    path = tmp_path / "long.png"
    path.write_bytes(thin_png(70, 70_000))
    shape, grown = _peak(interpolation, str(path))
    assert shape == (3, 224, 224)
    assert grown < 100, f"{grown} MiB to make the model input of a 70 x 70,000 image"


def _grey_levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a - b) * 0.5 * 255  # std 0.5 on the [0, 1] scale


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_kept_square_is_within_a_grey_level_of_resizing_then_cropping(
    monkeypatch: pytest.MonkeyPatch, interpolation: str
) -> None:
    pre = Preprocessing(64, *HALF, interpolation, crop_pct=64 / 73)
    images = [*_images(), _scene(30, 2000, 14)]
    whole = [pre(image) for image in images]  # small: resized whole, then cropped
    monkeypatch.setattr(decode, "RESIZE_PIXELS", 0)  # every crop: the kept square only
    for image, expected in zip(images, whole, strict=True):
        got = pre(image)
        assert got.shape == expected.shape == (3, 64, 64)
        assert _grey_levels(got, expected).max() <= 1.01, image.size


def test_search_cli_refuses_an_extreme_image_in_one_line(
    capsys: pytest.CaptureFixture[str], bundle_copy: Path, tmp_path: Path
) -> None:
    query = tmp_path / "tall.png"
    query.write_bytes(thin_png(1, 4_000_000))
    code, out, err = run(capsys, "search", bundle_copy, query)
    assert code != 0 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "tall.png: 1x4000000" in lines[0] and "limit of 1000:1" in lines[0]
