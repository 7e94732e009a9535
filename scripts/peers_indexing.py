"""Indexing a folder of photos end to end beside the peers, and decoding alone.

The same folder of JPEG photographs (``--images`` of them, 640-1280 px on the long side,
quality 90: seeded crops, scales and flips of the real photographs that scikit-image and
scikit-learn ship), the same bundle (the default backbone, pretrained, exported by
``python export.py``), the same preprocessing (short side to ``resize``, centre crop, the
bundle's mean / std) and batches of ``--batch-size``:

- ``ours (onnx)``: ``Retriever.add`` of every file, as ``retrieval index BUNDLE DIR`` runs it:
  read, sha256, decode (reduced where the image is much larger than the model input),
  preprocess, embed with the bundle's ONNX model, store in the item table and the FAISS index;
- ``ours (eager)``: the same with the bundle's PyTorch module (``runtime=eager``), and with
  OpenVINO (``runtime=openvino``) when it is installed;
- ``oml``: open-metric-learning's predict path, ``oml.inference.inference`` over an
  ``ImageBaseDataset`` with the equivalent torchvision transform, on the same PyTorch module
  (``num_workers`` 0, its default, and 2), then a FAISS ``IndexFlatIP.add``;
- ``naive``: a loop of ``Image.open`` + ``convert("RGB")`` + the torchvision transform +
  the PyTorch module + ``IndexFlatIP.add``.

Every way takes its turn in each of ``--repeats`` rounds (files in the page cache, a fresh
copy of the bundle for ours, so nothing is a duplicate); the median time gives images/s.
The vectors of ours and of the naive loop are compared (cosine per image).

Decoding alone (``decode`` table): Pillow's full decode + RGB, Pillow's JPEG ``draft``
(DCT scaling to 1/2, 1/4 or 1/8, as ``Preprocessing.prepare`` asks for when an image is at
least ``REDUCING_GAP`` x the size it needs) and simplejpeg (libjpeg-turbo), full and scaled,
and to the model input: full decode then the Preprocessing, against ``Preprocessing.prepare``;
on the folder's photos and on ``--large`` camera-sized (12 MP) JPEGs.

    python scripts/peers_indexing.py --images 256 --repeats 3 --record experiments/FILE.md
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


#: The default backbone's ImageNet input size.
IMAGE_SIZE = 224


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def real_photos() -> list[Image.Image]:
    """The colour photographs that scikit-image and scikit-learn ship (no download)."""
    photos: list[Image.Image] = []
    try:
        import skimage.data as skd

        for name in ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left"):
            if name == "motorcycle_left":
                array = skd.stereo_motorcycle()[0]
            else:
                array = getattr(skd, name)()
            photos.append(Image.fromarray(array).convert("RGB"))
    except ImportError:
        pass
    try:
        import sklearn.datasets

        photos += [Image.fromarray(a) for a in sklearn.datasets.load_sample_images().images]
    except ImportError:
        pass
    if not photos:
        raise SystemExit("needs scikit-image or scikit-learn for their sample photographs")
    return photos


def make_folder(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` JPEGs, 640-1280 px on the long side: crops, scales and flips of real photos."""
    rng = np.random.default_rng(seed)
    photos = real_photos()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        long_side = int(rng.integers(640, 1281))
        scale = long_side / max(cw, ch)
        image = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize(
            (max(1, round(cw * scale)), max(1, round(ch * scale))), Image.Resampling.BICUBIC
        )
        if rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        path = folder / f"{i:05d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def export_bundle(gallery: Path, out: Path) -> Path:
    """The default backbone, pretrained, exported with a few images as its gallery."""
    bundle = out / "bundle"
    cmd = [
        sys.executable,
        str(ROOT / "export.py"),
        f"gallery={gallery}",
        "labels=none",
        f"bundle={bundle}",
        "data=demo",
        f"data.image_size={IMAGE_SIZE}",
        f"paths.output_dir={out}",
        "inference.use_cache=false",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return bundle


def torchvision_transform(pre: Any) -> Any:
    """The bundle's preprocessing as torchvision does it (``crop`` mode)."""
    from torchvision import transforms as T

    if pre.resize_mode != "crop":
        raise SystemExit(f"this benchmark expects resize_mode=crop, got {pre.resize_mode}")
    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    return T.Compose(
        [
            T.Resize(pre.resize, interpolation=modes[pre.interpolation]),
            T.CenterCrop(pre.input_size),
            T.ToTensor(),
            T.Normalize(pre.mean, pre.std),
        ]
    )


def eager_module(bundle: Path) -> Any:
    from retrieval.bundle.model_config import read_model_config
    from retrieval.bundle.runtime import RUNTIME_FILES, build_embedder

    config = read_model_config(bundle / "model.json")
    return build_embedder(config, bundle / RUNTIME_FILES["eager"]).eval()


class Ways:
    """The ways to index the folder; each call returns the (n, dim) vectors it indexed."""

    def __init__(self, bundle: Path, paths: list[Path], batch_size: int, work: Path) -> None:
        from retrieval.search import Retriever

        self.bundle, self.paths, self.batch, self.work = bundle, paths, batch_size, work
        with Retriever.load(bundle, read_only=True) as r:
            self.pre = r.preprocessing
            self.dim = r.dim
        self.transform = torchvision_transform(self.pre)
        self.module = eager_module(bundle)
        self.copies = 0

    def _fresh_bundle(self) -> Path:
        self.copies += 1
        copy = self.work / f"bundle-{self.copies}"
        shutil.copytree(self.bundle, copy)
        return copy

    def ours(self, runtime: str) -> Callable[[], Callable[[], np.ndarray]]:
        from retrieval.search import Retriever

        def prepare() -> Callable[[], np.ndarray]:
            retriever = Retriever.load(self._fresh_bundle(), runtime=runtime)

            def run() -> np.ndarray:
                report = retriever.add(self.paths, batch_size=self.batch)
                if report.unreadable or report.duplicates:
                    raise RuntimeError(f"unexpected: {report}")
                vectors = retriever.items.vectors(np.asarray(report.added))
                retriever.close()
                assert len(report.added) == len(self.paths)
                return vectors

            return run

        return prepare

    def oml(self, workers: int) -> Callable[[], Callable[[], np.ndarray]]:
        import faiss
        import torch
        from oml.datasets import ImageBaseDataset
        from oml.inference import inference

        def prepare() -> Callable[[], np.ndarray]:
            dataset = ImageBaseDataset(paths=list(self.paths), transform=self.transform)

            def run() -> np.ndarray:
                with torch.inference_mode():
                    out = inference(self.module, dataset, self.batch, num_workers=workers)
                index = faiss.IndexFlatIP(out.shape[1])
                vectors = np.ascontiguousarray(out.numpy(), dtype=np.float32)
                index.add(vectors)
                return vectors

            return run

        return prepare

    def naive(self) -> Callable[[], Callable[[], np.ndarray]]:
        import faiss
        import torch

        def prepare() -> Callable[[], np.ndarray]:
            def run() -> np.ndarray:
                index = faiss.IndexFlatIP(self.dim)
                out = []
                for start in range(0, len(self.paths), self.batch):
                    batch = [
                        self.transform(Image.open(p).convert("RGB"))
                        for p in self.paths[start : start + self.batch]
                    ]
                    with torch.inference_mode():
                        vectors = self.module(torch.stack(batch)).numpy()
                    index.add(vectors)
                    out.append(vectors)
                return np.concatenate(out)

            return run

        return prepare


def decode_table(paths: list[Path], pre: Any, repeats: int, title: str) -> list[str]:
    """ms per image of decoding alone, and of decoding + preprocessing to the model input,
    medians of ``repeats`` passes over ``paths`` (read into memory first)."""
    import io

    from retrieval.data.images import open_rgb
    from retrieval.data.preprocessing import REDUCING_GAP

    datas = [p.read_bytes() for p in paths]
    need = round(pre.resize * REDUCING_GAP)  # what Preprocessing.prepare decodes down to

    def pillow_full() -> None:
        for data in datas:
            Image.open(io.BytesIO(data)).convert("RGB").load()

    def pillow_draft() -> None:
        for data in datas:
            image = Image.open(io.BytesIO(data))
            image.draft("RGB", (need, need))
            image.convert("RGB").load()

    def full_then_preprocess() -> None:
        for data in datas:
            pre(open_rgb(data))

    def prepare() -> None:
        for data in datas:
            pre.prepare(data)

    ways: dict[str, Callable[[], None]] = {
        "Pillow, full decode + RGB": pillow_full,
        f"Pillow draft (DCT scaling, >= {need} px)": pillow_draft,
    }
    try:
        import simplejpeg

        def sj_full() -> None:
            for data in datas:
                simplejpeg.decode_jpeg(data, colorspace="RGB")

        def sj_scaled() -> None:
            for data in datas:
                simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=need, min_width=need)

        ways["simplejpeg (libjpeg-turbo), full"] = sj_full
        ways[f"simplejpeg, scaled (>= {need} px)"] = sj_scaled
    except ImportError:
        log("simplejpeg is not installed: its rows are left out")
    ways["to the model input: full decode, then Preprocessing"] = full_then_preprocess
    ways["to the model input: Preprocessing.prepare (ours)"] = prepare
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / len(datas) * 1000)
    base = statistics.median(times["Pillow, full decode + RGB"])
    lines = [
        f"{title}:",
        "",
        "| decoder | ms / image (median) | vs Pillow full decode |",
        "|---|---|---|",
    ]
    for name, values in times.items():
        median = statistics.median(values)
        lines.append(f"| {name} | {median:.2f} | {median / base:.2f}x |")
    return [*lines, ""]


