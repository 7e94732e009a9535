"""Finding the duplicates of a folder or a bundle (:func:`find_duplicates`, behind
``retrieval duplicates``): the images described and embedded, a threshold chosen, the groups
formed by :func:`~retrieval.search.duplicates.group_duplicates`.

A folder's images are described once (size, date, pixel size, sha256:
:class:`~retrieval.search.duplicates.FileFacts`) and embedded with a bundle's model or the
default pretrained one (:func:`default_model`), kept in a cache keyed by the file's path,
size and mtime, so that a second scan of an unchanged folder embeds nothing.

Thresholds come from a calibration (:func:`calibration`, on ``data=copydetect``'s
originals, edited copies and distractors): the bundle manifest's ``duplicates`` entry, or for
the default model the one shipped with the package (``default_duplicates.json``, written by
``scripts/calibrate_duplicates.py``). A calibration also fixes how scores are normalised.

The cache is one SQLite file per model (``<cache dir>/<model key>.sqlite``); a file whose size
or mtime changed is embedded again and its row replaced. Rows are written after each batch
in one transaction: an interrupted scan keeps what it finished.

A static page of duplicate groups (``retrieval duplicates --html DIR``): ``DIR/index.html``
and a thumbnail of every member under ``DIR/thumbs/``, no script and nothing fetched from
elsewhere. Groups come in the order given (the most space freed first); in each, the keeper is
marked and every copy shows its kind, score, pixel size and file size.
"""

from __future__ import annotations

import hashlib
import html
import io
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.bundle.runtime import Runtime
from retrieval.data.images import DEFAULT_MAX_PIXELS, ImageLoadError, images_in_folder, open_rgb
from retrieval.data.preprocessing import Preprocessing
from retrieval.infra.io import atomic_write
from retrieval.search.duplicates import (
    DuplicateGroup,
    FileFacts,
    Member,
    Normalisation,
    background_floor,
    calibrate,
    group_duplicates,
    readable_size,
    threshold_for,
)
from retrieval.search.prefetch import chunks, prefetched

__all__ = [
    "DuplicateReport",
    "EmbeddingCache",
    "FolderScan",
    "default_model",
    "exif_date",
    "find_duplicates",
    "protect_files",
    "same_pixels",
    "scan_files",
    "write_page",
]


_EXIF_IFD, _DATE_ORIGINAL = 0x8769, 36867


def exif_date(image: Image.Image) -> float | None:
    """The EXIF ``DateTimeOriginal`` of an opened image as epoch seconds (read as UTC), or
    None when it has none or it does not parse."""
    try:
        text = image.getexif().get_ifd(_EXIF_IFD).get(_DATE_ORIGINAL)
        if not isinstance(text, str):
            return None
        when = datetime.strptime(text.strip("\x00 ")[:19], "%Y:%m:%d %H:%M:%S")
    except (ValueError, TypeError, OSError, AttributeError):
        return None
    return when.replace(tzinfo=timezone.utc).timestamp()


def same_pixels(a: str | Path, b: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether two image files decode to the same RGB pixels (EXIF orientation applied);
    False when either cannot be read."""
    try:
        first, second = open_rgb(a, max_pixels), open_rgb(b, max_pixels)
    except ImageLoadError:
        return False
    return first.size == second.size and first.tobytes() == second.tobytes()


class EmbeddingCache:
    """Embeddings and facts of files, keyed by resolved path, size and mtime (ns), in the
    SQLite file ``path``. A context manager; ``close()`` commits."""

    def __init__(self, path: str | Path, dim: int) -> None:
        self.path, self.dim = Path(path), int(dim)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # read by the prefetching thread, written by the caller's: one connection, one lock
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._lock = threading.Lock()
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, size INTEGER, "
            "mtime_ns INTEGER, sha256 TEXT, width INTEGER, height INTEGER, date REAL, "
            "vector BLOB)"
        )

    def get(self, path: str, size: int, mtime_ns: int) -> tuple[FileFacts, np.ndarray] | None:
        with self._lock:
            row = self._db.execute(
                "SELECT sha256, width, height, date, vector FROM files "
                "WHERE path = ? AND size = ? AND mtime_ns = ?",
                (path, size, mtime_ns),
            ).fetchone()
        if row is None or len(row[4]) != 4 * self.dim:
            return None
        facts = FileFacts(path, size, row[1], row[2], row[3], row[0])
        return facts, np.frombuffer(row[4], dtype=np.float32).copy()

    def put(self, rows: Sequence[tuple[FileFacts, int, np.ndarray]]) -> None:
        """Store ``(facts, mtime_ns, vector)`` rows in one transaction."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        f.path,
                        f.bytes,
                        mtime,
                        f.sha256,
                        f.width,
                        f.height,
                        f.date,
                        np.asarray(v, np.float32).tobytes(),
                    )
                    for f, mtime, v in rows
                ],
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class FolderScan:
    """What :func:`scan_files` found: ``facts`` and ``vectors`` (n, dim) of the readable
    files in the order given, ``unreadable`` ``(path, reason)`` and how many were embedded
    now rather than read from the cache."""

    facts: list[FileFacts]
    vectors: np.ndarray
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    embedded: int = 0


