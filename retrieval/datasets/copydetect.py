"""``data=copydetect``: copy detection, DISC2021 style. Edited copies of held-out photographs
(the queries) must find their source among the originals and thousands of distractors.

Two layouts under ``root``:

- benchmark (``root/originals/`` and ``root/distractors/`` exist, as written by
  ``scripts/get_copydetect.sh``): the originals are the held-out sources, the distractors the
  training pool; ``root/overlays/``, when present, holds the images the ``emoji`` edit pastes.
- any folder of photos (searched recursively): a seeded sample of ``min(holdout, n // 10)``
  of its n images is held out as the originals, the rest is the training pool.

Manifest rows (``path,label,split,is_query,is_gallery,edit``); an image's label is its path
relative to ``root``, so every image is its own identity:

- ``train``: the training pool (instance training), flags 0/0.
- ``test`` gallery (``is_gallery=1``): the originals, then every training-pool image again as
  a distractor under the same label. The manifest format allows one path in several splits;
  the file is simply listed once per split.
- ``test`` queries (``is_query=1``): ``edits_per_original`` edited copies of each original
  (:mod:`retrieval.data.copy_edits`) labelled with their original's label; column ``edit``
  names the edit kind (empty on other rows). Kinds cycle through ``EDIT_KINDS`` from a
  different start for each original, so every kind is used equally often (up to one).

Queries are written as JPEG (quality 95) under ``OUTDIR/queries/`` (OUTDIR = the folder of
the manifest). ``OUTDIR/copydetect.json`` records a fingerprint of what they were made from
(arguments, originals' and overlays' contents, the list of images); a call with the same
fingerprint reuses the queries and the manifest, any change rebuilds them.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from retrieval.data.copy_edits import EDIT_KINDS, apply_edit, load_overlays
from retrieval.data.images import list_images, open_rgb
from retrieval.data.manifest import ManifestError, ManifestRow, write_manifest
from retrieval.infra.io import atomic_write, sha256_file

COPYDETECT_VERSION = 2  # bump when the queries or the rows change for the same inputs
MIN_IMAGES = 20
QUERY_QUALITY = 95
_FIX = "run `bash scripts/get_copydetect.sh DIR` or pass a folder of photos (data/README.md)"
_MARK = ".copydetect-queries"  # marks a queries folder this module may replace


def _layout(base: Path, out_dir: Path, holdout: int, seed: int) -> tuple[list[Path], list[Path]]:
    """(originals, training pool): absolute paths, sorted."""
    originals, distractors = base / "originals", base / "distractors"
    if originals.is_dir() and distractors.is_dir():
        held, pool = list_images(originals), list_images(distractors)
        if not held or not pool:
            empty = originals if not held else distractors
            raise ManifestError(f"copydetect: {empty} holds no images; {_FIX}")
        return held, pool
    queries = out_dir / "queries"
    images = [p for p in list_images(base) if not p.is_relative_to(queries)]
    if len(images) < MIN_IMAGES:
        raise ManifestError(
            f"copydetect: {base} holds {len(images)} images (searched recursively), fewer than "
            f"{MIN_IMAGES}; use a folder with more photos, or {_FIX}"
        )
    chosen = set(random.Random(seed).sample(images, min(holdout, len(images) // 10)))
    return sorted(chosen), [p for p in images if p not in chosen]


def _fingerprint(
    base: Path, held: list[Path], pool: list[Path], overlays: list[Path], params: dict[str, int]
) -> str:
    """sha256 of everything the rows and the query pixels depend on."""
    state = {
        "version": COPYDETECT_VERSION,
        "params": params,
        "originals": [(_label(p, base), sha256_file(p)) for p in held],
        "overlays": [(p.name, sha256_file(p)) for p in overlays],
        "pool": [_label(p, base) for p in pool],
    }
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _label(path: Path, base: Path) -> str:
    return path.relative_to(base).as_posix()


def _kinds(index: int, count: int) -> list[str]:
    """The edit kinds of original ``index``: ``count`` kinds cycling from position ``index``."""
    return [EDIT_KINDS[(index + j) % len(EDIT_KINDS)] for j in range(count)]


def _query_names(held: list[Path], edits_per_original: int) -> list[list[tuple[str, str]]]:
    """Per original, its queries' ``(path under queries/, edit kind)``."""
    names = []
    for index, path in enumerate(held):
        sub = f"{index:04d}_{''.join(c if c.isalnum() else '_' for c in path.stem)[:60]}"
        kinds = _kinds(index, edits_per_original)
        names.append([(f"{sub}/{j:02d}_{kind}.jpg", kind) for j, kind in enumerate(kinds)])
    return names


