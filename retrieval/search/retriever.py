"""``Retriever``: load a bundle and search it from Python. No Hydra, no Lightning, no training
code: the model runs through ONNX Runtime, TorchScript or a rebuilt PyTorch module. What it
answers: :class:`Hit` (one result of a search) and :class:`AddReport` (what an add did).

    with Retriever.load("bundle") as retriever:
        hits = retriever.search(["photo.jpg"], k=10)[0]
        retriever.add(["new1.jpg", "new2.jpg"])  # durable when it returns

A bundle folder's parts are checked as they are opened, and :meth:`Retriever.verify` finds the
problems of a whole bundle.

A checksum shows a file is the one the manifest lists, not that the files belong together, so
the parts are also checked against each other: the format version, the checksums, the search
steps of the manifest (within their bounds), the preprocessing (its fields, and the input the
model takes: ``input_size`` and, with ``resize_mode=short``, ``any_size``), the embedding
widths, the manifest's ``index.factory`` (the factory string the item store records, which
the index file must build) and the item uris (none may lead outside the folder).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from retrieval.backends.base import SearchBackend
from retrieval.bundle.format import (
    BACKGROUND,
    BundleError,
    read_json,
    read_manifest,
    stale_exports,
    verify_files,
)
from retrieval.bundle.items import IndexedItems, check_item_uris, item_path
from retrieval.bundle.records import Item
from retrieval.bundle.runtime import Runtime, load_runtime
from retrieval.data.images import DEFAULT_MAX_PIXELS, ImageInput
from retrieval.data.preprocessing import Preprocessing
from retrieval.infra.checks import checked_vectors, positive_int
from retrieval.postprocess import Postprocess, Rerank, search_with_steps
from retrieval.search.adding import AddReport, add_files
from retrieval.search.duplicate_finder import DuplicateReport, choose_threshold, item_duplicates
from retrieval.search.prefetch import chunks, prefetched

if TYPE_CHECKING:
    from retrieval.bundle.records import Item

__all__ = [
    "AddReport",
    "Hit",
    "Retriever",
    "bundle_problems",
    "load_background",
    "manifest_steps",
    "open_parts",
    "row_hits",
]


@dataclass(frozen=True)
class Hit:
    """One search result: the item's id, its score (cosine similarity) and what it points to."""

    id: int
    score: float
    uri: str
    label: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def row_hits(scores: np.ndarray, ids: np.ndarray, records: Mapping[int, Item]) -> list[Hit]:
    """The hits of one result row ``(scores, ids)`` in its order, from the ``records`` read
    for its ids: empty slots (-1) and items missing from ``records`` or no longer active
    are left out."""
    hits = []
    for score, item_id in zip(scores, ids, strict=True):
        item = records.get(int(item_id))
        if item is None or not item.active:
            continue
        hits.append(Hit(item.id, float(score), item.uri, item.label, dict(item.extra)))
    return hits


def manifest_steps(folder: Path, manifest: dict[str, Any]) -> Postprocess:
    """The search steps of the manifest (``postprocess.steps``; none when absent). Raises
    BundleError naming the manifest and the step setting that is unknown or out of bounds."""
    try:
        return Postprocess.from_dict((manifest.get("postprocess") or {}).get("steps"))
    except (AttributeError, TypeError, ValueError) as err:
        raise BundleError(f"{folder}/manifest.json: {err}") from err


def _preprocessing(folder: Path, model: Runtime) -> Preprocessing:
    """``preprocessing.json``, checked to make the input ``model`` takes."""
    path = folder / "preprocessing.json"
    fields = read_json(path, missing=f"{path} does not exist")
    try:
        pre = Preprocessing.from_json(fields)
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
) -> tuple[dict[str, Any], Preprocessing, Runtime, SearchBackend]:
    """``(manifest, preprocessing, model, items)`` of the bundle at ``folder``, opened as
    :meth:`Retriever.load <retrieval.search.retriever.Retriever.load>` describes (its
    arguments and errors)."""
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    manifest_steps(folder, manifest)
    model = load_runtime(folder, kind=runtime, threads=threads, device=device)
    pre = _preprocessing(folder, model)
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