@dataclass
class _Loaded:
    count: int
    done: list[tuple[int, FileFacts, np.ndarray]] = field(default_factory=list)
    todo: list[tuple[int, FileFacts, int, np.ndarray]] = field(default_factory=list)
    unreadable: list[tuple[str, str]] = field(default_factory=list)


def _load(
    batch: Sequence[tuple[int, Path]],
    preprocessing: Preprocessing,
    cache: EmbeddingCache | None,
    max_pixels: int,
) -> _Loaded:
    """Facts of one batch, with the cached vectors found and the others' model inputs."""
    loaded = _Loaded(len(batch))
    for position, path in batch:
        name = str(path)
        try:
            stat = path.stat()
            hit = cache.get(name, stat.st_size, stat.st_mtime_ns) if cache else None
            if hit is not None:
                loaded.done.append((position, *hit))
                continue
            data = path.read_bytes()
            pixels = preprocessing.prepare(data, max_pixels, name=name)
            with Image.open(io.BytesIO(data)) as image:  # the header of the bytes read
                width, height, date = image.width, image.height, exif_date(image)
        except (OSError, ImageLoadError, ValueError) as err:
            loaded.unreadable.append((name, str(err)))
            continue
        digest = hashlib.sha256(data).hexdigest()
        when = date if date is not None else stat.st_mtime
        facts = FileFacts(name, len(data), width, height, when, digest)
        loaded.todo.append((position, facts, stat.st_mtime_ns, pixels))
    return loaded


def scan_files(
    paths: Sequence[str | Path],
    preprocessing: Preprocessing,
    runtime: Runtime,
    cache: EmbeddingCache | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    batch_size: int = 32,
    progress: Callable[[int], Any] | None = None,
) -> FolderScan:
    """Facts and embeddings of image files (resolved paths), from ``cache`` where a file's
    size and mtime are unchanged, else read, hashed and embedded (and stored in ``cache``).
    Files that cannot be read are listed in ``unreadable`` and left out."""
    resolved = [(i, Path(p).resolve()) for i, p in enumerate(paths)]
    found: dict[int, tuple[FileFacts, np.ndarray]] = {}
    unreadable: list[tuple[str, str]] = []
    embedded = 0
    load = partial(_load, preprocessing=preprocessing, cache=cache, max_pixels=max_pixels)
    for loaded in prefetched(chunks(resolved, batch_size), load):
        unreadable += loaded.unreadable
        found.update({pos: (facts, vec) for pos, facts, vec in loaded.done})
        if loaded.todo:
            vectors = runtime.embed_many([pixels for *_, pixels in loaded.todo])
            rows = [(f, m, v) for (_, f, m, _), v in zip(loaded.todo, vectors, strict=True)]
            if cache is not None:
                cache.put(rows)
            for (position, facts, _, _), vector in zip(loaded.todo, vectors, strict=True):
                found[position] = (facts, vector)
            embedded += len(loaded.todo)
        if progress is not None:
            progress(loaded.count)
    order = sorted(found)
    vectors = np.zeros((len(order), runtime.embedding_dim), dtype=np.float32)
    for row, position in enumerate(order):
        vectors[row] = found[position][1]
    return FolderScan([found[i][0] for i in order], vectors, unreadable, embedded)


