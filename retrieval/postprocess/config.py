"""Which search-time steps run and with what settings: the ``postprocess`` config node.

``python evaluate.py postprocess=[tta,whiten,aqe]`` composes one file per step from
``conf/postprocess/`` into ``{"tta": {...}, "whiten": {...}, "aqe": {...}}``; the steps always
run in the order of :data:`STEPS`, whatever the order they are listed in.

Every setting is checked on construction against the bounds below, so that settings read
from a file (a bundle's manifest) cannot ask a search for more work than a search is:
neighbour counts at most :data:`MAX_NEIGHBOURS`, weight exponents at most :data:`MAX_ALPHA`,
TTA at most :data:`MAX_SCALES` scales, a background of at most :data:`MAX_BACKGROUND` vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

from retrieval.infra.checks import positive_int

__all__ = ["STEPS", "AQE", "DBA", "Postprocess", "Rerank", "ScoreNorm", "TTA", "Whiten"]

#: The steps in the order they apply.
STEPS = ("tta", "whiten", "dba", "aqe", "rerank", "score_norm")
#: most neighbours any step reads per vector (k, top_n, k1, k2)
MAX_NEIGHBOURS = 1000
#: largest exponent of a neighbour weight ``max(score, 0) ** alpha``
MAX_ALPHA = 100.0
#: most TTA scales (each one, and its mirror, is a pass of the model)
MAX_SCALES = 16
#: most background vectors score normalisation samples and stores
MAX_BACKGROUND = 10_000_000


def _positive_int(value: Any, name: str, maximum: int = MAX_NEIGHBOURS) -> int:
    return positive_int(value, f"postprocess.{name}", maximum=maximum)


def _number(value: Any, name: str, low: float, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"postprocess.{name} must be a number in [{low}, {high}], got {value!r}")
    return float(value)


@dataclass(frozen=True)
class TTA:
    """Test-time augmentation inside the model: the image at each scale of its input size
    (and mirrored, with ``flip``) is embedded; the unit embeddings are summed and normalised."""

    scales: tuple[float, ...] = (1.0, 2**-0.5, 2**0.5)
    flip: bool = True

    def __post_init__(self) -> None:
        scales = tuple(self.scales)
        if not 1 <= len(scales) <= MAX_SCALES:
            raise ValueError(
                f"postprocess.tta.scales must list 1 to {MAX_SCALES} scales, got {len(scales)}"
            )
        for s in scales:
            _number(s, "tta.scales[]", 0.1, 4.0)
        if not isinstance(self.flip, bool):
            raise ValueError(f"postprocess.tta.flip must be true or false, got {self.flip!r}")
        object.__setattr__(self, "scales", tuple(float(s) for s in scales))

    @property
    def views(self) -> int:
        return len(self.scales) * (2 if self.flip else 1)


@dataclass(frozen=True)
class Whiten:
    """Whitening fitted on ``fit_on`` (``train``: the training split, labels available;
    ``gallery``: the searched vectors, unlabelled), see :func:`~.whitening.fit_whitening`.
    ``method``: ``pca``; ``learned`` from the training split's matching pairs (its labels);
    ``edits``: learned from pairs of each training image and a seeded edited copy of it
    (:mod:`retrieval.data.copy_edits`), which needs no labels: the directions that edits move
    are damped, as copy detection wants."""

    method: str = "pca"
    dim: int | None = None
    shrinkage: float = 0.0
    fit_on: str = "train"

    def __post_init__(self) -> None:
        if self.method not in ("pca", "learned", "edits"):
            raise ValueError(
                "postprocess.whiten.method must be 'pca', 'learned' or 'edits', got "
                f"{self.method!r}"
            )
        if self.dim is not None:
            positive_int(self.dim, "postprocess.whiten.dim")
        _number(self.shrinkage, "whiten.shrinkage", 0.0, 1.0)
        if self.fit_on not in ("train", "gallery"):
            raise ValueError(
                f"postprocess.whiten.fit_on must be 'train' or 'gallery', got {self.fit_on!r}"
            )
        if self.method != "pca" and self.fit_on != "train":
            raise ValueError(
                f"postprocess.whiten.method={self.method} is fitted on the training split: "
                "use whiten.fit_on=train"
            )


@dataclass(frozen=True)
class _Neighbours:
    """A vector mixed with ``k`` neighbours' vectors weighted ``max(score, 0) ** alpha``."""

    _step: ClassVar[str]
    k: int = 3
    alpha: float = 3.0

    def __post_init__(self) -> None:
        _positive_int(self.k, f"{self._step}.k")
        _number(self.alpha, f"{self._step}.alpha", 0.0, MAX_ALPHA)