#: An image given by path, by its encoded bytes (or a binary file), or already decoded.
ImageSource = ImageInput | Image.Image


class Retriever:
    """A loaded bundle: its model, preprocessing and items. Build with :meth:`load`.

    Thread-safe: searches may run concurrently with each other and with :meth:`add` /
    :meth:`remove` (one writer at a time). One process owns a bundle at a time.
    """

    def __init__(
        self,
        folder: Path,
        manifest: dict[str, Any],
        preprocessing: Preprocessing,
        runtime: Runtime,
        items: SearchBackend,
        max_pixels: int,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.preprocessing = preprocessing
        self.runtime = runtime
        self.items = items
        self.max_pixels = max_pixels
        try:
            steps = Postprocess.from_dict((manifest.get("postprocess") or {}).get("steps"))
        except ValueError as err:
            raise BundleError(f"{folder}/manifest.json: {err}") from err
        #: the bundle's search-time steps; TTA and whitening live in its model, DBA in its
        #: stored vectors, αQE, re-ranking and score normalisation run in :meth:`search`
        self.steps = steps
        #: the vectors score normalisation compares queries with (None without that step)
        self.background = load_background(folder, manifest, steps, self.dim)

    @classmethod
    def load(
        cls,
        bundle: str | os.PathLike[str],
        runtime: str = "auto",
        threads: int | None = None,
        device: str = "auto",
        max_pixels: int = DEFAULT_MAX_PIXELS,
        read_only: bool = False,
        backend: str | None = None,
    ) -> Retriever:
        """Open a bundle after checking its format version and its files' checksums.

        Args:
            runtime: ``auto`` (ONNX Runtime when installed, else TorchScript), ``onnx``,
                ``torchscript`` or ``eager`` (PyTorch).
            threads: intra-op threads of the model (default: the runtime's).
            device: ``auto`` | ``cpu`` | ``cuda``.
            max_pixels: images with more pixels are refused before decoding.
            read_only: search only, beside the one process that may write to the bundle (e.g.
                ``retrieval serve``); it sees the items committed when it was loaded, and
                :meth:`add` / :meth:`remove` raise ReadOnlyError. Without it the bundle is
                held for writing, and a second writer gets BundleBusyError.
            backend: where the items are searched: None for the bundle's own index and store,
                or a Milvus collection, ``milvus://HOST:PORT/COLLECTION`` or
                ``milvus-lite:PATH[#COLLECTION]`` (filled by ``retrieval push``; see
                :mod:`retrieval.backends`); the bundle then gives the model and preprocessing.

        Raises:
            BundleError: missing or foreign folder, newer format, altered or truncated file.
            IndexStateError, StoreError: a missing or damaged ``index.faiss`` (rebuild it with
                ``IndexedItems.open(bundle, rebuild_index=True)``) or ``items.sqlite``; both
                are ValueErrors naming the file.
        """
        folder = Path(bundle)
        manifest, pre, model, items = open_parts(
            folder, runtime, threads, device, read_only, backend
        )
        return cls(folder, manifest, pre, model, items, max_pixels)

    @property
    def dim(self) -> int:
        return int(self.manifest["embedding_dim"])

    def __len__(self) -> int:
        return self.items.ntotal

    def prepare(
        self,
        image: ImageSource,
        max_pixels: int | None = None,
        name: str | None = None,
        check: Callable[[str], None] | None = None,
    ) -> np.ndarray:
        """The first stage of a search: one image (path, encoded bytes or PIL image) decoded
        and preprocessed into the model's input, (3, size, size) float32 (``resize_mode=short``:
        short side ``size``). ``max_pixels`` lowers the bundle's pixel limit for this call;
        ``name`` names the image in errors; ``check(stage)`` is called between the decode's
        stages (a deadline's check raises there). Files and bytes go through
        :meth:`Preprocessing.prepare` (a large JPEG decoded at a reduced scale), so an image
        gives the same vector whether it is indexed, searched here or uploaded to the service,
        which runs these same stages: :meth:`prepare`, :meth:`embed_pixels`, :meth:`search`
        of the vectors. Raises ImageLoadError (ImageTooLargeError over the pixel limit)
        naming the image."""
        if isinstance(image, Image.Image):  # converted to RGB (alpha onto white) as files are
            return self.preprocessing(image)
        limit = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        return self.preprocessing.prepare(image, limit, name, check)

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """The second stage of a search: embeddings of preprocessed images (each as
        :meth:`prepare` returns it, shapes may differ under ``resize_mode=short``): (B, dim)
        float32 unit rows, in order."""
        return self.runtime.embed_many(pixels)

    def embed(self, images: Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """Embeddings of ``images`` (paths, encoded bytes or PIL images): (n, dim) float32,
        unit rows. Raises ImageLoadError naming the first image that cannot be read."""
        if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
            raise TypeError("pass a list of images, e.g. search([path]), not a single image")
        out = [np.empty((0, self.dim), np.float32)]
        for batch in prefetched(chunks(list(images), batch_size), self._prepare_all):
            out.append(self.embed_pixels(batch))
        return np.concatenate(out)

    def _prepare_all(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        return [self.prepare(image) for image in images]

    def _as_queries(
        self, queries: np.ndarray | Sequence[ImageSource], batch_size: int
    ) -> np.ndarray:
        if isinstance(queries, np.ndarray) and queries.dtype.kind == "f":
            x = queries.reshape(1, -1) if queries.ndim == 1 else queries
            x = checked_vectors(x, "query vectors", dim=self.dim)
            norms = np.linalg.norm(x, axis=1, keepdims=True)
            if (norms == 0).any():
                raise ValueError("query vectors contain a zero vector")
            return np.ascontiguousarray(x / norms, dtype=np.float32)
        return self.embed(list(queries), batch_size)

    def search(
        self,
        queries: np.ndarray | Sequence[ImageSource],
        k: int = 10,
        batch_size: int = 32,
        label: str | None = None,
        rerank: bool | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` most similar items of each query, best first.

        Args:
            queries: images (paths, bytes, PIL images) or (n, dim) / (dim,) vectors
                (normalised here; vectors are in the bundle's space, after its model's
                TTA and whitening).
            k: results per query (fewer when the bundle holds fewer items; items removed
                while the search runs are left out and others searched for in their place).
            label: keep only items with this label: the exact top ``k`` among them for a
                Flat index, found through the store's label index (a label nobody has costs
                one look-up; αQE and re-ranking stay within the label's items).
            rerank: k-reciprocal re-ranking of the first results (scores are then the
                re-ranking's, see :func:`retrieval.postprocess.k_reciprocal_rerank`);
                ``None``: as the bundle was exported (``postprocess.rerank`` in its manifest),
                ``True`` with the bundle's settings or the defaults.
        """
        positive_int(k, "k")
        if rerank is not None and not isinstance(rerank, bool):
            raise ValueError(f"rerank must be true, false or None, got {rerank!r}")
        x = self._as_queries(queries, batch_size)
        if len(self) == 0 or len(x) == 0:
            return [[] for _ in range(len(x))]
        reranking = self.steps.rerank if rerank is None else None
        if rerank:
            reranking = self.steps.rerank or Rerank()
        want = k  # more when items found were removed before their rows were read
        while True:
            scores, ids = self._search_steps(x, want, reranking, label)
            hits = [self._hits(s, i)[:k] for s, i in zip(scores, ids, strict=True)]
            exhausted = ids.shape[1] < want or want >= len(self)
            rows_done = (len(h) == k or (i < 0).any() for h, i in zip(hits, ids, strict=True))
            if exhausted or all(rows_done):
                return hits
            want = min(len(self), want * 2)

    def _search_steps(
        self, x: np.ndarray, k: int, reranking: Rerank | None, label: str | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, ids)`` of the bundle's search among the items with ``label`` (all when
        None), with its αQE and ``reranking`` (both within the label's items) and its score
        normalisation."""
        if self.steps.aqe is None and reranking is None and self.steps.score_norm is None:
            return self.items.search(x, k, label=label)
        scores, ids, _ = search_with_steps(
            x,
            k,
            lambda q, n: self.items.search(q, n, label=label),
            lambda found: self.items.vectors(found.tolist()),
            aqe=self.steps.aqe,
            rerank=reranking,
            score_norm=self.steps.score_norm,
            background=self.background,
        )
        return scores, ids

    def _hits(self, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
        """The hits of one result row, without empty slots and without items removed since
        the index was searched (the index lock is released before the rows are read)."""
        return row_hits(scores, ids, self.items.hit_records([int(i) for i in ids if i >= 0]))

    def add(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Sequence[str | None] | None = None,
        batch_size: int = 32,
        progress: Callable[[int], None] | None = None,
    ) -> AddReport:
        """Embed and add image files; durable once this returns (a crash right after loses
        nothing). Files that cannot be decoded are skipped and listed; a file whose content
        (sha256) is already in the bundle is not added twice and is listed as a duplicate.

        Args:
            labels: one per path (None: unlabelled).
            progress: called with the number of files done after each batch.
        """
        return add_files(
            self.items,
            self.runtime,
            self.preprocessing,
            self.max_pixels,
            self.steps.dba,
            paths,
            labels,
            batch_size,
            progress,
        )

    def item(self, item_id: int) -> Item:
        """The stored item ``item_id`` (uri, label, extra, vector). Raises KeyError for an id
        the bundle never had or whose item was removed."""
        item = self.items.get([int(item_id)]).get(int(item_id))
        if item is None:
            raise KeyError(f"no item {item_id} (never added, or removed)")
        return item

    def remove(self, ids: Sequence[int]) -> list[int]:
        """Remove items by id (durable when this returns); unknown ids raise KeyError."""
        return self.items.remove([int(i) for i in ids])

    def duplicates(
        self,
        threshold: float | None = None,
        precision: float | None = None,
        keep: str = "largest",
        protect: Sequence[str | os.PathLike[str]] = (),
        k: int = 32,
    ) -> DuplicateReport:
        """The groups of exact and near copies among the bundle's items, the copy to keep
        first (:mod:`retrieval.search.duplicates`). ``threshold`` (cosine similarity) or
        ``precision`` (a pair precision of the bundle's calibration) choose the threshold,
        else the calibrated default; ``keep``: ``largest`` | ``oldest`` | ``newest`` |
        ``path``; ``protect``: folders whose files are always kept. The report's ``ids`` map
        each member's ``row`` to its item id. Raises ValueError for a bundle without a
        calibration and no ``threshold``, or a bad argument."""
        chosen = choose_threshold(
            self.manifest.get("duplicates"), threshold, precision, str(self.folder)
        )
        folders = [Path(p) for p in protect]
        return item_duplicates(self.items, chosen, keep, folders, k, folder=self.folder)

    def item_file(self, uri: str) -> Path:
        """The file of an item's ``uri``: an absolute path as it is, a relative one under the
        bundle folder. Raises BundleError for one that leads outside it."""
        return item_path(self.folder, uri)

    def verify(self) -> list[str]:
        """Problems found, ``[]`` when healthy: file checksums (and every file a bundle
        needs listed), every stored row, the index against the store, a sample of items
        found at their own place, and folders of interrupted exports beside the bundle."""
        return bundle_problems(self.folder, self.manifest, self.items)

    def info(self) -> dict[str, Any]:
        """A summary: format, model, dim, index, item count, metrics."""
        m = self.manifest
        return {
            "bundle": str(self.folder),
            "format_version": m["format_version"],
            "created": m.get("created"),
            "backbone": (m.get("protocol") or {}).get("model", {}).get("backbone"),
            "embedding_dim": m["embedding_dim"],
            "metric": m["metric"],
            "index": m["index"],
            "items": len(self),
            "runtime": self.runtime.kind,
            "metrics": m.get("metrics", {}),
            "metrics_note": (m.get("metrics_measured_on") or {}).get("note"),
            "postprocess": self.steps.to_dict(),
            "backend": self.items.describe(),
        }

    def close(self) -> None:
        """Snapshot unsaved changes and release the bundle."""
        self.items.close()

    def __enter__(self) -> Retriever:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