def protect_files(facts: Sequence[FileFacts], folders: Sequence[Path]) -> list[FileFacts]:
    """``facts`` with ``protected`` set on the files under any of ``folders`` (resolved)."""
    roots = [Path(f).resolve() for f in folders]
    return [replace(f, protected=any(Path(f.path).is_relative_to(r) for r in roots)) for f in facts]


#: The calibration of the default model shipped with the package.
DEFAULT_CALIBRATION = Path(__file__).with_name("default_duplicates.json")


#: The pair precision the default threshold is chosen for.
DEFAULT_PRECISION = 0.98


#: The default cache folder (one SQLite file per model).
DEFAULT_CACHE = Path("~/.cache/retrieval/duplicates").expanduser()


@dataclass
class DuplicateReport:
    """What :func:`find_duplicates` found: the threshold used and where it came from, the
    groups, and the files that could not be read."""

    threshold: float
    threshold_source: str
    groups: list[DuplicateGroup]
    unreadable: list[tuple[str, str]]
    files: int
    embedded: int = 0
    #: a bundle's item id of each row (members' ``row``); empty for a folder
    ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "groups": [g.to_list() for g in self.groups],
            "unreadable": [{"path": p, "reason": r} for p, r in self.unreadable],
        }


def default_model(threads: int | None = None) -> tuple[Preprocessing, Runtime, str]:
    """``(preprocessing, runtime, cache key)`` of the default pretrained model: what
    ``python export.py`` exports with no options (EfficientNet-Lite0 with its ImageNet
    weights, GeM pooling, no head, the whole image squashed to 224), run eagerly on the CPU,
    without the bundle's whitening (which is learned from a dataset)."""
    import torch

    from retrieval.bundle.runtime import torch_runner
    from retrieval.models import Embedder, create_backbone

    if threads:
        torch.set_num_threads(threads)
    embedder = Embedder(create_backbone("tf_efficientnet_lite0"), None, "gem").eval()
    pre = embedder.preprocessing.with_size(None, "squash")
    config = {"output_dim": embedder.embedding_dim, "input_size": pre.input_size}
    runtime = Runtime("eager", "cpu", config, torch_runner(embedder, "cpu"))
    return pre, runtime, "default-lite0-gem-squash224-v1"


def read_calibration(path: Path) -> dict[str, Any]:
    """A calibration (``{"threshold", "precision", "table", ...}``) from a JSON file."""
    import json

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the duplicate calibration ({err})") from err
    if not isinstance(data, dict) or "threshold" not in data or "table" not in data:
        raise ValueError(f"{path}: not a duplicate calibration (needs threshold and table)")
    return data


@dataclass(frozen=True)
class Threshold:
    """The threshold a grouping uses: its ``value``, how it was chosen (``source``) and the
    :class:`~retrieval.search.duplicates.Normalisation` its scores are under (None: cosine)."""

    value: float
    source: str
    norm: Normalisation | None = None


def choose_threshold(
    calibration: dict[str, Any] | None,
    threshold: float | None,
    precision: float | None,
    where: str,
) -> Threshold:
    """``threshold`` itself when given, else the calibrated one for ``precision``, else the
    calibration's default; scores normalised as the calibration was (cosine without one)."""
    norm = None
    if calibration is not None and calibration.get("normalisation"):
        fields = calibration["normalisation"]
        norm = Normalisation(int(fields["k"]), float(fields["floor"]))
    if threshold is not None:
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"--threshold {threshold} is not a similarity in [-1, 1]")
        scale = "normalised similarity" if norm else "cosine similarity"
        return Threshold(float(threshold), f"given, {scale}", norm)
    if calibration is None:
        raise ValueError(
            f"{where} has no calibrated duplicate threshold: give one (a cosine similarity, "
            "e.g. 0.8: --threshold, or threshold= of GET /duplicates)"
        )
    on = calibration.get("calibrated_on", "calibration data")
    if precision is not None:
        chosen = threshold_for(calibration["table"], precision)
        return Threshold(chosen, f"pair precision {precision} on {on}", norm)
    share = calibration.get("precision", "?")
    return Threshold(
        float(calibration["threshold"]), f"default: pair precision {share} on {on}", norm
    )


