"""The one wrapper of FAISS: the only package of ``retrieval`` that imports ``faiss``.

- :class:`EmbeddingIndex`: inner-product index over L2-normalised float32 embeddings, built
  from a FAISS factory string; search, add, remove, save / load with checksums, GPU placement.
- :func:`kmeans`: k-means cluster assignments of embeddings (for NMI).
- :func:`knn_recall`: recall of an approximate index's neighbours against exact search.

faiss is imported lazily, so the rest of the package imports without it and a missing
install fails with a clear ImportError only when an index is used.
"""

from retrieval.index.embedding_index import EmbeddingIndex
from retrieval.index.kmeans import kmeans
from retrieval.index.quality import knn_recall

__all__ = ["EmbeddingIndex", "kmeans", "knn_recall"]
