"""Precomputed embeddings in a ``.npz`` file, so any model's output can be scored.

Two layouts (arrays saved with ``numpy.savez``; object arrays are refused, nothing is unpickled):

- query / gallery: ``query`` (nq, d), ``query_labels`` (nq,), ``gallery`` (ng, d),
  ``gallery_labels`` (ng,); optional ``query_paths`` / ``gallery_paths`` (strings, for the
  report's picture);
- leave-one-out: ``embeddings`` (n, d), ``labels`` (n,); optional ``paths``.

Labels may be integers or strings.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retrieval.infra.io import atomic_write

__all__ = ["EmbeddingFile", "read_embeddings_npz", "write_embeddings_npz"]

_LAYOUTS = {
    "query/gallery": ("query", "query_labels", "gallery", "gallery_labels"),
    "leave-one-out": ("embeddings", "labels"),
}


@dataclass(frozen=True)
class EmbeddingFile:
    """Arrays of an embeddings file; ``gallery`` is None for leave-one-out."""

    query: np.ndarray
    query_labels: np.ndarray
    gallery: np.ndarray | None
    gallery_labels: np.ndarray | None
    query_paths: np.ndarray | None
    gallery_paths: np.ndarray | None


def _vectors(data: dict[str, np.ndarray], key: str, where: str) -> np.ndarray:
    arr = data[key]
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{where}: '{key}' must be a 2-D float array, got {arr.dtype} {arr.shape}")
    return arr


def _column(
    data: dict[str, np.ndarray], key: str, n: int, vectors_key: str, where: str
) -> np.ndarray:
    arr = data[key]
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(
            f"{where}: '{key}' has shape {arr.shape} but '{vectors_key}' has {n} rows: "
            "give one entry per vector"
        )
    if arr.dtype.kind not in "iuU":
        raise ValueError(f"{where}: '{key}' must hold integers or strings, got dtype {arr.dtype}")
    return arr


def read_embeddings_npz(path: str | Path) -> EmbeddingFile:
    """Read and check an embeddings file (layouts in the module docstring).

    Raises:
        ValueError: missing file, not an npz, object arrays, neither layout complete (the
            message lists the keys found and the keys expected), or lengths that disagree.
    """
    file = Path(path)
    where = str(file)
    if not file.is_file():
        raise ValueError(f"embeddings file {file} does not exist")
    try:
        with np.load(file, allow_pickle=False) as npz:
            data = {key: npz[key] for key in npz.files}
    except ValueError as err:
        raise ValueError(f"{where}: object arrays are not accepted ({err})") from err
    except (OSError, EOFError, zipfile.BadZipFile) as err:  # truncated or damaged too
        raise ValueError(f"{where} is not a readable .npz file: {err}") from err
    found = sorted(data)
    layout = next((name for name, keys in _LAYOUTS.items() if set(keys) <= set(data)), None)
    if layout is None:
        expected = " or ".join("{" + ", ".join(keys) + "}" for keys in _LAYOUTS.values())
        raise ValueError(f"{where}: has keys {found}; expected {expected}")
    if layout == "leave-one-out":
        x = _vectors(data, "embeddings", where)
        labels = _column(data, "labels", len(x), "embeddings", where)
        paths = _column(data, "paths", len(x), "embeddings", where) if "paths" in data else None
        return EmbeddingFile(x, labels, None, None, paths, None)
    q = _vectors(data, "query", where)
    g = _vectors(data, "gallery", where)
    return EmbeddingFile(
        q,
        _column(data, "query_labels", len(q), "query", where),
        g,
        _column(data, "gallery_labels", len(g), "gallery", where),
        _column(data, "query_paths", len(q), "query", where) if "query_paths" in data else None,
        _column(data, "gallery_paths", len(g), "gallery", where)
        if "gallery_paths" in data
        else None,
    )


def write_embeddings_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write arrays in one of the layouts above, atomically (temp file, then rename)."""
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