def find_duplicates(
    target: str | Path,
    model: str | Path | None = None,
    threshold: float | None = None,
    precision: float | None = None,
    keep: str = "largest",
    protect: Sequence[str | Path] = (),
    k: int = 32,
    cache: str | Path | None = DEFAULT_CACHE,
    runtime: str = "auto",
    threads: int | None = None,
    progress: Callable[[int], Any] | None = None,
) -> DuplicateReport:
    """The duplicate groups of ``target``: a folder of images (embedded with the bundle
    ``model``, or the :func:`default_model`) or a bundle (its items). ``threshold`` (cosine)
    or ``precision`` (calibrated pair precision) choose the threshold, else the calibrated
    default; ``protect``: folders under the target whose files are always kept; ``cache``:
    the embedding cache folder (None: no cache). Raises ValueError naming a bad argument."""
    target = Path(target)
    if (target / "manifest.json").is_file():
        if model is not None:
            raise ValueError("a bundle target is grouped with its own model: drop --model")
        return _bundle_duplicates(target, threshold, precision, keep, protect, k, progress)
    if not target.is_dir():
        raise ValueError(f"{target} is neither a folder nor a bundle")
    root = target.resolve()
    folders = _protected_folders(protect, root)
    paths = images_in_folder(root)
    if threshold is not None:  # a bad value fails before any model loads
        choose_threshold(None, threshold, None, "")
    if model is not None:
        pre, run, key, calibration = _bundle_model(Path(model), runtime, threads)
    else:
        pre, run, key = default_model(threads)
        calibration = read_calibration(DEFAULT_CALIBRATION)
    chosen = choose_threshold(calibration, threshold, precision, str(model or "the default model"))
    store = (
        None if cache is None else EmbeddingCache(Path(cache) / f"{key}.sqlite", run.embedding_dim)
    )
    try:
        scan = scan_files(paths, pre, run, store, progress=progress)
    finally:
        if store is not None:
            store.close()
    facts = protect_files(scan.facts, folders)
    groups = group_duplicates(
        scan.vectors, facts, chosen.value, keep, k, _pixels_checker(facts), norm=chosen.norm
    )
    return DuplicateReport(
        chosen.value, chosen.source, groups, scan.unreadable, len(facts), scan.embedded
    )


def _protected_folders(protect: Sequence[str | Path], root: Path) -> list[Path]:
    folders = []
    for folder in protect:
        resolved = Path(folder).resolve()
        if not (resolved == root or resolved.is_relative_to(root)):
            raise ValueError(f"--protect {folder} is not inside the target folder {root}")
        if not resolved.is_dir():
            raise ValueError(f"--protect {folder} is not a folder")
        folders.append(resolved)
    return folders


def _pixels_checker(facts: Sequence[FileFacts]) -> Callable[[int, int], bool]:
    def check(i: int, j: int) -> bool:
        return same_pixels(facts[i].path, facts[j].path)

    return check


def _bundle_model(
    folder: Path, runtime: str, threads: int | None
) -> tuple[Preprocessing, Runtime, str, dict[str, Any] | None]:
    """A bundle's preprocessing and model (for embedding a folder), its cache key (the
    checksums of its model files) and its calibration, if it has one."""
    from retrieval.bundle.format import read_json, read_manifest, verify_files
    from retrieval.bundle.runtime import load_runtime

    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    pre_file = folder / "preprocessing.json"
    pre = Preprocessing.from_json(read_json(pre_file, missing=f"{pre_file} does not exist"))
    run = load_runtime(folder, kind=runtime, threads=threads)
    files = manifest.get("files", {})
    model_files = sorted(f"{n}={d}" for n, d in files.items() if n.startswith(("model.", "pre")))
    key = "bundle-" + hashlib.sha256("\n".join(model_files).encode()).hexdigest()[:24]
    return pre, run, key, manifest.get("duplicates")


