"""The bundle's own description: ``manifest.json``, its format version and file checksums.

A bundle is a folder::

    manifest.json        this description (format, model, index, metrics, checksums)
    model.safetensors    Embedder weights        model.json   how to rebuild the Embedder
    model.ts             TorchScript              model.onnx   ONNX (dynamic batch)
    preprocessing.json   resize / crop / mean / std / colour mode
    items.sqlite         one row per vector: id, image path or URI, label, extra fields
    index.faiss          FAISS index snapshot (its checksum is recorded in items.sqlite)
    score_norm_background.npy   only with postprocess score_norm: the (n, dim) float32
                         vectors queries are compared with (checksummed like the model)

Files that never change after export are checksummed here; ``items.sqlite`` and
``index.faiss`` change with every add / remove and carry their own integrity checks. Every
bundle has all of :data:`REQUIRED_FILES`, whatever its manifest lists.

An export writes into ``.{name}.tmp-XXXXXXXX`` beside the target ``name`` (and moves a
bundle it replaces to ``.{name}.old-XXXXXXXX`` for a moment), holding an ``flock`` on that
folder while it works: :func:`stale_exports` finds the ones a killed export left.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from retrieval.infra.io import atomic_write, sha256_file
from retrieval.infra.locks import folder_lock

__all__ = [
    "BACKGROUND",
    "BundleBusyError",
    "ReadOnlyError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "BundleError",
    "REQUIRED_FILES",
    "read_manifest",
    "stale_exports",
    "verify_files",
    "write_manifest",
]

FORMAT_NAME = "retrieval-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MUTABLE = ("items.sqlite", "index.faiss")
#: files every bundle has and its manifest checksums (the model's four, its preprocessing)
CHECKSUMMED = ("model.json", "model.safetensors", "model.ts", "model.onnx", "preprocessing.json")
REQUIRED_FILES = (*CHECKSUMMED, *MUTABLE)
#: the score-normalisation background (``postprocess.score_norm``), checksummed when present
BACKGROUND = "score_norm_background.npy"
#: an export folder younger than this may belong to an export that has not locked it yet
STALE_AFTER_S = 60.0
_REQUIRED = ("format", "format_version", "embedding_dim", "metric", "index", "files")


class BundleError(ValueError):
    """A bundle is missing, foreign, from a newer format, tampered with or truncated."""


class BundleBusyError(RuntimeError):
    """The bundle's items are already open for writing (in this or another process)."""


class ReadOnlyError(RuntimeError):
    """A change asked of a bundle opened read-only."""


def write_manifest(folder: str | Path, fields: dict[str, Any], files: list[str]) -> Path:
    """Write ``manifest.json`` into ``folder``: ``fields`` plus the format, its version and the
    sha256 of each of ``files`` (names relative to the folder). Atomic."""
    root = Path(folder)
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        **fields,
        "files": {name: sha256_file(root / name) for name in sorted(files)},
    }
    path = root / MANIFEST
    with atomic_write(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    return path


def update_manifest(folder: str | Path, **fields: Any) -> Path:
    """Set ``fields`` in a bundle's ``manifest.json`` (atomic), keeping every other field and
    the recorded checksums as they are (nothing is re-hashed: a file changed since the export
    still fails :func:`verify_files`)."""
    root = Path(folder)
    manifest = read_manifest(root)
    manifest.update(fields)
    files = manifest.pop("files")
    with atomic_write(root / MANIFEST, "w", encoding="utf-8") as handle:
        json.dump({**manifest, "files": files}, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")
    return root / MANIFEST


def read_json(path: Path, missing: str) -> Any:
    """The JSON value in one of a bundle's files. Raises BundleError: the message ``missing``
    when there is no such file, or one naming the file when it is not valid UTF-8 JSON."""
    if not path.is_file():
        raise BundleError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path} is not valid JSON: {err}") from None


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Read and check ``manifest.json`` (not the file checksums: see :func:`verify_files`).

    Raises:
        BundleError: no such folder or manifest, not JSON, not a bundle manifest, a format
            version newer than this software reads, or missing fields.
    """
    root = Path(folder)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist or is not a folder")
    manifest = read_json(path, missing=f"{root} is not a bundle: it has no {MANIFEST}")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise BundleError(f"{path} is not a {FORMAT_NAME} manifest")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise BundleError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise BundleError(
            f"{root} has bundle format version {version}, newer than the {FORMAT_VERSION} this "
            "version of retrieval reads: upgrade retrieval"
        )
    missing = [key for key in _REQUIRED if key not in manifest]
    if missing:
        raise BundleError(f"{path} lacks the fields {missing}")
    return manifest


def verify_files(folder: str | Path, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists exists and has its recorded sha256.

    Raises:
        BundleError: naming the first missing or altered file.
    """
    root = Path(folder)
    files = manifest["files"]
    if not isinstance(files, dict):
        raise BundleError(f"{root / MANIFEST}: 'files' must map file names to sha256 digests")
    unlisted = [name for name in CHECKSUMMED if name not in files]
    if unlisted:
        raise BundleError(
            f"{root / MANIFEST} does not list {unlisted}, which every bundle has: the manifest "
            "was altered or the export did not finish; re-export the bundle"
        )
    for name, expected in files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise BundleError(f"{root / MANIFEST} lists a file outside the bundle: {name!r}")
        path = root / name
        if not path.is_file():
            raise BundleError(f"bundle {root} is missing {name}")
        if sha256_file(path) != expected:
            raise BundleError(
                f"{path} does not match its checksum in {MANIFEST}: the file was altered or "
                "truncated"
            )


def _export_pattern(target: Path) -> re.Pattern[str]:
    return re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-[0-9a-f]{{8}}")


def stale_exports(target: str | Path, now: float | None = None) -> list[Path]:
    """Folders that an interrupted export to ``target`` left beside it: named exactly
    ``.{target name}.tmp-XXXXXXXX`` or ``.old-XXXXXXXX`` (8 hex digits), older than
    :data:`STALE_AFTER_S` and not locked by a running export. Sorted by name."""
    path = Path(target)
    pattern, now = _export_pattern(path), time.time() if now is None else now
    found = []
    try:
        siblings = list(path.parent.iterdir())
    except OSError:
        return []
    for sibling in siblings:
        if not pattern.fullmatch(sibling.name) or sibling.is_symlink() or not sibling.is_dir():
            continue
        try:
            if now - sibling.stat().st_mtime < STALE_AFTER_S:
                continue
            with folder_lock(sibling) as free:
                if free:
                    found.append(sibling)
        except OSError:  # removed meanwhile
            continue
    return sorted(found)