@dataclass(frozen=True)
class DBA(_Neighbours):
    """Database-side augmentation over ``k`` vectors (the item and its k - 1 neighbours)."""

    _step: ClassVar[str] = "dba"


@dataclass(frozen=True)
class AQE(_Neighbours):
    """α-query expansion with a query's first ``k`` results."""

    _step: ClassVar[str] = "aqe"


@dataclass(frozen=True)
class Rerank:
    """k-reciprocal re-ranking of the first ``top_n`` results (at least the k asked for)."""

    top_n: int = 50
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self) -> None:
        for name in ("top_n", "k1", "k2"):
            _positive_int(getattr(self, name), f"rerank.{name}")
        _number(self.lambda_value, "rerank.lambda_value", 0.0, 1.0)


@dataclass(frozen=True)
class ScoreNorm:
    """Score normalisation (SSCD): every score of a query minus ``beta`` times the query's
    similarity to its ``k``-th nearest neighbour among ``background`` vectors of the training
    split (a seeded sample), which a bundle stores; see :mod:`.score_norm`."""

    k: int = 1
    beta: float = 1.0
    background: int = 20_000

    def __post_init__(self) -> None:
        _positive_int(self.k, "score_norm.k")
        _number(self.beta, "score_norm.beta", 0.0, 10.0)
        _positive_int(self.background, "score_norm.background", MAX_BACKGROUND)


_TYPES = {
    "tta": TTA,
    "whiten": Whiten,
    "dba": DBA,
    "aqe": AQE,
    "rerank": Rerank,
    "score_norm": ScoreNorm,
}


@dataclass(frozen=True)
class Postprocess:
    """The chosen steps (``None``: off). Build from a config node with :meth:`from_dict`."""

    tta: TTA | None = None
    whiten: Whiten | None = None
    dba: DBA | None = None
    aqe: AQE | None = None
    rerank: Rerank | None = None
    score_norm: ScoreNorm | None = None

    @classmethod
    def from_dict(cls, node: Mapping[str, Any] | None) -> Postprocess:
        """From ``{"whiten": {...}, "aqe": {...}}`` (a step's settings may be ``{}`` or
        ``None`` for its defaults). Raises ValueError naming an unknown step or setting."""
        steps: dict[str, Any] = {}
        for name, settings in dict(node or {}).items():
            if name not in _TYPES:
                raise ValueError(f"unknown postprocess step {name!r}; the steps: {list(STEPS)}")
            kind = _TYPES[name]
            given = dict(settings or {})
            known = {f.name for f in fields(kind)}
            unknown = sorted(set(given) - known)
            if unknown:
                raise ValueError(
                    f"unknown settings {unknown} of postprocess.{name}; known: {sorted(known)}"
                )
            if name == "tta" and "scales" in given:
                given["scales"] = tuple(given["scales"])
            steps[name] = kind(**given)
        return cls(**steps)

    @property
    def steps(self) -> list[str]:
        """Names of the steps that are on, in the order they apply."""
        return [name for name in STEPS if getattr(self, name) is not None]

    def __bool__(self) -> bool:
        return bool(self.steps)

    def up_to(self, step: str) -> Postprocess:
        """The steps that are on, up to and including ``step`` (the others off)."""
        keep = STEPS[: STEPS.index(step) + 1]
        return replace(self, **{n: None for n in STEPS if n not in keep})

    def without(self, *names: str) -> Postprocess:
        return replace(self, **{n: None for n in names})

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """``{step: settings}`` of the steps that are on (JSON-able), in the order they apply."""
        out = {}
        for name in self.steps:
            settings = asdict(getattr(self, name))
            if name == "tta":
                settings["scales"] = list(settings["scales"])
            out[name] = settings
        return out

    def describe(self) -> str:
        return "+".join(self.steps) or "none"