def _bundle_duplicates(
    folder: Path,
    threshold: float | None,
    precision: float | None,
    keep: str,
    protect: Sequence[str | Path],
    k: int,
    progress: Callable[[int], Any] | None = None,
) -> DuplicateReport:
    """The duplicate groups of a bundle's active items, the bundle opened read-only."""
    from retrieval.bundle.format import read_manifest
    from retrieval.bundle.items import IndexedItems

    calibration = read_manifest(folder).get("duplicates")
    chosen = choose_threshold(calibration, threshold, precision, str(folder))
    items = IndexedItems.open(folder, read_only=True)
    try:
        return item_duplicates(items, chosen, keep, protect, k, progress, folder=Path(folder))
    finally:
        items.close()


def item_duplicates(
    items: Any,
    threshold: Threshold,
    keep: str = "largest",
    protect: Sequence[str | Path] = (),
    k: int = 32,
    progress: Callable[[int], Any] | None = None,
    folder: Path | None = None,
) -> DuplicateReport:
    """The duplicate groups of the active items of a bundle's item store (``IndexedItems``),
    from their stored vectors, sizes and dates read from their files where those still exist;
    ``threshold``: from :func:`choose_threshold`; ``folder``: the bundle's, which relative item
    uris start from (each member's path is the file the uri leads to). The report's
    ``ids`` give each row's item id (a member's ``row``)."""
    from retrieval.bundle.items import IndexedItems

    if not isinstance(items, IndexedItems):
        raise ValueError(
            "duplicates are grouped from the bundle's own item store: load the bundle without "
            f"a search backend (this one searches {items.describe()['kind']})"
        )
    ids = items.store.active_ids()
    records = [items.store.get(ids[i : i + 10_000].tolist()) for i in range(0, len(ids), 10_000)]
    flat = [r for chunk in records for r in chunk]
    folders = [Path(f).resolve() for f in protect]
    root = (folder or Path(".")).resolve()
    facts = protect_files([_item_facts(root, r.uri, r.content_sha256) for r in flat], folders)
    dim = int(items.dim)
    vectors = np.stack([r.vector for r in flat]) if flat else np.zeros((0, dim), np.float32)
    pixels = _pixels_checker(facts)
    groups = group_duplicates(
        vectors, facts, threshold.value, keep, k, pixels, progress, norm=threshold.norm
    )
    report = DuplicateReport(threshold.value, threshold.source, groups, [], len(facts))
    report.ids = [int(r.id) for r in flat]
    return report


def _item_facts(root: Path, uri: str, sha256: str | None) -> FileFacts:
    """What the file of a bundle item (of the bundle folder ``root``) tells, as far as it
    still exists; its path is where the uri leads (a relative uri under ``root``)."""
    from retrieval.bundle.format import BundleError
    from retrieval.bundle.items import item_path

    try:
        path = item_path(root, uri)
    except BundleError:  # a uri leading out of the folder names no file of the bundle's
        return FileFacts(uri, sha256=sha256)
    try:
        stat = path.stat()
        with Image.open(path) as image:
            width, height, date = image.width, image.height, exif_date(image)
    except (OSError, ValueError):
        return FileFacts(str(path), sha256=sha256)
    when = date if date is not None else stat.st_mtime
    return FileFacts(str(path), stat.st_size, width, height, when, sha256)


