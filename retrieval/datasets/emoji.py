"""``data=emoji``: a real cross-style retrieval benchmark from openly licensed emoji sets.

The label of an image is its emoji (the code-point sequence, upper-case hex joined by ``-``,
variation selectors ``FE0F`` dropped so that every set spells it the same way); every style
draws every label once. Evaluation is leave-one-out: an emoji drawn in one style must find the
same emoji drawn in the other styles. Labels are split zero-shot with a seed, half train, half
test.

Skin-tone variants are dropped: they repeat their base emoji's drawing with another skin colour,
so within one style they would be near-exact copies, and relevant pairs would be found by
matching one style's drawing instead of across styles. Gendered ZWJ sequences (``man
running``, ``woman running``: ``200D`` with ``2640`` or ``2642``) are dropped for the same reason:
they differ from the gender-neutral emoji, which is kept, by small details some sets do not draw.

``scripts/get_emoji.sh DIR`` unpacks the npm packages into ``DIR/packages/<name>/package/``;
:func:`prepare_emoji` rasterises them (RGB on white) into ``DIR/images/<style>/<label>.png``
and writes ``DIR/manifest.csv`` with the extra columns ``style`` and ``category``.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image

from retrieval.data.manifest import ManifestError, ManifestRow, write_manifest

EMOJI_VERSION = 1  # bump when the rendering or the selection changes
DEFAULT_STYLES = ("noto", "twemoji", "openmoji", "fluent_flat")
_FIX = "run `bash scripts/get_emoji.sh DIR` (see data/README.md, section emoji)"
_TONES = ("-light", "-medium-light", "-medium", "-medium-dark", "-dark")

Sources = dict[str, Path]  # label -> image file (PNG or SVG)


def code_label(hexcode: str) -> str:
    """``"1f3f3-fe0f-200d-1f308"`` -> ``"1F3F3-200D-1F308"``."""
    return "-".join(p for p in hexcode.upper().split("-") if p and p != "FE0F")


def is_gendered(label: str) -> bool:
    """A ZWJ sequence with a female or male sign (``man running``, ``woman running``)."""
    parts = label.split("-")
    return "200D" in parts and ("2640" in parts or "2642" in parts)


def _package(root: Path, name: str, inner: str) -> Path:
    """``root/packages/<name>/package/<inner>``, or an error naming the package and the fix."""
    path = root / "packages" / name / "package" / inner
    if not path.exists():
        raise ManifestError(f"emoji: package '{name}' not found: expected {path}; {_FIX}")
    return path


def _read_json(path: Path, name: str) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ManifestError(
            f"emoji: {path} of package '{name}' is unreadable ({err}); {_FIX}"
        ) from None
    if not isinstance(data, list) or not all(isinstance(e, dict) for e in data):
        raise ManifestError(f"emoji: {path} of package '{name}' is not a list of emoji; {_FIX}")
    return data


def _datasource(root: Path, vendor: str) -> Sources:
    """emoji-datasource-<vendor>: ``emoji.json`` lists base emoji (skin tones nested apart)."""
    name = f"emoji-datasource-{vendor}"
    folder = _package(root, name, f"img/{vendor}/64")
    out: Sources = {}
    for entry in _read_json(_package(root, name, "emoji.json"), name):
        try:
            if entry.get(f"has_img_{vendor}") and (folder / entry["image"]).is_file():
                out[code_label(entry["unified"])] = folder / entry["image"]
        except (KeyError, TypeError, AttributeError):
            raise ManifestError(
                f"emoji: an entry of {name}/package/emoji.json lacks 'unified' or 'image' "
                f"({str(entry)[:80]}); {_FIX}"
            ) from None
    return out


def _openmoji_entries(root: Path) -> list[dict]:
    entries = _read_json(_package(root, "openmoji", "data/openmoji.json"), "openmoji")
    if entries and not {"hexcode", "annotation", "skintone"} <= set(entries[0]):
        raise ManifestError(
            f"emoji: openmoji/package/data/openmoji.json lacks hexcode/annotation/skintone; {_FIX}"
        )
    return [e for e in entries if not e["skintone"]]


def _openmoji(root: Path, variant: str) -> Sources:
    folder = _package(root, "openmoji", f"{variant}/svg")
    found = {
        code_label(e["hexcode"]): folder / f"{e['hexcode']}.svg" for e in _openmoji_entries(root)
    }
    return {label: path for label, path in found.items() if path.is_file()}


def _slug(name: str) -> str:
    """CLDR name -> Fluent file stem: ``"one o’clock"`` -> ``"one-oclock"``."""
    name = name.lower().replace("’", "").replace("'", "")
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def _fluent(root: Path, variant: str) -> Sources:
    """fluentui-emoji names files by CLDR name (``icons/<variant>/<name>.svg``); toned emoji
    have ``-default`` and per-tone files. Names are mapped to code points via OpenMoji's table."""
    folder = _package(root, "fluentui-emoji", f"icons/{variant}")
    codes: dict[str, str] = {}
    for entry in _openmoji_entries(root):
        codes.setdefault(_slug(entry["annotation"]), code_label(entry["hexcode"]))
    out: Sources = {}
    for path in sorted(folder.glob("*.svg")):
        stem = path.stem
        if stem.endswith(_TONES):
            continue
        stem = stem.removesuffix("-default")
        if stem in codes:
            out.setdefault(codes[stem], path)
    return out