def _write_queries(
    folder: Path,
    base: Path,
    held: list[Path],
    names: list[list[tuple[str, str]]],
    overlays: list[Path],
    seed: int,
) -> None:
    """Write every query of ``names`` into ``folder``."""
    sprites = load_overlays(overlays[0].parent, limit=len(overlays)) if overlays else []
    for path, queries in zip(held, names, strict=True):
        rng = random.Random(f"{seed}:{_label(path, base)}")  # depends on this original alone
        original = open_rgb(path)
        for name, kind in queries:
            (folder / name).parent.mkdir(exist_ok=True)
            edited = apply_edit(original, kind, rng, sprites)
            edited.save(folder / name, format="JPEG", quality=QUERY_QUALITY)


def _replace_queries(tmp: Path, queries: Path) -> None:
    """Move the new queries folder into place, removing an older one that this module wrote."""
    if queries.exists():
        if not (queries / _MARK).is_file():
            raise ManifestError(
                f"copydetect: {queries} exists and was not written by prepare_copydetect; "
                "move it away or pass output= in another folder"
            )
        old = Path(tempfile.mkdtemp(prefix=".queries-old-", dir=queries.parent))
        os.replace(queries, old / "queries")
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, queries)


def _is_current(record: Path, key: str, manifest: Path, queries: list[Path]) -> bool:
    """Whether the manifest and every query were made from the inputs fingerprinted ``key``."""
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if found.get("fingerprint") != key or not manifest.is_file():
        return False
    return all(path.is_file() for path in queries)


def prepare_copydetect(
    root: str | Path,
    output: str | Path | None = None,
    edits_per_original: int = 12,
    seed: int = 0,
    holdout: int = 200,
) -> Path:
    """Write (or reuse) the copy-detection manifest of ``root`` and return its path.

    Args:
        root: benchmark folder (``originals/`` + ``distractors/``) or any folder of photos.
        output: manifest path (default ``root/manifest.csv``); queries go to
            ``<its folder>/queries/``. Paths under ``root`` are written relative to it.
        edits_per_original: queries per original (13 kinds: 12 leaves out one kind per
            original, a different one each time).
        seed: seeds the held-out sample (folder layout) and every edit.
        holdout: most originals held out of a folder of photos (benchmark layout: all).

    Raises:
        ManifestError: ``root`` is not a folder, an empty ``originals/`` or ``distractors/``,
            fewer than 20 images in a folder of photos, a ``queries/`` folder not written
            here, or bad arguments.
    """
    base = Path(os.path.abspath(Path(root).expanduser()))
    if not base.is_dir():
        raise ManifestError(f"copydetect: dataset root {base} is not an existing folder; {_FIX}")
    if edits_per_original < 1 or holdout < 1:
        raise ManifestError(
            f"copydetect: edits_per_original={edits_per_original} and holdout={holdout} "
            "must be >= 1"
        )
    manifest = Path(output).expanduser().absolute() if output is not None else base / "manifest.csv"
    out_dir = manifest.parent
    held, pool = _layout(base, out_dir, holdout, seed)
    overlay_dir = base / "overlays"
    overlays = list_images(overlay_dir) if (base / "distractors").is_dir() else []
    params = {"edits_per_original": edits_per_original, "seed": seed, "holdout": holdout}
    key = _fingerprint(base, held, pool, overlays, params)
    record, folder = out_dir / "copydetect.json", out_dir / "queries"
    names = _query_names(held, edits_per_original)
    paths = [folder / name for queries in names for name, _ in queries]
    if _is_current(record, key, manifest, paths):
        return manifest
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"copydetect: writing {len(paths)} queries to {folder} ...")
    tmp = Path(tempfile.mkdtemp(prefix=".queries-", dir=out_dir))
    try:
        (tmp / _MARK).write_text("written by retrieval.datasets.copydetect\n", encoding="utf-8")
        _write_queries(tmp, base, held, names, overlays, seed)
        _replace_queries(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_manifest(_rows(base, held, pool, folder, names), manifest, root=base)
    summary = {"fingerprint": key, **params, "originals": len(held), "pool": len(pool)}
    summary.update(queries=len(paths), overlays=len(overlays))
    with atomic_write(record, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(summary, indent=2) + "\n")
    return manifest


def _rows(
    base: Path,
    held: list[Path],
    pool: list[Path],
    folder: Path,
    names: list[list[tuple[str, str]]],
) -> list[ManifestRow]:
    """The manifest: the pool trains; the test gallery is the held-out originals and the
    pool; each original's edited copies (in ``folder``) query it."""
    rows = [ManifestRow(p, _label(p, base), "train", False, False) for p in pool]
    rows += [ManifestRow(p, _label(p, base), "test", False, True) for p in held + pool]
    rows += [
        ManifestRow(folder / name, _label(original, base), "test", True, False, {"edit": kind})
        for original, queries in zip(held, names, strict=True)
        for name, kind in queries
    ]
    return rows
