"""The bundle's own description: ``manifest.json``, its format version and file checksums.

A bundle is a folder::

    manifest.json        this description (format, model, index, metrics, checksums)
    model.safetensors    Embedder weights        model.json   how to rebuild the Embedder
    model.ts             TorchScript              model.onnx   ONNX (dynamic batch)
    preprocessing.json   resize / crop / mean / std / colour mode
    items.sqlite         one row per vector: id, image path or URI, label, extra fields
    index.faiss          FAISS index snapshot (its checksum is recorded in items.sqlite)

Files that never change after export are checksummed here; ``items.sqlite`` and
``index.faiss`` change with every add / remove and carry their own integrity checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from retrieval.io import atomic_write, sha256_file

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST",
    "BundleError",
    "read_manifest",
    "verify_files",
    "write_manifest",
]

FORMAT_NAME = "retrieval-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MUTABLE = ("items.sqlite", "index.faiss")
_REQUIRED = ("format", "format_version", "embedding_dim", "metric", "index", "files")


class BundleError(ValueError):
    """A bundle is missing, foreign, from a newer format, tampered with or truncated."""


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
    for name, expected in manifest["files"].items():
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
