"""``Retriever``: load a bundle and search it from Python. No Hydra, no Lightning, no training
code: the model runs through ONNX Runtime, TorchScript or a rebuilt PyTorch module.

    with Retriever.load("bundle") as retriever:
        hits = retriever.search(["photo.jpg"], k=10)[0]
        retriever.add(["new1.jpg", "new2.jpg"])  # durable when it returns
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from retrieval.backends.base import SearchBackend
from retrieval.bundle.format import BundleError
from retrieval.bundle.preprocess import Preprocessor
from retrieval.bundle.records import Item
from retrieval.bundle.runtime import Runtime
from retrieval.data.images import DEFAULT_MAX_PIXELS, ImageInput
from retrieval.infra.checks import positive_int, vectors
from retrieval.postprocess import Postprocess, Rerank, search_with_steps
from retrieval.search.adding import add_files
from retrieval.search.duplicate_finder import DuplicateReport, choose_threshold, item_duplicates
from retrieval.search.opening import bundle_problems, load_background, open_parts
from retrieval.search.prefetch import chunks, prefetched
from retrieval.search.results import AddReport, Hit, row_hits

__all__ = ["Retriever"]

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
        preprocessor: Preprocessor,
        runtime: Runtime,
        items: SearchBackend,
        max_pixels: int,
    ) -> None:
        self.folder = folder
        self.manifest = manifest
        self.preprocessor = preprocessor
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

    def prepare(self, image: ImageSource, max_pixels: int | None = None) -> np.ndarray:
        """One image (path, encoded bytes or PIL image) decoded and preprocessed into the
        model's input: (3, size, size) float32 (``resize_mode=short``: short side ``size``).
        ``max_pixels`` lowers the bundle's pixel limit for this call. Files and bytes go
        through :meth:`Preprocessor.prepare` (a large JPEG decoded at a reduced scale), as the
        service's uploads do, so an image gives the same vector whether it is indexed,
        searched here or uploaded. Raises ImageLoadError
        (ImageTooLargeError over the pixel limit) naming the image."""
        if isinstance(image, Image.Image):  # converted to RGB (alpha onto white) as files are
            return self.preprocessor(image)
        limit = self.max_pixels if max_pixels is None else min(max_pixels, self.max_pixels)
        return self.preprocessor.prepare(image, limit)

    def embed_pixels(self, pixels: Sequence[np.ndarray]) -> np.ndarray:
        """Embeddings of preprocessed images (each as :meth:`prepare` returns it, shapes may
        differ under ``resize_mode=short``): (B, dim) float32 unit rows, in order."""
        return self.runtime.embed_many(pixels)

    def embed(self, images: Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """Embeddings of ``images`` (paths, encoded bytes or PIL images): (n, dim) float32,
        unit rows. Raises ImageLoadError naming the first image that cannot be read."""
        if isinstance(images, (str, os.PathLike, bytes, bytearray, Image.Image)):
            raise TypeError("pass a list of images, e.g. search([path]), not a single image")
        out = [np.empty((0, self.dim), np.float32)]
        for batch in prefetched(chunks(list(images), batch_size), self._prepare_all):
            out.append(self.runtime.embed_many(batch))
        return np.concatenate(out)

    def _prepare_all(self, images: Sequence[ImageSource]) -> list[np.ndarray]:
        return [self.prepare(image) for image in images]

    def _as_queries(
        self, queries: np.ndarray | Sequence[ImageSource], batch_size: int
    ) -> np.ndarray:
        if isinstance(queries, np.ndarray) and queries.dtype.kind == "f":
            x = queries.reshape(1, -1) if queries.ndim == 1 else queries
            x = vectors(x, "query vectors", dim=self.dim)
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
            self.preprocessor,
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
        return item_duplicates(self.items, chosen, keep, protect, k, folder=self.folder)

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
