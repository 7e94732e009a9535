"""A bundle folder's parts for :class:`~retrieval.search.retriever.Retriever`, checked as they
are opened (format version, checksums, preprocessing fields, embedding widths), and the
problems a whole-bundle check finds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from retrieval.backends.base import SearchBackend
from retrieval.bundle.format import (
    BACKGROUND,
    BundleError,
    read_json,
    read_manifest,
    stale_exports,
    verify_files,
)
from retrieval.bundle.items import IndexedItems
from retrieval.bundle.preprocess import Preprocessor
from retrieval.bundle.runtime import Runtime, load_runtime
from retrieval.postprocess import Postprocess

__all__ = ["bundle_problems", "load_background", "open_parts"]


def open_parts(
    folder: Path,
    runtime: str,
    threads: int | None,
    device: str,
    read_only: bool,
    backend: str | None,
) -> tuple[dict[str, Any], Preprocessor, Runtime, SearchBackend]:
    """``(manifest, preprocessor, model, items)`` of the bundle at ``folder``, opened as
    :meth:`Retriever.load <retrieval.search.retriever.Retriever.load>` describes (its
    arguments and errors)."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    pre_file = folder / "preprocessing.json"
    pre_fields = read_json(pre_file, missing=f"{pre_file} does not exist")
    try:
        pre = Preprocessor.from_dict(pre_fields)
    except ValueError as err:
        raise BundleError(f"{pre_file}: {err}") from err
    model = load_runtime(folder, kind=runtime, threads=threads, device=device)
    if model.embedding_dim != manifest["embedding_dim"]:
        raise BundleError(
            f"{folder}: the model gives {model.embedding_dim}-d embeddings but the manifest "
            f"says {manifest['embedding_dim']}"
        )
    if backend is None:
        items: SearchBackend = IndexedItems.open(folder, read_only=read_only)
    else:
        from retrieval.backends import open_backend

        items = open_backend(backend, int(manifest["embedding_dim"]), read_only=read_only)
    if items.dim != manifest["embedding_dim"]:
        items.close()
        raise BundleError(
            f"{folder}: the index holds {items.dim}-d vectors, not {manifest['embedding_dim']}-d"
        )
    return manifest, pre, model, items


def load_background(
    folder: Path, manifest: dict[str, Any], steps: Postprocess, dim: int
) -> np.ndarray | None:
    """The score-normalisation background of the bundle, ``(n, dim)`` float32, when its steps
    include ``score_norm`` (else None). The file is one the manifest checksums (checked when
    the bundle was opened), read without unpickling.

    Raises:
        BundleError: the step is on but the file is not listed, or not an (n, dim) float32
            array.
    """
    if steps.score_norm is None:
        return None
    path = folder / BACKGROUND
    if BACKGROUND not in manifest.get("files", {}):
        raise BundleError(
            f"{folder}/manifest.json asks for score_norm but lists no {BACKGROUND}: re-export "
            "the bundle"
        )
    try:
        background = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise BundleError(f"{path} cannot be read ({err}): re-export the bundle") from None
    if background.dtype != np.float32 or background.ndim != 2 or background.shape[1] != dim:
        raise BundleError(
            f"{path} holds {background.dtype} {background.shape}, not (n, {dim}) float32 "
            "vectors: re-export the bundle"
        )
    return background


def bundle_problems(folder: Path, manifest: dict[str, Any], items: SearchBackend) -> list[str]:
    """What :meth:`Retriever.verify <retrieval.search.retriever.Retriever.verify>` reports:
    the files against ``manifest``, ``items``' own check, and folders of interrupted exports
    beside ``folder``; ``[]`` when healthy."""
    problems = []
    try:
        verify_files(folder, manifest)
    except BundleError as err:
        problems.append(str(err))
    problems += items.verify()
    stale = stale_exports(folder)
    if stale:
        problems.append(
            f"folders left by an interrupted export beside {folder}: "
            f"{[p.name for p in stale]}; the next export to it removes them, or delete them"
        )
    return problems
