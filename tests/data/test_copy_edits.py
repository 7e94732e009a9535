import pickle
import random

import numpy as np
import pytest
from PIL import Image, ImageOps

from retrieval.data.copy_edits import (
    EDIT_KINDS,
    CopyEditAugment,
    apply_edit,
    load_overlays,
)

SINGLE = tuple(k for k in EDIT_KINDS if k != "combo")


def _image(width: int = 80, height: int = 64, seed: int = 0) -> Image.Image:
    """A smooth colour gradient with noise: every edit changes it visibly."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs * 255 / width, ys * 255 / height, (xs + ys) * 127 / (width + height)], -1)
    noisy = base + rng.normal(0, 20, base.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def _differs(a: Image.Image, b: Image.Image) -> bool:
    return a.size != b.size or bool(np.any(_pixels(a) != _pixels(b)))


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_every_kind_gives_a_different_rgb_image(kind):
    image = _image()
    out = apply_edit(image, kind, random.Random(0))
    assert out.mode == "RGB"
    assert _differs(out, image)
    assert _pixels(image).sum() == _pixels(_image()).sum()  # the input is left alone


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_same_seed_same_pixels_other_seed_other_pixels(kind):
    image = _image(240, 180)  # large enough that no size floor (1 px blur radius) hides the draw
    first = apply_edit(image, kind, random.Random(7))
    again = apply_edit(image, kind, random.Random(7))
    assert not _differs(first, again)
    if kind not in ("grayscale", "mirror"):  # these two have nothing random
        others = [apply_edit(image, kind, random.Random(s)) for s in (8, 9, 10)]
        assert any(_differs(first, other) for other in others)


def test_grayscale_has_equal_channels():
    out = _pixels(apply_edit(_image(), "grayscale", random.Random(0)))
    assert np.array_equal(out[..., 0], out[..., 1])
    assert np.array_equal(out[..., 1], out[..., 2])


def test_mirror_equals_imageops_mirror():
    image = _image()
    assert not _differs(apply_edit(image, "mirror", random.Random(0)), ImageOps.mirror(image))


@pytest.mark.parametrize("seed", range(20))
def test_crop_keeps_45_to_80_percent_of_the_area(seed):
    image = _image(97, 61, seed)
    out = apply_edit(image, "crop", random.Random(seed))
    fraction = out.width * out.height / (image.width * image.height)
    assert 0.45 <= fraction <= 0.80
    assert out.width <= image.width and out.height <= image.height


def test_crop_is_a_window_of_the_input():
    image = _image()
    out = apply_edit(image, "crop", random.Random(3))
    big, small = _pixels(image), _pixels(out)
    found = any(
        np.array_equal(big[y : y + out.height, x : x + out.width], small)
        for y in range(image.height - out.height + 1)
        for x in range(image.width - out.width + 1)
    )
    assert found


@pytest.mark.parametrize("seed", range(10))
def test_border_grows_the_canvas_and_keeps_the_image(seed):
    image = _image()
    out = apply_edit(image, "border", random.Random(seed))
    assert out.width >= image.width and out.height >= image.height
    assert out.width * out.height > image.width * image.height
    grown = _pixels(out)
    found = any(
        np.array_equal(grown[y : y + image.height, x : x + image.width], _pixels(image))
        for y in range(out.height - image.height + 1)
        for x in range(out.width - image.width + 1)
    )
    assert found


@pytest.mark.parametrize("kind", ["jpeg", "blur", "rescale", "color", "boxes", "text", "emoji"])
def test_same_size_kinds_keep_the_size(kind):
    image = _image()
    out = apply_edit(image, kind, random.Random(0))
    assert out.size == image.size
    assert _differs(out, image)


def test_blur_lowers_high_frequency_energy():
    image = _image()
    out = apply_edit(image, "blur", random.Random(0))
    assert (
        np.abs(np.diff(_pixels(out), axis=1)).mean()
        < 0.5 * np.abs(np.diff(_pixels(image), axis=1)).mean()
    )


def test_rescale_loses_detail():
    image = _image()
    out = apply_edit(image, "rescale", random.Random(0))
    assert (
        np.abs(np.diff(_pixels(out), axis=1)).mean()
        < np.abs(np.diff(_pixels(image), axis=1)).mean()
    )


@pytest.mark.parametrize("seed", range(10))
def test_boxes_cover_part_of_the_image(seed):
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    out = _pixels(apply_edit(image, "boxes", random.Random(seed)))
    changed = np.any(out != 0, axis=-1).mean()
    assert 0.02 < changed <= 0.40


def test_rotate_fills_the_corners_with_one_colour():
    image = _image()
    out = _pixels(apply_edit(image, "rotate", random.Random(0)))
    corners = [out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]]
    assert all(np.array_equal(c, corners[0]) for c in corners)


def test_emoji_pastes_the_given_overlays():
    overlay = Image.new("RGBA", (20, 20), (255, 0, 255, 255))
    image = Image.new("RGB", (100, 100), (0, 0, 0))
    out = _pixels(apply_edit(image, "emoji", random.Random(0), overlays=[overlay]))
    magenta = np.all(out == (255, 0, 255), axis=-1).mean()
    assert magenta >= 0.15**2


def test_emoji_keeps_overlay_transparency():
    overlay = Image.new("RGBA", (20, 20), (255, 0, 0, 0))  # fully transparent
    image = _image()
    out = apply_edit(image, "emoji", random.Random(0), overlays=[overlay])
    assert not _differs(out, image)


def test_combo_applies_three_different_kinds(monkeypatch):
    import retrieval.data.copy_edits as module

    used: list[str] = []
    real = module.apply_edit

    def spy(image, kind, rng, overlays=()):
        used.append(kind)
        return real(image, kind, rng, overlays)

    monkeypatch.setattr(module, "apply_edit", spy)
    module.apply_edit(_image(), "combo", random.Random(0))
    assert used[0] == "combo" and len(used) == 4
    assert len(set(used[1:])) == 3 and "combo" not in used[1:]


@pytest.mark.parametrize("size", [(8, 8), (1, 1), (2, 9), (300, 4)])
@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_tiny_and_thin_images_work(kind, size):
    out = apply_edit(_image(*size), kind, random.Random(0))
    assert out.mode == "RGB" and out.width >= 1 and out.height >= 1


def test_other_modes_are_converted():
    out = apply_edit(_image().convert("L"), "jpeg", random.Random(0))
    assert out.mode == "RGB"


def test_unknown_kind_names_it_and_the_valid_ones():
    with pytest.raises(ValueError, match="sepia") as err:
        apply_edit(_image(), "sepia", random.Random(0))
    assert all(kind in str(err.value) for kind in EDIT_KINDS)


def test_augment_is_deterministic_under_a_seed():
    image = _image()
    first, second = CopyEditAugment(seed=3), CopyEditAugment(seed=3)
    for _ in range(5):
        a, b = first(image), second(image)
        assert first.last_kinds == second.last_kinds
        assert not _differs(a, b)


def test_augment_follows_the_global_random_state():
    augment, image = CopyEditAugment(p=1.0), _image()
    random.seed(11)
    first = [augment(image) for _ in range(3)]
    random.seed(11)
    again = [augment(image) for _ in range(3)]
    assert all(not _differs(a, b) for a, b in zip(first, again, strict=True))
    random.seed(12)
    other = [augment(image) for _ in range(3)]
    assert any(_differs(a, b) for a, b in zip(first, other, strict=True))


def test_augment_uses_every_kind_and_respects_num_edits():
    augment, image = CopyEditAugment(seed=0, num_edits=(1, 3), p=0.9), _image(32, 32)
    seen: set[str] = set()
    counts = []
    for _ in range(200):
        augment(image)
        kinds = augment.last_kinds
        assert len(set(kinds)) == len(kinds) and "combo" not in kinds
        counts.append(len(kinds))
        seen.update(kinds)
    assert seen == set(SINGLE)
    assert set(counts) == {0, 1, 2, 3}
    assert 0.03 < counts.count(0) / 200 < 0.2  # p = 0.9


def test_augment_choose_draws_from_the_given_rng():
    augment = CopyEditAugment(num_edits=(2, 2), p=1.0)
    assert augment.choose(random.Random(5)) == augment.choose(random.Random(5))
    assert len(augment.choose(random.Random(5))) == 2


def test_augment_with_p_zero_returns_the_image():
    image = _image()
    augment = CopyEditAugment(p=0.0, seed=0)
    assert augment(image) is image and augment.last_kinds == ()


def test_augment_pickles_and_keeps_its_state():
    augment = CopyEditAugment(overlays=[Image.new("RGBA", (4, 4), (1, 2, 3, 255))], seed=4)
    clone = pickle.loads(pickle.dumps(augment))
    image = _image()
    assert not _differs(augment(image), clone(image))
    assert len(clone.overlays) == 1


@pytest.mark.parametrize("bad", [{"num_edits": (3, 2)}, {"num_edits": (1, 13)}, {"p": 1.5}])
def test_augment_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        CopyEditAugment(**bad)


def test_load_overlays_sorted_rgba_and_limited(tmp_path):
    for i, name in enumerate(["b.png", "a.png", "c.jpg"]):
        Image.new("RGB" if name.endswith("jpg") else "RGBA", (5 + i, 5), (i, 0, 0)).save(
            tmp_path / name
        )
    (tmp_path / "notes.txt").write_text("not an image")
    overlays = load_overlays(tmp_path, limit=2)
    assert [o.size for o in overlays] == [(6, 5), (5, 5)]  # a.png, b.png
    assert all(o.mode == "RGBA" for o in overlays)
    assert len(load_overlays(tmp_path)) == 3


def test_load_overlays_names_an_empty_or_missing_folder(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_overlays(tmp_path)
    with pytest.raises(ValueError, match="missing"):
        load_overlays(tmp_path / "missing")
