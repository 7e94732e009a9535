"""What a faiss index is made of: its description, its cost per vector, training needs, removal.

All functions take CPU faiss indexes (the form that is trained, saved and loaded).
"""

from __future__ import annotations

from typing import Any

import numpy as np

ID_BYTES = 8  # faiss stores each IVF / IDMap id as an int64
LINK_BYTES = 4  # an HNSW neighbour link is an int32
HNSW_PER_VECTOR_BYTES = 8 + 4  # HNSW offsets (size_t) and levels (int) entries of a vector


def _unwrap(faiss: Any, index: Any) -> Any:
    """``index`` downcast to its concrete class, looking through IndexPreTransform layers.

    The caller must keep ``index`` alive while it uses the result (faiss owns the sub-index).
    """
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def apply_search_params(faiss: Any, index: Any, search_params: str, what: str) -> None:
    """Set FAISS ``ParameterSpace`` parameters such as ``"nprobe=16"`` on a CPU index."""
    if not search_params:
        return
    try:
        faiss.ParameterSpace().set_index_parameters(index, search_params)
    except RuntimeError as err:
        raise ValueError(
            f"cannot apply search_params {search_params!r} to a {what!r} index: {err}"
        ) from err


def _reverse_factory(index: Any) -> str | None:
    """``faiss.contrib.factory_tools.reverse_index_factory`` of ``index``, None where it does
    not know the index (its type, or a trained OPQ)."""
    try:
        from faiss.contrib.factory_tools import reverse_index_factory

        return str(reverse_index_factory(index))
    except (ImportError, NotImplementedError, AssertionError, AttributeError, RuntimeError):
        return None


def describe(faiss: Any, index: Any) -> str:
    """A factory-like description of ``index`` (``"HNSW32"``, ``"IVF64,PQ8x8"``).

    faiss files do not store the factory string, so loaded indexes are described by
    ``faiss.contrib.factory_tools.reverse_index_factory``; index types it does not know
    are described by their class name (``"IndexLSH"``).
    """
    return _reverse_factory(index) or type(faiss.downcast_index(index)).__name__


def _transform_type(faiss: Any, transform: Any) -> str:
    """A vector transform's class name; every linear one (PCA, OPQ, rotation) is
    ``LinearTransform``, as faiss files store them."""
    transform = faiss.downcast_VectorTransform(transform)
    linear = isinstance(transform, faiss.LinearTransform)
    return "LinearTransform" if linear else type(transform).__name__


def _types(faiss: Any, index: Any) -> list[str]:
    """Class names of ``index``'s layers, outside in: each pre-transform's vector transforms,
    then the index they feed (any flat one ``IndexFlat``)."""
    names, outer = [], faiss.downcast_index(index)
    layer = outer  # ``outer`` keeps the layers alive
    while isinstance(layer, faiss.IndexPreTransform):
        chain = layer.chain
        names += [_transform_type(faiss, chain.at(i)) for i in range(chain.size())]
        layer = faiss.downcast_index(layer.index)
    flat = isinstance(layer, faiss.IndexFlat)  # IndexFlatIP once read back from a file
    return [*names, "IndexFlat" if flat else type(layer).__name__]


def structure_mismatch(faiss: Any, index: Any, factory: str) -> str | None:
    """Why the CPU index ``index`` is not one ``factory`` builds (its dimension and metric),
    None when it is. Compared: the factory strings faiss reads back from both indexes
    (:func:`describe`), or where it cannot read one back, the types of their layers (so
    ``IVF16,Flat`` and ``IVF32,Flat`` differ, a trained and an untrained OPQ do not)."""
    try:
        fresh = faiss.index_factory(index.d, factory, index.metric_type)
    except RuntimeError:
        return f"cannot be described by {factory!r}, which is not a FAISS factory string"
    ours, theirs = _reverse_factory(index), _reverse_factory(fresh)
    if ours is not None and theirs is not None:
        same = ours == theirs
    else:
        same = _types(faiss, index) == _types(faiss, fresh)
    return None if same else f"is a {describe(faiss, index)!r} index, not a {factory!r} one"


def bytes_per_vector(faiss: Any, index: Any) -> float:
    """Bytes one more stored vector costs in ``index`` (its code, id and links).

    Per type: flat-code indexes (Flat, PQ, SQ) ``code_size``; IVF ``code_size`` + an 8-byte
    id; HNSW its storage's cost + the expected int32 links over its levels + 12 bytes of
    offsets and level; IDMap the inner cost + 8; refine both indexes' costs; pre-transforms
    their inner index. Fixed costs (centroids, codebooks, transforms) are not included. It
    is what the vector adds to the saved file; in RAM, growing vectors may add slack.

    Raises:
        ValueError: an index type with none of these layouts and no ``sa_code_size``.
    """
    inner = _unwrap(faiss, index)
    if isinstance(inner, faiss.IndexHNSW):
        hnsw = inner.hnsw
        probas = faiss.vector_to_array(hnsw.assign_probas)
        cum = faiss.vector_to_array(hnsw.cum_nneighbor_per_level)
        # a vector whose top level is l holds cum[l + 1] link slots (used or not)
        links = float(np.dot(probas, cum[1 : len(probas) + 1]))
        storage = bytes_per_vector(faiss, inner.storage)
        return storage + LINK_BYTES * links + HNSW_PER_VECTOR_BYTES
    if isinstance(inner, faiss.IndexIVF):
        return float(inner.code_size + ID_BYTES)
    if isinstance(inner, faiss.IndexFlatCodes):
        return float(inner.code_size)
    if isinstance(inner, (faiss.IndexIDMap, faiss.IndexIDMap2)):
        return bytes_per_vector(faiss, inner.index) + ID_BYTES
    if isinstance(inner, faiss.IndexRefine):
        return bytes_per_vector(faiss, inner.base_index) + bytes_per_vector(
            faiss, inner.refine_index
        )
    try:
        return float(inner.sa_code_size())
    except RuntimeError as err:
        raise ValueError(
            f"cannot tell the bytes per vector of a {type(inner).__name__} index"
        ) from err


