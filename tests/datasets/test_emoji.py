"""Tests for retrieval.datasets.emoji on tiny fake npm package trees."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from retrieval.data.manifest import ManifestError, read_manifest
from retrieval.datasets.emoji import code_label, is_gendered, prepare_emoji, split_labels

# (hexcode as OpenMoji spells it, CLDR name, category)
EMOJI = [
    ("1F600", "grinning face", "Smileys & Emotion"),
    ("2764-FE0F", "red heart", "Smileys & Emotion"),
    ("1F552", "three o’clock", "Travel & Places"),
    ("1F415", "dog", "Animals & Nature"),
    ("1F34E", "red apple", "Food & Drink"),
    ("1F6B2", "bicycle", "Travel & Places"),
    ("1F3C3", "person running", "People & Body"),
    ("1F3C3-200D-2642-FE0F", "man running", "People & Body"),  # gendered: dropped
    ("1F4A1", "light bulb", "Objects"),
]
ONLY_NOTO = ("1F680", "rocket", "Travel & Places")  # not drawn by every style: dropped
SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32">'
    '<circle cx="16" cy="16" r="{r}" fill="#{color}"/></svg>'
)


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGBA", (64, 64), (seed * 37 % 255, 90, 200, 255)).save(path)


def _svg(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SVG.format(r=4 + seed % 12, color=f"{seed * 40 % 256:02x}4080"))


def _fake_packages(root: Path, tone_variants: bool = True) -> Path:
    """The four default packages with EMOJI (plus a skin-tone entry and a noto-only emoji)."""
    pkgs = root / "packages"
    for vendor in ("google", "twitter"):
        base = pkgs / f"emoji-datasource-{vendor}" / "package"
        entries = []
        emoji = EMOJI + [ONLY_NOTO] if vendor == "google" else EMOJI
        for i, (code, name, category) in enumerate(emoji):
            image = f"{code.lower()}.png"
            _png(base / "img" / vendor / "64" / image, i)
            entries.append(
                {
                    "unified": code,
                    "image": image,
                    "name": name.upper(),
                    "category": category,
                    f"has_img_{vendor}": True,
                }
            )
        (base / "emoji.json").write_text(json.dumps(entries))
        (base / "package.json").write_text("{}")
    om = pkgs / "openmoji" / "package"
    table = []
    for i, (code, name, _) in enumerate(EMOJI):
        _svg(om / "color" / "svg" / f"{code}.svg", i)
        table.append({"hexcode": code, "annotation": name, "skintone": ""})
    if tone_variants:
        table.append(
            {
                "hexcode": "1F3C3-1F3FB",
                "annotation": "person running: light skin tone",
                "skintone": 1,
            }
        )
        _svg(om / "color" / "svg" / "1F3C3-1F3FB.svg", 99)
    (om / "data").mkdir(parents=True)
    (om / "data" / "openmoji.json").write_text(json.dumps(table))
    (om / "package.json").write_text("{}")
    fl = pkgs / "fluentui-emoji" / "package"
    for i, (code, name, _) in enumerate(EMOJI):
        stem = name.replace("’", "").replace(" ", "-")
        if code.startswith("1F3C3") and tone_variants:
            _svg(fl / "icons" / "flat" / f"{stem}-default.svg", i)
            _svg(fl / "icons" / "flat" / f"{stem}-light.svg", i + 50)
        else:
            _svg(fl / "icons" / "flat" / f"{stem}.svg", i)
    (fl / "package.json").write_text("{}")
    return root


def test_labels_are_code_points_without_variation_selectors() -> None:
    assert code_label("2764-fe0f") == "2764"
    assert code_label("1f3f3-FE0F-200d-1f308") == "1F3F3-200D-1F308"
    assert is_gendered("1F3C3-200D-2642") and is_gendered("1F3C3-200D-2640")
    assert not is_gendered("1F3C3") and not is_gendered("2642")  # the sign alone is a symbol


def test_manifest_has_every_label_in_every_style(tmp_path: Path) -> None:
    root = _fake_packages(tmp_path / "emoji")
    manifest = prepare_emoji(root, render_size=48, seed=3)
    rows = read_manifest(manifest)
    labels = {r.label for r in rows}
    # gendered, skin-tone and single-style emoji are dropped; the rest appear once per style
    assert labels == {code_label(c) for c, _, _ in EMOJI if "200D" not in c}
    assert Counter(r.label for r in rows) == {label: 4 for label in labels}
    assert Counter(r.extra["style"] for r in rows) == {
        s: len(labels) for s in ("noto", "twemoji", "openmoji", "fluent_flat")
    }
    for row in rows:
        with Image.open(row.path) as image:
            assert image.mode == "RGB"
            side = 64 if row.extra["style"] in ("noto", "twemoji") else 48
            assert image.size == (side, side)
    clock = next(r for r in rows if r.label == "1F552")
    assert clock.extra["category"] == "Travel & Places"  # "three o’clock" found in Fluent


def test_split_is_zero_shot_seeded_and_halved(tmp_path: Path) -> None:
    labels = [f"{i:04X}" for i in range(40)]
    first, again = split_labels(labels, 0.5, seed=1), split_labels(labels[::-1], 0.5, seed=1)
    assert first == again
    assert Counter(first.values()) == {"train": 20, "test": 20}
    assert first != split_labels(labels, 0.5, seed=2)
    rows = read_manifest(prepare_emoji(_fake_packages(tmp_path / "e"), render_size=32))
    train = {r.label for r in rows if r.split == "train"}
    test = {r.label for r in rows if r.split == "test"}
    assert train and test and not train & test


def test_second_call_reuses_the_images(tmp_path: Path) -> None:
    root = _fake_packages(tmp_path / "emoji")
    manifest = prepare_emoji(root, render_size=32)
    image = next((root / "images" / "openmoji").iterdir())
    stamp = image.stat().st_mtime_ns
    assert prepare_emoji(root, render_size=32) == manifest
    assert image.stat().st_mtime_ns == stamp
    prepare_emoji(root, render_size=40)  # other arguments: drawn again
    with Image.open(image) as redrawn:
        assert redrawn.size == (40, 40)


def test_missing_package_names_package_path_and_fix(tmp_path: Path) -> None:
    root = _fake_packages(tmp_path / "emoji")
    (root / "packages" / "openmoji" / "package" / "data" / "openmoji.json").unlink()
    with pytest.raises(ManifestError, match=r"'openmoji'.*openmoji\.json.*get_emoji\.sh"):
        prepare_emoji(root)
    with pytest.raises(ManifestError, match="emoji-datasource-google.*get_emoji.sh"):
        prepare_emoji(tmp_path / "empty")
    assert not (root / "manifest.csv").exists()


def test_unexpected_layout_is_one_clear_error(tmp_path: Path) -> None:
    root = _fake_packages(tmp_path / "emoji")
    (root / "packages" / "openmoji" / "package" / "data" / "openmoji.json").write_text(
        json.dumps([{"emoji": "x"}])
    )
    with pytest.raises(ManifestError, match="openmoji.json lacks hexcode"):
        prepare_emoji(root)
    with pytest.raises(ManifestError, match="styles must be at least two"):
        prepare_emoji(root, styles=["noto"])