def make_large(folder: Path, n: int) -> list[Path]:
    """``n`` camera-sized JPEGs (4000 x 3000 or 3000 x 4000, quality 90), from the photos."""
    rng = np.random.default_rng(2)
    photos = real_photos()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = (4000, 3000) if i % 2 == 0 else (3000, 4000)
        image = photos[i % len(photos)].resize(size, Image.Resampling.BICUBIC)
        noise = rng.normal(0, 6, (size[1], size[0], 3))  # sensor-like grain: real entropy
        pixels = np.clip(np.asarray(image, np.float32) + noise, 0, 255).astype(np.uint8)
        path = folder / f"large{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--large", type=int, default=8, help="12 MP JPEGs for decoding alone")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-oml", action="store_true", help="when OML is not installed")
    parser.add_argument("--record", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="peers_indexing_"))
    try:
        report = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n".join(report))
    if args.record:
        with open(args.record, "a", encoding="utf-8") as handle:
            handle.write("\n".join(report) + "\n")


def run(args: argparse.Namespace, work: Path) -> list[str]:
    import torch

    log(f"writing {args.images} photos and exporting the bundle in {work}")
    paths = make_folder(work / "photos", args.images)
    make_folder(work / "seed", 8, seed=1)  # the exported bundle's own few items
    bundle = export_bundle(work / "seed", work / "export")
    ways = Ways(bundle, paths, args.batch_size, work)
    runners: dict[str, Callable[[], Callable[[], np.ndarray]]] = {
        "ours (onnx)": ways.ours("onnx"),
        "ours (eager)": ways.ours("eager"),
    }
    if importlib.util.find_spec("openvino") is not None:
        runners["ours (openvino)"] = ways.ours("openvino")
    runners |= {
        "naive loop": ways.naive(),
    }
    if not args.skip_oml:
        runners["oml, 0 workers"] = ways.oml(0)
        runners["oml, 2 workers"] = ways.oml(2)
    for p in paths:
        p.read_bytes()  # into the page cache
    times: dict[str, list[float]] = {name: [] for name in runners}
    vectors: dict[str, np.ndarray] = {}
    names = list(runners)
    for repeat in range(args.repeats):
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            run_once = runners[name]()
            start = time.perf_counter()
            vectors[name] = run_once()
            times[name].append(time.perf_counter() - start)
            log(f"{name} round {repeat + 1}: {len(paths) / times[name][-1]:.1f} images/s")
    pre = ways.pre
    lines = [
        f"## Indexing a folder ({time.strftime('%Y-%m-%d %H:%M')}, {platform.node()})",
        "",
        f"- machine: {os.cpu_count()} cores; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; load average at the end "
        f"{os.getloadavg()[0]:.2f}",
        f"- command: `{' '.join([Path(sys.executable).name, *sys.argv])}`",
        f"- {len(paths)} JPEGs (640-1280 px long side, quality 90), batch {args.batch_size}, "
        f"input {pre.input_size} px (resize {pre.resize}, centre crop), {args.repeats} rounds",
        "",
        "| way | images/s (median) | runs (s) | vs ours (onnx) |",
        "|---|---|---|---|",
    ]
    ours = statistics.median(times["ours (onnx)"])
    for name, values in times.items():
        median = statistics.median(values)
        runs = ", ".join(f"{v:.1f}" for v in values)
        lines.append(f"| {name} | {len(paths) / median:.1f} | {runs} | {median / ours:.2f}x time |")
    base = vectors["naive loop"]
    for name in [n for n in vectors if n.startswith("ours")]:
        cos = np.sum(vectors[name] * base, axis=1) / (
            np.linalg.norm(vectors[name], axis=1) * np.linalg.norm(base, axis=1)
        )
        lines.append(
            f"\n{name} vs naive loop, cosine per image: min {cos.min():.5f}, "
            f"median {np.median(cos):.6f} (reduced decode and runtime differ)"
        )
    lines += ["", "### Decoding alone", ""]
    lines += decode_table(paths, pre, args.repeats, f"the {len(paths)} photos above")
    large = make_large(work / "large", args.large)
    lines += decode_table(large, pre, args.repeats, f"{len(large)} camera-sized (12 MP) JPEGs")
    return lines


if __name__ == "__main__":
    main()
