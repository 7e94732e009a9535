"""The one wrapper of FAISS: the only package of ``retrieval`` that imports ``faiss``.

- :class:`EmbeddingIndex`: inner-product index over L2-normalised float32 embeddings, built
  from a FAISS factory string; search, add, remove, save / load with checksums, GPU placement.
- :func:`kmeans`: k-means cluster assignments of embeddings (for NMI).
- :func:`knn_recall`: recall of an approximate index's neighbours against exact search.
- :mod:`retrieval.index.build`: an index built from ``.npy`` shards larger than memory
  (:func:`build_index`: trained on a sample drawn across them, filled chunk by chunk) and
  :class:`ShardSet`, a finished folder of ``embed.py`` shards.
- :func:`exact_self_knn`: exact leave-one-out neighbours of a set of vectors at half the
  flops of a search (symmetric blocks), worth it where :func:`self_join_pays_off`;
  :func:`drop_self` removes each query's own id from ``k + 1`` search results.

faiss is imported lazily, so the rest of the package imports without it and a missing
install fails with a clear ImportError only when an index is used.
"""

from retrieval.index.build import ShardSet, build_index
from retrieval.index.embedding_index import EmbeddingIndex
from retrieval.index.kmeans import kmeans
from retrieval.index.quality import knn_recall
from retrieval.index.self_knn import drop_self, exact_self_knn, self_join_pays_off

__all__ = [
    "EmbeddingIndex",
    "ShardSet",
    "build_index",
    "drop_self",
    "exact_self_knn",
    "kmeans",
    "knn_recall",
    "self_join_pays_off",
]
