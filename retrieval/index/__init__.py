"""The one wrapper of FAISS: the only package of ``retrieval`` that imports ``faiss``.

- :class:`EmbeddingIndex`: inner-product index over L2-normalised float32 embeddings, built
  from a FAISS factory string; search, add, remove, save / load with checksums, GPU placement
  in one class.
- :func:`kmeans`: k-means cluster assignments of embeddings (for NMI).
- :func:`knn_recall`: recall of an approximate index's neighbours against exact search.
- :mod:`retrieval.index.shards`: the folder of ``embed.py`` shards, written by resumable
  workers and read back as :class:`ShardSet`; shards larger than memory give an index a
  training sample drawn across them (:func:`~retrieval.index.shards.training_sample`) and
  their rows chunk by chunk (:func:`~retrieval.index.shards.iter_chunks`).
- :func:`sample_positions`: the rows of a training sample, the one draw every training
  sample of the package uses.
- :func:`exact_self_knn`: exact leave-one-out neighbours of a set of vectors at half the
  flops of a search (symmetric blocks), worth it where :func:`self_join_pays_off`;
  :func:`drop_self` removes each query's own id from ``k + 1`` search results.

faiss is imported lazily, so the rest of the package imports without it and a missing
install fails with a clear ImportError only when an index is used.
"""

from retrieval.index.embedding_index import EmbeddingIndex, knn_recall, sample_positions
from retrieval.index.kmeans import kmeans
from retrieval.index.self_knn import drop_self, exact_self_knn, self_join_pays_off
from retrieval.index.shards import ShardSet

__all__ = [
    "EmbeddingIndex",
    "ShardSet",
    "drop_self",
    "exact_self_knn",
    "kmeans",
    "knn_recall",
    "sample_positions",
    "self_join_pays_off",
]