STYLES: dict[str, Callable[[Path], Sources]] = {
    "noto": lambda root: _datasource(root, "google"),
    "twemoji": lambda root: _datasource(root, "twitter"),
    "openmoji": lambda root: _openmoji(root, "color"),
    "openmoji_black": lambda root: _openmoji(root, "black"),
    "fluent_flat": lambda root: _fluent(root, "flat"),
    "fluent_modern": lambda root: _fluent(root, "modern"),
    "fluent_contrast": lambda root: _fluent(root, "high-contrast"),
}


def rasterise(source: Path, size: int) -> Image.Image:
    """A PNG or SVG emoji as an RGB image on white; SVGs are drawn at ``size`` x ``size``."""
    if source.suffix.lower() == ".svg":
        import resvg_py  # only needed to draw the SVG styles

        try:
            png = resvg_py.svg_to_bytes(svg_path=str(source), width=size, height=size)
        except ValueError as err:
            raise ManifestError(f"emoji: cannot draw {source} ({err})") from None
        image = Image.open(io.BytesIO(bytes(png)))
    else:
        image = Image.open(source)
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def select_labels(sources: dict[str, Sources]) -> list[str]:
    """Labels every style draws, gendered variants dropped, sorted."""
    common = set.intersection(*(set(s) for s in sources.values()))
    return sorted(label for label in common if not is_gendered(label))


def split_labels(labels: Sequence[str], test_fraction: float, seed: int) -> dict[str, str]:
    """Seeded zero-shot split: ``label -> "train" | "test"``."""
    order = sorted(labels)
    random.Random(seed).shuffle(order)
    num_train = round(len(order) * (1 - test_fraction))
    return {label: "train" if i < num_train else "test" for i, label in enumerate(order)}


def _categories(root: Path) -> dict[str, str]:
    path = root / "packages" / "emoji-datasource-google" / "package" / "emoji.json"
    if not path.is_file():
        return {}
    entries = _read_json(path, "emoji-datasource-google")
    return {code_label(e["unified"]): str(e.get("category", "")) for e in entries if "unified" in e}


def prepare_emoji(
    root: str | Path,
    styles: Sequence[str] = DEFAULT_STYLES,
    render_size: int = 128,
    test_fraction: float = 0.5,
    seed: int = 0,
) -> Path:
    """Rasterise the emoji sets under ``root`` (once) and return ``root/manifest.csv``.

    Args:
        root: the folder ``scripts/get_emoji.sh`` filled (``root/packages/...``).
        styles: at least two of :data:`STYLES`; every kept label is drawn in each.
        render_size: pixel side SVG styles are drawn at (PNG styles keep their 64 px).
        test_fraction: share of labels in split ``test``.
    A dataset whose ``emoji.json`` matches the arguments is reused; otherwise the images are
    drawn into a temporary folder that replaces ``root/images`` only when complete.
    Raises ManifestError naming the package, the expected path and the fix.
    """
    base = Path(root).expanduser().absolute()
    unknown = sorted(set(styles) - set(STYLES))
    if unknown or len(set(styles)) < 2:
        raise ManifestError(
            f"emoji: styles must be at least two of {sorted(STYLES)}, got {list(styles)}"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ManifestError(f"emoji: test_fraction must be in (0, 1), got {test_fraction}")
    params = {
        "version": EMOJI_VERSION,
        "styles": list(styles),
        "render_size": render_size,
        "test_fraction": test_fraction,
        "seed": seed,
    }
    manifest, stamp = base / "manifest.csv", base / "emoji.json"
    if manifest.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == params:
        return manifest
    sources = {style: STYLES[style](base) for style in styles}
    labels = select_labels(sources)
    if len(labels) < 4:
        raise ManifestError(f"emoji: only {len(labels)} emoji are drawn by every style; {_FIX}")
    split = split_labels(labels, test_fraction, seed)
    category = _categories(base)
    print(f"emoji: drawing {len(labels)} emoji x {len(styles)} styles into {base / 'images'} ...")
    tmp = Path(tempfile.mkdtemp(prefix=".images.tmp-", dir=base))
    rows = []
    try:
        for style in styles:
            (tmp / style).mkdir()
            for label in labels:
                rasterise(sources[style][label], render_size).save(tmp / style / f"{label}.png")
                extra = {"style": style, "category": category.get(label, "")}
                path = base / "images" / style / f"{label}.png"
                rows.append(ManifestRow(path, label, split[label], extra=extra))
        shutil.rmtree(base / "images", ignore_errors=True)
        tmp.rename(base / "images")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_manifest(rows, manifest, root=base)
    stamp.write_text(json.dumps(params) + "\n", encoding="utf-8")
    return manifest
