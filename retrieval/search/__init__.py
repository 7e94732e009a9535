"""Searching an exported bundle: :class:`Retriever` opens a bundle folder (its model files,
preprocessing and items, or a search backend holding them) and answers ``search``, ``add`` and
``remove``; :func:`~retrieval.search.score.score_bundle` scores it the way users search it.

>>> from retrieval.search import Retriever  # doctest: +SKIP
>>> with Retriever.load("bundle") as retriever:  # doctest: +SKIP
...     hits = retriever.search(["query.jpg"], k=5)[0]
"""

from retrieval.search.retriever import AddReport, Hit, Retriever

__all__ = ["AddReport", "Hit", "Retriever"]
