"""The built-in demo dataset, generated on first use into a folder with its manifest.

The images are drawn by :mod:`retrieval.data.demo_render`; their bytes depend only on (seed,
``DEMO_VERSION``), so every machine trains and validates on the same data.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

from retrieval.data.demo_render import render_demo_image

DEMO_VERSION = 1  # bump when the generator's output changes


def _write_dataset(folder: Path, params: dict[str, int]) -> None:
    """Render every image into ``folder``, then write its manifest and finally its demo.json."""
    num_labels, seed, image_size = params["num_labels"], params["seed"], params["image_size"]
    rows = []
    for label in range(num_labels):
        name = f"obj_{label:0{max(3, len(str(num_labels - 1)))}d}"
        (folder / "images" / name).mkdir(parents=True)
        split = "train" if label < num_labels // 2 else "test"
        for index in range(params["images_per_label"]):
            path = f"images/{name}/{index:03d}.jpg"
            image = render_demo_image(seed, label, index, image_size)
            image.save(folder / path, format="JPEG", quality=90)
            rows.append((path, name, split))
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "label", "split"))
        writer.writerows(rows)
    (folder / "demo.json").write_text(json.dumps(params, indent=2) + "\n", encoding="utf-8")


def _is_complete(root: Path, params: dict[str, int]) -> bool:
    """Whether ``root`` holds a finished demo dataset made with exactly ``params``."""
    try:
        found = json.loads((root / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(found == params and (root / "manifest.csv").is_file())


def _move_into_place(tmp: Path, root: Path, params: dict[str, int]) -> None:
    """Rename ``tmp`` to ``root``, replacing an outdated demo; keep a racing process's result."""
    if (root / "demo.json").is_file() and not _is_complete(root, params):
        old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            os.replace(root, old / "demo")
        shutil.rmtree(old, ignore_errors=True)
    with contextlib.suppress(OSError):  # not empty, or it does not exist
        root.rmdir()
    try:
        os.rename(tmp, root)
    except OSError:
        if not _is_complete(root, params):
            raise


def prepare_demo(
    root: str | Path,
    num_labels: int = 120,
    images_per_label: int = 24,
    image_size: int = 128,
    seed: int = 0,
) -> Path:
    """Generate the demo dataset under ``root`` on first use and return its manifest CSV path.

    Layout: ``root/images/<label>/<index>.jpg`` and ``root/manifest.csv`` with columns
    ``path,label,split`` (paths relative to ``root``, labels like ``obj_007``). Labels are sorted;
    the first half (rounded down) forms split ``train`` and the rest split ``test``. A dataset
    whose ``demo.json`` matches the arguments and ``DEMO_VERSION`` is reused as is; a demo made
    with other arguments is replaced; a non-empty ``root`` without ``demo.json`` is refused. The
    dataset is written to a temporary sibling folder and renamed into place, so an interrupted
    run never leaves a partial dataset at ``root``.
    """
    if num_labels < 2 or images_per_label < 1 or image_size < 16:
        raise ValueError("the demo needs num_labels >= 2, images_per_label >= 1, image_size >= 16")
    root = Path(root).expanduser().absolute()
    params = {
        "version": DEMO_VERSION,
        "num_labels": num_labels,
        "images_per_label": images_per_label,
        "image_size": image_size,
        "seed": seed,
    }
    if _is_complete(root, params):
        return root / "manifest.csv"
    foreign = not root.is_dir() or any(root.iterdir())
    if root.exists() and not (root / "demo.json").is_file() and foreign:
        raise FileExistsError(
            f"{root} exists and holds no demo dataset (no demo.json) and is not an empty "
            "folder; pass an empty or new folder for the demo dataset"
        )
    root.parent.mkdir(parents=True, exist_ok=True)
    print(f"generating the demo dataset ({num_labels * images_per_label} images) in {root} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        tmp.chmod(0o755)
        _write_dataset(tmp, params)
        _move_into_place(tmp, root, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root / "manifest.csv"
