"""The search-time stage: test-time augmentation, whitening, database-side augmentation,
α-query expansion, k-reciprocal re-ranking and score normalisation, as pure functions
(:mod:`.tta`, :mod:`.whitening`, :mod:`.steps`, :mod:`.rerank`, :mod:`.score_norm`, run around
a search by :mod:`.query`) chosen by one config (:class:`Postprocess`) and fitted on embeddings
by :mod:`.fitting`.

Where each runs: TTA and whitening are layers of the model (so every runtime of an exported
bundle computes them, parity-checked at export); DBA rewrites the gallery's vectors (a bundle
stores them, and applies it to items added later); αQE, re-ranking and score normalisation run
around a search, in evaluation and in :class:`~retrieval.search.retriever.Retriever` alike
(a bundle stores the background vectors the last one compares queries with).
"""

from retrieval.postprocess.config import (
    AQE,
    DBA,
    STEPS,
    TTA,
    Postprocess,
    Rerank,
    ScoreNorm,
    Whiten,
)
from retrieval.postprocess.fitting import (
    FittedSteps,
    fit_on_training_split,
    needs_training_split,
)
from retrieval.postprocess.query import (
    background_similarity,
    k_reciprocal_rerank,
    normalize_scores,
    sample_background,
    search_with_steps,
)
from retrieval.postprocess.steps import (
    alpha_query_expansion,
    database_augment,
    dba_vectors_for,
    tta_embed,
)
from retrieval.postprocess.whitening import Whitening, fit_whitening, whitening_for

__all__ = [
    "AQE",
    "DBA",
    "FittedSteps",
    "STEPS",
    "TTA",
    "Postprocess",
    "Rerank",
    "ScoreNorm",
    "Whiten",
    "Whitening",
    "alpha_query_expansion",
    "background_similarity",
    "database_augment",
    "dba_vectors_for",
    "fit_on_training_split",
    "fit_whitening",
    "k_reciprocal_rerank",
    "needs_training_split",
    "normalize_scores",
    "sample_background",
    "search_with_steps",
    "tta_embed",
    "whitening_for",
]