def min_train_rows(faiss: Any, index: Any) -> int:
    """Fewest training rows FAISS accepts: the IVF list count and/or PQ codebook size."""
    needed = 1
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        needed = max(needed, int(ivf.nlist))
    for holder in (ivf, index):
        pq = getattr(holder, "pq", None)
        if pq is not None:
            needed = max(needed, int(pq.ksub))
    return needed


def kmeans_of(faiss: Any, index: Any) -> list[tuple[str, int, str, Any]]:
    """The k-means runs that training ``index`` makes: ``(what, centroids, smaller, params)``
    for its inverted lists and its product-quantiser codebooks (one run per sub-quantiser, all
    with the same ClusteringParameters); ``smaller`` formats the factory part with fewer
    centroids (``{}`` is their log2)."""
    runs = []
    ivf = faiss.try_extract_index_ivf(index)
    holder = faiss.downcast_index(ivf) if ivf is not None else index
    if ivf is not None:
        nlist = int(ivf.nlist)
        runs.append((f"{nlist} inverted lists", nlist, "IVF{lists}", ivf.cp))
    pq = getattr(holder, "pq", None)
    if pq is not None:
        m, ksub = int(pq.M), int(pq.ksub)
        runs.append((f"{m} PQ codebooks of {ksub} codes", ksub, f"PQ{m}x{{bits}}", pq.cp))
    return runs


def few_training_rows(faiss: Any, index: Any, n: int, factory: str) -> str | None:
    """Make faiss's k-means of ``index`` quiet about ``n`` training rows being fewer than it
    recommends (it prints a line per k-means run, 33 for ``IVF256,PQ32``), and return the
    one line that says so instead, with the fix; None when ``n`` is enough."""
    short = []
    for what, k, smaller, cp in kmeans_of(faiss, index):
        per = int(cp.min_points_per_centroid)
        if n < k * per:
            short.append((what, k * per, smaller, per))
        cp.min_points_per_centroid = 1
    if not short:
        return None
    per = short[0][3]
    bits = max(1, min(8, int(np.log2(max(n // per, 2)))))
    needs = ", ".join(f"{wanted} for its {what}" for what, wanted, _, _ in short)
    fewer = " and ".join(smaller.format(lists=2**bits, bits=bits) for _, _, smaller, _ in short)
    return (
        f"index {factory!r} is trained on {n} vectors, fewer than its k-means wants ({per} a "
        f"centroid: {needs}); it works, with lower recall than it could have: train it on "
        f"more vectors (more images), or give it fewer centroids ({fewer} suit {n} vectors)"
    )


def remove_ids(faiss: Any, index: Any, ids: np.ndarray, what: str) -> None:
    """Remove the vectors ``ids`` from ``index`` and renumber the rest ``0 .. ntotal - 1``.

    faiss's flat-code indexes compact their storage on removal (later ids shift down), but
    IVF indexes keep the removed ids as gaps, so the next ``add`` (ids from ``ntotal``)
    would reuse ids still in the index. IVF ids are therefore renumbered here the same way
    as a flat index's: each remaining id drops by the number of removed ids below it.

    Args:
        faiss: the faiss module.
        index: a CPU faiss index.
        ids: (n,) sorted, unique int64 ids in ``[0, index.ntotal)``.
        what: how to name the index in messages.

    Raises:
        ValueError: HNSW indexes and other types that cannot remove vectors.
    """
    inner = _unwrap(faiss, index)
    if isinstance(inner, faiss.IndexHNSW):
        raise ValueError(
            f"HNSW indexes cannot remove vectors; rebuild the {what!r} index without them"
        )
    try:
        index.remove_ids(ids)
    except RuntimeError as err:
        raise ValueError(
            f"a {what!r} index cannot remove vectors ({err}); rebuild it without them"
        ) from err
    if isinstance(inner, faiss.IndexIVF):
        _renumber_ivf(faiss, inner, ids)


def _renumber_ivf(faiss: Any, ivf: Any, removed: np.ndarray) -> None:
    """Close the id gaps left by removing the sorted ids ``removed`` from an IVF index."""
    invlists = ivf.invlists
    code_size = int(invlists.code_size)
    for list_no in range(int(invlists.nlist)):
        n = int(invlists.list_size(list_no))
        if n == 0:
            continue
        old = faiss.rev_swig_ptr(invlists.get_ids(list_no), n).copy()
        new = np.ascontiguousarray(old - np.searchsorted(removed, old), dtype=np.int64)
        if np.array_equal(new, old):
            continue
        codes = faiss.rev_swig_ptr(invlists.get_codes(list_no), n * code_size).copy()
        invlists.update_entries(list_no, 0, n, faiss.swig_ptr(new), faiss.swig_ptr(codes))
