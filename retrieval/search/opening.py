"""A bundle folder's parts for :class:`~retrieval.search.retriever.Retriever`, checked as they
are opened, and the problems a whole-bundle check finds.

A checksum shows a file is the one the manifest lists, not that the files belong together, so
the parts are also checked against each other: the format version, the checksums, the search
steps of the manifest (within their bounds), the preprocessing (its fields, and the input the
model takes: ``input_size`` and, with ``resize_mode=short``, ``any_size``), the embedding
widths, the manifest's ``index.factory`` (the factory string the item store records, which
the index file must build) and the item uris (none may lead outside the folder)."""

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
from retrieval.bundle.item_folder import check_item_uris, item_path
from retrieval.bundle.items import IndexedItems
from retrieval.bundle.preprocess import Preprocessor
from retrieval.bundle.runtime import Runtime, load_runtime
from retrieval.postprocess import Postprocess

__all__ = [
    "bundle_problems",
    "item_path",  # where an item uri of a bundle folder leads (for the service's files)
    "load_background",
    "manifest_steps",
    "open_parts",
]


def manifest_steps(folder: Path, manifest: dict[str, Any]) -> Postprocess:
    """The search steps of the manifest (``postprocess.steps``; none when absent). Raises
    BundleError naming the manifest and the step setting that is unknown or out of bounds."""
    try:
        return Postprocess.from_dict((manifest.get("postprocess") or {}).get("steps"))
    except (AttributeError, TypeError, ValueError) as err:
        raise BundleError(f"{folder}/manifest.json: {err}") from err


def _preprocessor(folder: Path, model: Runtime) -> Preprocessor:
    """``preprocessing.json``, checked to make the input ``model`` takes."""
    path = folder / "preprocessing.json"
    fields = read_json(path, missing=f"{path} does not exist")
    try:
        pre = Preprocessor.from_dict(fields)
    except ValueError as err:
        raise BundleError(f"{path}: {err}") from err
    if pre.input_size != model.input_size:
        raise BundleError(
            f"{path}: input_size {pre.input_size} does not match model.json, whose model takes "
            f"{model.input_size} px: the files come from different exports; re-export the bundle"
        )
    if pre.any_size != model.any_size:
        raise BundleError(
            f"{path}: resize_mode {pre.resize_mode!r} does not fit model.json (any_size "
            f"{str(model.any_size).lower()}): 'short' and 'long' go with a model exported for "
            "any size (any_size true), the other modes with any_size false; re-export the bundle"
        )
    return pre


def _check_items(folder: Path, manifest: dict[str, Any], items: IndexedItems) -> None:
    """The manifest's index factory is the items' (whose file :class:`IndexedItems` checked
    when it opened them), and no item uri leads outside ``folder``."""
    index = manifest["index"]
    factory = index.get("factory") if isinstance(index, dict) else None
    if factory != items.factory:
        raise BundleError(
            f"{folder}/manifest.json: index.factory {factory!r} does not describe the bundle's "
            f"index, a {items.factory!r} index (items.sqlite and index.faiss): the manifest was "
            "altered; re-export the bundle"
        )
    check_item_uris(folder)


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
    manifest_steps(folder, manifest)
    model = load_runtime(folder, kind=runtime, threads=threads, device=device)
    pre = _preprocessor(folder, model)
    if model.embedding_dim != manifest["embedding_dim"]:
        raise BundleError(
            f"{folder}: the model gives {model.embedding_dim}-d embeddings but the manifest "
            f"says {manifest['embedding_dim']}"
        )
    if backend is None:
        own = IndexedItems.open(folder, read_only=read_only)
        try:
            _check_items(folder, manifest, own)
        except BaseException:
            own.close()
            raise
        items: SearchBackend = own
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