def calibration(
    vectors: np.ndarray,
    labels: Sequence[Any],
    where: str,
    precision: float = DEFAULT_PRECISION,
    norm_k: int = 20,
) -> dict[str, Any]:
    """A duplicate calibration from embeddings whose ``labels`` mark copies of one image (a
    label with two or more images: an original and its edited copies; the others are
    distractors), as ``data=copydetect``'s test split has them. Scores are normalised
    (:class:`~retrieval.search.duplicates.Normalisation`, ``norm_k``, the floor the median
    background similarity here). Precision counts the pairs with an image of a family of
    copies: whether two distractors are copies the labels do not say (one emoji in two skin
    tones, two sky charts of one constellation look alike). The default threshold is the
    lowest reaching pair ``precision`` (else the most precise). Returns ``{"threshold",
    "precision", "recall", "calibrated_on", "normalisation", "table"}``."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    sizes: dict[Any, int] = {}
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    known = {label for label, size in sizes.items() if size > 1}
    norm_k = min(norm_k, len(vectors) - 1)
    norm = Normalisation(norm_k, background_floor(vectors, norm_k))
    table = calibrate(vectors, labels, norm=norm, known=known)
    try:
        value = threshold_for(table, precision)
        chosen = next(r for r in table if r["threshold"] == value)
    except ValueError:  # nothing reaches it: the most precise threshold
        chosen = max(table, key=lambda r: (r["precision"], -r["threshold"]))
    return {
        "threshold": chosen["threshold"],
        "precision": round(chosen["precision"], 4),
        "recall": round(chosen["recall"], 4),
        "calibrated_on": f"{where}: {len(known)} images with their copies among "
        f"{len(vectors)} images",
        "normalisation": norm.to_dict(),
        "table": [
            {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()} for r in table
        ],
    }


THUMB = 200


_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 24px; color: #1d2327; background: #f6f7f7; }
h1 { font-size: 20px; margin: 0 0 4px; }
.summary { color: #50575e; margin-bottom: 20px; }
section { background: #fff; border: 1px solid #dcdcde; border-radius: 8px; padding: 12px 16px;
  margin-bottom: 16px; }
section h2 { font-size: 15px; margin: 0 0 10px; }
.members { display: flex; flex-wrap: wrap; gap: 12px; }
figure { margin: 0; width: 208px; border: 2px solid #dcdcde; border-radius: 6px; padding: 4px;
  background: #fff; }
figure.keep { border-color: #00a32a; }
figure img { width: 200px; height: 200px; object-fit: contain; background: #f0f0f1;
  display: block; }
figcaption { font-size: 12px; line-height: 1.4; margin-top: 4px; word-break: break-all; }
.badge { display: inline-block; border-radius: 4px; padding: 0 6px; font-weight: 600;
  color: #fff; background: #8c8f94; }
.keep .badge { background: #00a32a; }
.exact .badge { background: #2271b1; }
"""


def _thumbnail(path: str, target: Path) -> bool:
    try:
        image = open_rgb(path)
    except ImageLoadError:
        return False
    image.thumbnail((THUMB, THUMB), Image.Resampling.BILINEAR)
    with atomic_write(target, "wb") as handle:
        image.save(handle, format="JPEG", quality=85)
    return True


def _figure(member: Member, kind: str, thumb: str | None) -> str:
    label = "keep" if member.keep and member.kind == "keeper" else "kept" if member.keep else kind
    classes = " ".join(c for c in ("keep" if member.keep else "", kind) if c)
    pixels = f"{member.width}x{member.height}" if member.width else "?"
    image = f'<img src="{html.escape(thumb)}" alt="">' if thumb else "<p>(unreadable)</p>"
    return (
        f'<figure class="{classes}">{image}<figcaption><span class="badge">{label}</span> '
        f"{member.score:.3f} &middot; {pixels} &middot; {readable_size(member.bytes)}<br>"
        f"{html.escape(member.path)}</figcaption></figure>"
    )


def write_page(groups: Sequence[DuplicateGroup], folder: str | Path, threshold: float) -> Path:
    """Write the page of ``groups`` into ``folder`` (created; an ``index.html`` there is
    replaced); returns the page's path."""
    root = Path(folder)
    (root / "thumbs").mkdir(parents=True, exist_ok=True)
    freed = sum(g.freed_bytes for g in groups)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Duplicates</title><style>{_STYLE}</style></head><body>",
        "<h1>Duplicates</h1>",
        f"<p class='summary'>{len(groups)} groups at similarity threshold {threshold:.3f}; "
        f"removing the copies not kept would free {readable_size(freed)}.</p>",
    ]
    for number, group in enumerate(groups, start=1):
        figures = []
        shown = group.to_list()
        for position, member in enumerate(group.members):
            name = f"thumbs/{number:05d}-{position:02d}.jpg"
            ok = _thumbnail(member.path, root / name)
            figures.append(_figure(member, shown[position]["kind"], name if ok else None))
        parts.append(
            f"<section id='group-{number}'><h2>Group {number} &middot; {group.kind} &middot; "
            f"frees {readable_size(group.freed_bytes)}</h2><div class='members'>{''.join(figures)}"
            "</div></section>"
        )
    parts.append("</body></html>")
    page = root / "index.html"
    with atomic_write(page, "w", encoding="utf-8") as handle:
        handle.write("\n".join(parts))
    return page
