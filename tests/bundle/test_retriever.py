"""Retriever on a real bundle: search, runtime equivalence, persistence, bad input, verify."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retrieval.bundle.format import FORMAT_VERSION, BundleError
from retrieval.data.images import ImageLoadError
from retrieval.data.images import open_rgb as load_rgb
from retrieval.search import Retriever
from tests.bundle_fixtures import (
    OPENVINO,
    Gallery,
    negate_stored_vector,
    new_images,
    reference_embed,
    sha256_bytes,
    transformed_copy,
)

REPO = Path(__file__).resolve().parents[2]
DIM = 1280  # EfficientNet-Lite0 features, no head


@pytest.fixture(scope="module")
def retriever(bundle_template: Path, tmp_path_factory: pytest.TempPathFactory):
    """One loaded bundle for the tests that only read (its own copy of the template)."""
    folder = shutil.copytree(bundle_template, tmp_path_factory.mktemp("readonly") / "bundle")
    with Retriever.load(folder) as loaded:
        yield loaded


def files_of(folder: Path) -> dict[str, str]:
    """sha256 of every file in ``folder`` except the lock and SQLite's shared-memory file."""
    skip = {".lock", "items.sqlite-shm"}
    return {p.name: sha256_bytes(p) for p in sorted(folder.iterdir()) if p.name not in skip}


def assert_healthy(folder: Path) -> None:
    with Retriever.load(folder) as again:
        assert again.verify() == []
        assert len(again) == 40


def header_only_png(path: Path, side: int) -> Path:
    """A PNG whose header claims ``side`` x ``side`` pixels but holds no pixel data at all:
    decoding it fails, so only a check made from the header can give the pixel-limit error."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------- search


def test_each_gallery_image_finds_itself_first_with_score_one(
    retriever: Retriever, gallery: Gallery
) -> None:
    results = retriever.search([str(p) for p in gallery.paths], k=5)
    assert len(results) == len(gallery.paths)
    for path, label, hits in zip(gallery.paths, gallery.labels, results, strict=True):
        assert len(hits) == 5
        assert hits[0].uri == str(path)
        assert hits[0].label == label
        assert hits[0].score == pytest.approx(1.0, abs=1e-3)
        assert hits[1].score < 0.99  # the demo images are distinct
        scores = [hit.score for hit in hits]
        assert scores == sorted(scores, reverse=True)


def test_a_transformed_copy_finds_its_original_first(
    retriever: Retriever, gallery: Gallery, tmp_path: Path
) -> None:
    copies = [transformed_copy(p) for p in gallery.paths]
    results = retriever.search(copies, k=2)
    firsts = [hits[0].uri for hits in results]
    assert firsts == [str(p) for p in gallery.paths]
    assert all(hits[0].score < 0.999 for hits in results)  # really changed, yet found
    # the same through a file and a PIL image
    saved = tmp_path / "copy.jpg"
    saved.write_bytes(copies[5])
    by_file, by_pil = retriever.search([saved, load_rgb(saved)], k=1)
    assert by_file[0].uri == by_pil[0].uri == str(gallery.paths[5])
    assert by_file[0].score == pytest.approx(results[5][0].score, abs=1e-5)


def test_search_by_vectors_takes_n_by_d_and_d(retriever: Retriever, gallery: Gallery) -> None:
    rows = retriever.search(gallery.vectors[:3], k=2)
    assert [hits[0].uri for hits in rows] == [str(p) for p in gallery.paths[:3]]
    assert all(hits[0].score == pytest.approx(1.0, abs=1e-4) for hits in rows)
    (single,) = retriever.search(gallery.vectors[7], k=3)  # (d,): one query
    assert single[0].uri == str(gallery.paths[7])
    (scaled,) = retriever.search(3.0 * gallery.vectors[7].astype(np.float64), k=1)
    assert scaled[0].score == pytest.approx(1.0, abs=1e-4)  # normalised here
    assert retriever.search(np.empty((0, DIM), np.float32)) == []


def test_k_larger_than_the_bundle_returns_every_item_once(
    retriever: Retriever, gallery: Gallery
) -> None:
    (hits,) = retriever.search(gallery.vectors[:1], k=1000)
    assert len(hits) == len(gallery.paths)
    assert len({hit.id for hit in hits}) == len(hits)
    assert {hit.uri for hit in hits} == {str(p) for p in gallery.paths}


@pytest.mark.parametrize("k", [0, -1, 2.0, True, "3", None])
def test_invalid_k_is_refused(retriever: Retriever, gallery: Gallery, k: object) -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retriever.search(gallery.vectors[:1], k=k)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("vectors", "message"),
    [
        (np.ones((2, 7), np.float32), r"shape \(n, 1280\)"),
        (np.ones(7, np.float32), r"shape \(n, 1280\)"),
        (np.ones((1, 2, DIM), np.float32), r"shape \(n, 1280\)"),
        (np.full((1, DIM), np.nan, np.float32), "NaN"),
        (np.zeros((1, DIM), np.float32), "zero vector"),
    ],
)
def test_bad_query_vectors_are_refused(
    retriever: Retriever, vectors: np.ndarray, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        retriever.search(vectors, k=1)


def test_label_filter_returns_only_that_label(retriever: Retriever, gallery: Gallery) -> None:
    label = gallery.labels[0]
    other = next(i for i, lab in enumerate(gallery.labels) if lab != label)
    own, foreign = retriever.search(gallery.vectors[[0, other]], k=10, label=label)
    expected = {
        str(p) for p, lab in zip(gallery.paths, gallery.labels, strict=True) if lab == label
    }
    for hits in (own, foreign):
        assert {hit.uri for hit in hits} == expected  # all 4 of them, nothing else
        assert all(hit.label == label for hit in hits)
    assert own[0].uri == str(gallery.paths[0])
    (two,) = retriever.search(gallery.vectors[other], k=2, label=label)
    assert [hit.uri for hit in two] == [hit.uri for hit in foreign[:2]]
    assert retriever.search(gallery.vectors[:1], k=3, label="no such label") == [[]]


# ---------------------------------------------------------------- runtimes


@pytest.mark.parametrize("runtime", ["onnx", OPENVINO, "torchscript", "eager"])
def test_embed_matches_the_pytorch_model(
    bundle_copy: Path, gallery: Gallery, gallery_embedder, gallery_pre, runtime: str
) -> None:
    paths = gallery.paths[::5]
    sources = [load_rgb(paths[0]), paths[1], str(paths[2]), paths[3].read_bytes(), *paths[4:]]
    with Retriever.load(bundle_copy, runtime=runtime, device="cpu") as loaded:
        assert loaded.runtime.kind == runtime
        got = loaded.embed(sources, batch_size=3)
    expected = reference_embed(gallery_embedder, gallery_pre, [load_rgb(p) for p in paths])
    assert got.shape == (len(paths), DIM) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert (got * expected).sum(axis=1).min() >= 0.9999


def test_a_pil_image_embeds_like_the_same_image_from_a_file(
    retriever: Retriever, gallery: Gallery, tmp_path: Path
) -> None:
    base = np.asarray(load_rgb(gallery.paths[9]))
    rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
    rgba[:, :40] = 0  # a transparent black band: files put it on white
    gray16 = (base[..., 0].astype(np.uint16) * 257).astype(np.uint16)
    images = {
        "rgba": Image.fromarray(rgba),
        "la": Image.fromarray(rgba).convert("LA"),
        "i16": Image.fromarray(gray16),  # mode I;16
    }
    for name, image in images.items():
        path = tmp_path / f"{name}.png"
        image.save(path)
        from_pil, from_file = retriever.embed([image, path])
        assert float(from_pil @ from_file) >= 0.9999, name


# ---------------------------------------------------------------- persistence


def test_added_images_are_found_after_reloading(bundle_copy: Path, tmp_path: Path) -> None:
    paths = new_images(tmp_path / "new", 3)
    with Retriever.load(bundle_copy) as loaded:
        report = loaded.add(paths, labels=["a", None, "c"])
        assert len(report.added) == 3 and not report.duplicates and not report.unreadable
        assert len(loaded) == 43
    with Retriever.load(bundle_copy) as again:
        assert len(again) == 43
        results = again.search(paths, k=1)
        assert again.verify() == []
    assert [hits[0].id for hits in results] == report.added
    assert [hits[0].uri for hits in results] == [str(p.resolve()) for p in paths]
    assert [hits[0].label for hits in results] == ["a", None, "c"]


def test_an_add_acknowledged_before_a_kill_survives(bundle_copy: Path, tmp_path: Path) -> None:
    (image,) = new_images(tmp_path / "new", 1)
    code = (
        "import os, signal, sys\n"
        "from retrieval.search.retriever import Retriever\n"
        "r = Retriever.load(sys.argv[1])\n"
        "report = r.add([sys.argv[2]])\n"
        "assert len(report.added) == 1, report\n"
        "print('ACK', report.added[0], flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(bundle_copy), str(image)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == -signal.SIGKILL, done.stderr
    words = done.stdout.split()
    assert words[0] == "ACK", done.stdout + done.stderr
    with Retriever.load(bundle_copy) as again:
        assert len(again) == 41
        (hits,) = again.search([image], k=1)
        assert again.verify() == []
    assert hits[0].id == int(words[1])
    assert hits[0].uri == str(image.resolve())
    assert hits[0].score == pytest.approx(1.0, abs=1e-3)


def test_removed_items_stay_removed_after_reloading(bundle_copy: Path, gallery: Gallery) -> None:
    with Retriever.load(bundle_copy) as loaded:
        (hits,) = loaded.search(gallery.vectors[:1], k=3)
        gone = [hits[0].id, hits[2].id]
        assert loaded.remove(gone[::-1]) == sorted(gone)
        assert len(loaded) == 38
        (after,) = loaded.search(gallery.vectors[:1], k=40)
        assert not {hit.id for hit in after} & set(gone)
    with Retriever.load(bundle_copy) as again:
        assert len(again) == 38
        (after,) = again.search(gallery.vectors[:1], k=40)
        assert again.verify() == []
    assert not {hit.id for hit in after} & set(gone)
    assert after[0].id == hits[1].id


def test_removing_an_unknown_id_raises_and_changes_nothing(bundle_copy: Path) -> None:
    with Retriever.load(bundle_copy) as loaded:
        first = loaded.items.store.vectors([1])
        with pytest.raises(KeyError, match="999"):
            loaded.remove([1, 999])  # 1 exists: it must not be removed either
        assert len(loaded) == 40
        assert loaded.search(first, k=1)[0][0].id == 1
        assert loaded.verify() == []
    assert_healthy(bundle_copy)


# ---------------------------------------------------------------- bad input


def test_unreadable_files_are_listed_and_the_rest_added(bundle_copy: Path, tmp_path: Path) -> None:
    good = new_images(tmp_path / "new", 2)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"this is not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good[0].read_bytes()[:300])
    missing = tmp_path / "missing.jpg"
    paths = [corrupt, good[0], empty, truncated, missing, good[1]]
    with Retriever.load(bundle_copy) as loaded:
        report = loaded.add(paths)
        assert len(report.added) == 2 and report.duplicates == []
        assert [path for path, _ in report.unreadable] == [
            str(p) for p in (corrupt, empty, truncated, missing)
        ]
        assert all(reason for _, reason in report.unreadable)
        assert len(loaded) == 42
        assert loaded.verify() == []
    with Retriever.load(bundle_copy) as again:
        assert len(again) == 42
        found = again.search(good, k=1)
    assert [hits[0].uri for hits in found] == [str(p.resolve()) for p in good]


def test_the_same_content_is_not_added_twice(
    bundle_copy: Path, gallery: Gallery, tmp_path: Path
) -> None:
    twin = tmp_path / "twin.jpg"  # another name, the same bytes as a gallery image
    shutil.copyfile(gallery.paths[3], twin)
    (fresh,) = new_images(tmp_path / "new", 1)
    with Retriever.load(bundle_copy) as loaded:
        (hits,) = loaded.search([gallery.paths[3]], k=1)
        report = loaded.add([twin, fresh, fresh])
        assert len(report.added) == 1
        assert report.duplicates == [
            (str(twin.resolve()), hits[0].id),
            (str(fresh.resolve()), report.added[0]),
        ]
        again = loaded.add([fresh])
        assert again.added == [] and again.duplicates == [(str(fresh.resolve()), report.added[0])]
        assert len(loaded) == 41
    with Retriever.load(bundle_copy) as reloaded:
        assert len(reloaded) == 41


def test_images_over_max_pixels_are_refused_before_decoding(
    bundle_copy: Path, gallery: Gallery, tmp_path: Path
) -> None:
    huge = header_only_png(tmp_path / "huge.png", 4000)
    with Retriever.load(bundle_copy, max_pixels=96 * 96 - 1) as loaded:
        for query in (huge, huge.read_bytes(), gallery.paths[0]):
            with pytest.raises(ImageLoadError, match="over the limit of 9215 pixels"):
                loaded.search([query], k=1)
        report = loaded.add([huge, gallery.paths[0]])
        assert report.added == [] and report.duplicates == []
        assert [p for p, _ in report.unreadable] == [str(huge), str(gallery.paths[0])]
        assert all("over the limit" in reason for _, reason in report.unreadable)
        assert len(loaded) == 40
    with Retriever.load(bundle_copy, max_pixels=96 * 96) as loaded:  # exactly at the limit
        assert loaded.search([gallery.paths[0]], k=1)[0][0].uri == str(gallery.paths[0])
    # the default limit lets it through, so it is decoded, and that fails differently
    with Retriever.load(bundle_copy) as loaded, pytest.raises(ImageLoadError, match="decoded"):
        loaded.search([huge], k=1)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _retune(path: Path) -> None:
    data = json.loads(path.read_text())
    data["mean"] = [0.485, 0.456, 0.406]  # still valid, different numbers
    path.write_text(json.dumps(data, indent=2))


def _rename_backbone(path: Path) -> None:
    data = json.loads(path.read_text())
    data["backbone"]["name"] = "resnet18"
    path.write_text(json.dumps(data, indent=2) + "\n")


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("model.onnx", _truncate),
        ("model.ts", _truncate),
        ("model.safetensors", _truncate),
        ("preprocessing.json", _retune),
        ("model.json", _rename_backbone),
    ],
)
def test_altered_files_are_refused_at_load_and_nothing_else_changes(
    bundle_copy: Path, bundle_template: Path, name: str, damage
) -> None:
    damage(bundle_copy / name)
    before = files_of(bundle_copy)
    for runtime in ("auto", "eager"):  # checked whichever model file the runtime reads
        with pytest.raises(BundleError, match=rf"{bundle_copy / name} does not match its checks"):
            Retriever.load(bundle_copy, runtime=runtime)
    assert files_of(bundle_copy) == before
    shutil.copyfile(bundle_template / name, bundle_copy / name)
    assert_healthy(bundle_copy)


def test_bad_preprocessing_with_a_matching_checksum_names_the_field(bundle_copy: Path) -> None:
    from retrieval.bundle.format import read_manifest, write_manifest
    from retrieval.infra.io import sha256_file

    path = bundle_copy / "preprocessing.json"
    data = json.loads(path.read_text())
    data["resize"] = data["input_size"] - 1
    path.write_text(json.dumps(data))
    manifest = read_manifest(bundle_copy)
    files = manifest.pop("files")
    write_manifest(bundle_copy, manifest, list(files))
    assert read_manifest(bundle_copy)["files"]["preprocessing.json"] == sha256_file(path)
    with pytest.raises(BundleError, match=r"preprocessing\.json.*'resize'"):
        Retriever.load(bundle_copy)


def test_a_bundle_written_before_resize_mode_loads_as_crop(
    bundle_copy: Path, gallery: Gallery
) -> None:
    from retrieval.bundle.format import read_manifest, write_manifest

    path = bundle_copy / "preprocessing.json"
    data = json.loads(path.read_text())
    assert data.pop("resize_mode") == "crop"
    path.write_text(json.dumps(data))
    manifest = read_manifest(bundle_copy)
    write_manifest(bundle_copy, manifest, list(manifest.pop("files")))
    with Retriever.load(bundle_copy, runtime="eager") as loaded:
        assert loaded.preprocessing.resize_mode == "crop"
        vectors = loaded.embed(gallery.paths[:3])
    np.testing.assert_allclose(vectors, gallery.vectors[:3], atol=1e-5)


def test_a_newer_format_version_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    path.write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="newer"):
        Retriever.load(bundle_copy)


def test_a_manifest_that_is_not_json_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text('{"format": "retrieval-bundle", ')
    with pytest.raises(BundleError, match="manifest.json is not valid JSON"):
        Retriever.load(bundle_copy)


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path: Path, gallery: Gallery) -> None:
    with pytest.raises(BundleError, match="is not a bundle"):
        Retriever.load(tmp_path)  # an empty folder
    with pytest.raises(BundleError, match="is not a bundle"):
        Retriever.load(gallery.root)  # a folder of images
    with pytest.raises(BundleError, match="does not exist"):
        Retriever.load(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="does not exist or is not a folder"):
        Retriever.load(gallery.paths[0])
    (tmp_path / "manifest.json").write_text('{"format": "something-else"}')
    with pytest.raises(BundleError, match="is not a retrieval-bundle manifest"):
        Retriever.load(tmp_path)


def test_a_missing_index_file_is_a_clear_error(bundle_copy: Path, bundle_template: Path) -> None:
    (bundle_copy / "index.faiss").unlink()
    with pytest.raises(ValueError, match=r"index\.faiss.*rebuild_index=True"):
        Retriever.load(bundle_copy)
    assert not (bundle_copy / "index.faiss").exists()  # not rebuilt behind the user's back
    shutil.copyfile(bundle_template / "index.faiss", bundle_copy / "index.faiss")
    assert_healthy(bundle_copy)  # and the failed load released the folder


def test_a_bundle_open_elsewhere_is_refused(bundle_copy: Path) -> None:
    with Retriever.load(bundle_copy), pytest.raises(RuntimeError, match="already open"):
        Retriever.load(bundle_copy)
    assert_healthy(bundle_copy)


# ---------------------------------------------------------------- verify and info


def test_verify_is_empty_when_healthy_and_names_a_deleted_file(bundle_copy: Path) -> None:
    with Retriever.load(bundle_copy) as loaded:
        assert loaded.verify() == []
        (bundle_copy / "model.ts").unlink()  # not the runtime in use: searches go on
        problems = loaded.verify()
        assert len(problems) == 1 and "missing model.ts" in problems[0]
        assert loaded.search(np.ones((1, DIM), np.float32), k=1)[0]


def test_verify_names_an_altered_file_and_a_missing_index_snapshot(bundle_copy: Path) -> None:
    with Retriever.load(bundle_copy) as loaded:
        with open(bundle_copy / "preprocessing.json", "a") as handle:
            handle.write(" ")
        (bundle_copy / "index.faiss").unlink()
        problems = loaded.verify()
    assert len(problems) == 2
    assert "preprocessing.json does not match its checksum" in problems[0]
    assert "index.faiss is missing" in problems[1]


def test_verify_finds_a_stored_vector_that_no_longer_matches_the_index(bundle_copy: Path) -> None:
    negate_stored_vector(bundle_copy, 1)
    with Retriever.load(bundle_copy) as loaded:  # loading checks files, not every vector
        assert loaded.verify() == ["item 1 is not among the nearest of its own vector"]


def test_info_describes_the_bundle(retriever: Retriever) -> None:
    info = retriever.info()
    assert info["items"] == 40 == len(retriever)
    assert info["embedding_dim"] == DIM == retriever.dim
    assert info["backbone"] == "tf_efficientnet_lite0"
    assert info["metric"] == "inner_product"
    assert info["index"] == {"factory": "Flat", "search_params": ""}
    assert info["format_version"] == FORMAT_VERSION
    assert info["runtime"] == "onnx"
    assert info["metrics"] == {"test/recall@1": 0.875, "test/map@r": 0.5}
    json.dumps(info)


def test_importing_search_and_cli_pulls_no_training_stack() -> None:
    code = (
        "import sys, retrieval.search.retriever, retrieval.cli\n"
        "banned = {'hydra', 'omegaconf', 'lightning', 'pytorch_lightning', 'lightning_fabric'}\n"
        "found = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "assert not found, found\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
