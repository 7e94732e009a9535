"""Duplicate groups: exact copies (the same bytes or the same pixels) and near copies (embeddings
above a similarity threshold), each group with the copy to keep first.

How groups are formed, and why they do not chain:

1. **Exact sets.** Files with the same sha256, or whose decoded pixels are equal (checked only
   for pairs whose embeddings are nearly identical, the only ones that can be), are merged into
   one node; its representative is the best copy by the keep rules.
2. **The neighbour graph.** Every image's ``k`` most similar other images (an exact index
   searched chunk by chunk: memory grows with ``n * k``, never ``n * n``), kept where the
   score reaches the threshold and made symmetric.
3. **Groups grown from a centre by average linkage.** Nodes are taken in order of how many
   near copies they have (most first, then by id): the first, the *centre*, is the image its
   copies gather around (an original, whose edited copies are each near it though not always
   near one another). Its unassigned near copies are offered to the group in order of their
   score with the centre (highest first, then by id); one joins when its mean score with the
   members so far reaches the threshold. The keeper is then the best member by the keep
   rules. So every member is within the threshold of the centre and, on average, of the
   members before it: a burst of frames, each close to the next, becomes short groups around
   their centres instead of one chain (no member more than two links from another), and two
   photos are never joined through a third that resembles both (its mean with the first and
   the third falls short), which single linkage would do. Which copy is kept never changes
   which images are grouped, so a calibration (made with one keep rule) holds for all of
   them. Anchoring the groups on the keeper instead found 0.85 of the copy pairs at the
   calibrated precision where growing them from the centre finds 0.94 (see
   experiments/2026-12-07_copydetect_neighbour_batches_cpu.md): the copy with the most pixels
   is often an edited one (a border, a rotation) that the other copies are far from. A node
   with more than ``k`` near copies links to its ``k`` most similar: raise ``k`` for very
   large exact-looking families.

Scores are cosine similarities, or under a :class:`Normalisation` (what a calibration
stores) the cosine minus the mean of the two images' background similarities, so that an image
among many look-alikes needs more to count as a copy. A member's score is its score with the
keeper (1.0 for exact copies), which may lie below the threshold: membership is decided by
the scores with the centre and the other members.

The keep rules (:data:`KEEP_RULES`) order copies by pixels, file size, date (EXIF
``DateTimeOriginal``, else the file's mtime) and path; protected files always come first and
are always kept.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retrieval.index import EmbeddingIndex, drop_self
from retrieval.infra.checks import positive_int

__all__ = [
    "KEEP_RULES",
    "DuplicateGroup",
    "FileFacts",
    "Member",
    "group_duplicates",
    "keep_ranks",
    "Graph",
    "Normalisation",
    "background_floor",
    "calibrate",
    "neighbour_graph",
    "pair_counts",
    "readable_size",
    "threshold_for",
]

#: ``--keep`` policies: the facts compared, most important first (``path`` ends every one).
KEEP_RULES: dict[str, tuple[str, ...]] = {
    "largest": ("pixels", "bytes", "oldest", "path"),
    "oldest": ("oldest", "pixels", "bytes", "path"),
    "newest": ("newest", "pixels", "bytes", "path"),
    "path": ("path",),
}
#: Embeddings at least this similar are checked for equal pixels (the same pixels give the
#: same embedding up to float rounding; different files rarely come this close).
SAME_PIXELS_SCORE = 0.9999


@dataclass(frozen=True)
class FileFacts:
    """What the keep rules and exact grouping read of one image; ``None`` where unknown (an
    item whose file is gone). ``date``: EXIF ``DateTimeOriginal`` or mtime, epoch seconds."""

    path: str
    bytes: int | None = None
    width: int | None = None
    height: int | None = None
    date: float | None = None
    sha256: str | None = None
    protected: bool = False

    @property
    def pixels(self) -> int | None:
        return None if self.width is None or self.height is None else self.width * self.height


@dataclass(frozen=True)
class Member:
    """One file of a group: ``kind`` ``keeper`` for the copy kept first, else ``exact`` or
    ``near`` (its relation to the keeper); ``keep`` is true for the keeper and protected
    files; ``score``: cosine similarity to the keeper."""

    row: int
    path: str
    kind: str
    score: float
    keep: bool
    width: int | None
    height: int | None
    bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        kind = "exact" if self.kind in ("keeper", "exact") else "near"
        return {
            "path": self.path,
            "kind": kind,
            "score": round(self.score, 6),
            "keep": self.keep,
            "width": self.width,
            "height": self.height,
            "bytes": self.bytes,
        }


@dataclass
class DuplicateGroup:
    """Copies of one image, the keeper first; ``kind`` ``exact`` when every member is an exact
    copy of the keeper, else ``near``."""

    members: list[Member] = field(default_factory=list)

    @property
    def kind(self) -> str:
        """``exact`` when every member is an exact copy of the keeper, else ``near``."""
        return "exact" if all(m.kind != "near" for m in self.members) else "near"

    @property
    def freed_bytes(self) -> int:
        """Bytes that removing every member not kept would free."""
        return sum(m.bytes or 0 for m in self.members if not m.keep)

    def to_list(self) -> list[dict[str, Any]]:
        """The members as dicts; the keeper's ``kind`` is ``exact`` when the group holds an
        exact copy of it, else ``near``."""
        out = [m.to_dict() for m in self.members]
        if out and not any(m.kind == "exact" for m in self.members):
            out[0]["kind"] = "near"
        return out


def readable_size(count: int | None) -> str:
    """A byte count as people read it (``3.8 KB``, decimal units); ``?`` when unknown."""
    if count is None:
        return "?"
    value = float(count)
    for unit in ("B", "KB", "MB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def keep_ranks(facts: Sequence[FileFacts], keep: str = "largest") -> np.ndarray:
    """Each file's position when all are sorted best-first by the ``keep`` rule (protected
    files first; unknown facts last within their rule): ``(n,)`` int64, 0 the best."""
    if keep not in KEEP_RULES:
        raise ValueError(f"--keep {keep!r}: choose one of {', '.join(KEEP_RULES)}")
    rules = KEEP_RULES[keep]
    inf = float("inf")

    def key(i: int) -> tuple[Any, ...]:
        f = facts[i]
        values: list[Any] = [not f.protected]
        for rule in rules:
            if rule == "pixels":
                values.append(-(f.pixels if f.pixels is not None else -1))
            elif rule == "bytes":
                values.append(-(f.bytes if f.bytes is not None else -1))
            elif rule == "oldest":
                values.append(f.date if f.date is not None else inf)
            elif rule == "newest":
                values.append(-f.date if f.date is not None else inf)
        return (*values, f.path, i)

    order = sorted(range(len(facts)), key=key)
    ranks = np.empty(len(facts), dtype=np.int64)
    ranks[order] = np.arange(len(facts))
    return ranks


@dataclass(frozen=True)
class Normalisation:
    """Local score normalisation, against hubs and dense families of look-alikes (as SSCD's
    score normalisation and CSLS): a pair's score is its cosine similarity minus the mean of
    the two images' *background similarities*, an image's similarity to its ``k``-th most
    similar other image, never below ``floor`` (``floor`` itself where the collection has
    ``k`` or fewer other images). An image in a crowd of look-alikes (one emoji in five skin
    tones, frames of one scene) then needs more to count as a copy than an isolated photo and
    its edited copy; an unrelated pair sits near or below 0."""

    k: int = 20
    floor: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return {"k": self.k, "floor": round(self.floor, 6)}

    def backgrounds(self, ranked: np.ndarray) -> np.ndarray:
        """The background similarity of each row of ``ranked`` (``(n, m)``: each image's
        similarities to the other images, best first): its ``k``-th column, at least
        ``floor``; ``floor`` when ``m < k``."""
        floor = np.full(len(ranked), self.floor, dtype=np.float32)
        return floor if ranked.shape[1] < self.k else np.maximum(floor, ranked[:, self.k - 1])


@dataclass(frozen=True)
class Graph:
    """A symmetric similarity graph over ``n`` rows as sorted edge lists: ``src``, ``dst``
    (int64, both directions of every edge, sorted by ``(src, dst)``), ``score`` (normalised
    when ``background`` is given) and ``raw`` (cosine); ``background``: each row's background
    similarity under a :class:`Normalisation` (None: scores are cosine similarities)."""

    n: int
    src: np.ndarray
    dst: np.ndarray
    score: np.ndarray
    raw: np.ndarray
    background: np.ndarray | None = None

    def at_least(self, threshold: float) -> Graph:
        """The edges whose score reaches ``threshold``, and those close enough to be exact
        copies (:data:`SAME_PIXELS_SCORE`)."""
        keep = (self.score >= threshold) | (self.raw >= SAME_PIXELS_SCORE)
        if keep.all():
            return self
        cut = (self.src[keep], self.dst[keep], self.score[keep], self.raw[keep])
        return Graph(self.n, *cut, self.background)

    def pair_scores(self, vectors: np.ndarray, rows: np.ndarray, other: int) -> np.ndarray:
        """The (normalised) scores of ``rows`` with row ``other``, from ``vectors``."""
        scores = vectors[rows] @ vectors[other]
        if self.background is not None:
            scores = scores - (self.background[rows] + self.background[other]) / 2
        return scores


def neighbour_graph(
    vectors: np.ndarray,
    threshold: float,
    k: int = 32,
    chunk_size: int = 4096,
    progress: Callable[[int], Any] | None = None,
    norm: Normalisation | None = None,
) -> Graph:
    """The edges from each row of ``vectors`` (unit float32) to the other rows among its
    ``k`` nearest whose (normalised, with ``norm``) score reaches ``threshold``, or whose
    cosine reaches :data:`SAME_PIXELS_SCORE`, made symmetric. Exact search, ``chunk_size``
    queries at a time (``progress(rows done)`` after each); memory ``O(n * k)``, never
    ``O(n * n)``."""
    positive_int(k, "k")
    n = len(vectors)
    want = min(max(k, norm.k if norm else 1), n - 1)
    scores = np.zeros((n, max(want, 0)), np.float32)
    ids = np.full((n, max(want, 0)), -1, np.int64)
    if n >= 2:
        index = EmbeddingIndex(vectors.shape[1], "Flat", use_gpu=False)
        index.add(vectors)
        for start in range(0, n, chunk_size):
            stop = min(start + chunk_size, n)
            rows = np.arange(start, stop)
            found = index.search(vectors[start:stop], want + 1)
            scores[start:stop], ids[start:stop] = drop_self(*found, rows)
            if progress is not None:
                progress(stop - start)
    background = None
    normalised = scores
    if norm is not None:
        background = norm.backgrounds(scores)
        normalised = scores - (background[:, None] + background[np.maximum(ids, 0)]) / 2
    hit = ((normalised >= threshold) | (scores >= SAME_PIXELS_SCORE)) & (ids >= 0)
    hit[:, k:] = False  # the columns beyond k only measured the background
    rows = np.broadcast_to(np.arange(n)[:, None], ids.shape)[hit]
    src, dst = np.concatenate([rows, ids[hit]]), np.concatenate([ids[hit], rows])
    both = (np.concatenate([normalised[hit]] * 2), np.concatenate([scores[hit]] * 2))
    keys, first = np.unique(src * max(n, 1) + dst, return_index=True)
    return Graph(n, keys // max(n, 1), keys % max(n, 1), both[0][first], both[1][first], background)


def _exact_sets(
    facts: Sequence[FileFacts],
    graph: Graph,
    same_pixels: Callable[[int, int], bool] | None,
) -> np.ndarray:
    """``(n,)`` the smallest row of each row's exact set: equal sha256, or embeddings within
    :data:`SAME_PIXELS_SCORE` that ``same_pixels`` confirms (union-find)."""
    parent = np.arange(len(facts))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = int(parent[i])
        return i

    def union(a: int, b: int) -> None:
        ra, rb = root(a), root(b)
        parent[max(ra, rb)] = min(ra, rb)

    first: dict[str, int] = {}
    for i, f in enumerate(facts):
        if f.sha256 is not None:
            union(first.setdefault(f.sha256, i), i)
    if same_pixels is not None:
        close = (graph.raw >= SAME_PIXELS_SCORE) & (graph.src < graph.dst)
        for i, j in zip(graph.src[close].tolist(), graph.dst[close].tolist(), strict=True):
            if root(i) != root(j) and same_pixels(i, j):
                union(i, j)
    return np.array([root(i) for i in range(len(facts))], dtype=np.int64)


def group_duplicates(
    vectors: np.ndarray,
    facts: Sequence[FileFacts],
    threshold: float,
    keep: str = "largest",
    k: int = 32,
    same_pixels: Callable[[int, int], bool] | None = None,
    progress: Callable[[int], Any] | None = None,
    graph: Graph | None = None,
    norm: Normalisation | None = None,
) -> list[DuplicateGroup]:
    """The duplicate groups of ``n`` images (see the module's description).

    Args:
        vectors: (n, d) unit float32 embeddings, row ``i`` of ``facts[i]``.
        facts: what is known of each image (paths, sizes, dates, hashes, protection).
        threshold: the score in [-1, 1] from which two images are near copies: a cosine
            similarity, or with ``norm`` a normalised one.
        keep: a :data:`KEEP_RULES` policy.
        k: neighbours looked at per image.
        same_pixels: ``(i, j) -> bool``, whether two images decode to the same pixels; None:
            exact copies are files with the same bytes only.
        progress: called with the number of images searched after each chunk.
        graph: a :func:`neighbour_graph` of ``vectors`` built at this threshold or a lower
            one and with the same ``norm`` (its edges below ``threshold`` are ignored); None:
            built here.
        norm: score the pairs with this :class:`Normalisation`; None: cosine similarity.

    Returns:
        Groups of two or more images, the largest space freed first (then by the keeper's
        row); within a group the keeper, the other kept (protected) files, then the rest
        by descending score and ascending row.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) != len(facts):
        raise ValueError(f"need one vector per file: {vectors.shape} for {len(facts)} files")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold {threshold} is not a similarity in [-1, 1]")
    ranks = keep_ranks(facts, keep)
    if graph is None:
        graph = neighbour_graph(vectors, threshold, k, progress=progress, norm=norm)
    graph = graph.at_least(threshold)
    exact = _exact_sets(facts, graph, same_pixels)
    nodes = _node_members(exact, ranks)
    near = _near_groups(vectors, graph, exact, nodes, ranks, threshold)
    groups = [_group(vectors, graph, facts, exact, nodes, g) for g in near]
    groups = [g for g in groups if len(g.members) > 1]
    return sorted(groups, key=lambda g: (-g.freed_bytes, g.members[0].row))


def pair_counts(
    groups: Sequence[DuplicateGroup], labels: Sequence[Any], known: set[Any] | None = None
) -> tuple[int, int]:
    """``(pairs, true pairs)``: the pairs of images that share a group, and how many of them
    share a label too (labels: one per row, the rows of a group's members). With ``known``,
    only pairs with at least one image of a ``known`` label count: the others' truth is not
    known (two photos of one scene, one emoji in two skin tones)."""
    pairs = correct = 0
    for group in groups:
        counts: dict[Any, int] = {}
        for m in group.members:
            counts[labels[m.row]] = counts.get(labels[m.row], 0) + 1
        size = len(group.members)
        if known is None:
            pairs += size * (size - 1) // 2
        else:
            inside = sum(c for label, c in counts.items() if label in known)
            pairs += inside * (inside - 1) // 2 + inside * (size - inside)
        correct += sum(
            c * (c - 1) // 2 for label, c in counts.items() if known is None or label in known
        )
    return pairs, correct


def background_floor(vectors: np.ndarray, k: int = 20) -> float:
    """The median over ``vectors`` of each one's similarity to its ``k``-th most similar other
    row: the ``floor`` of a :class:`Normalisation` calibrated on them."""
    n = len(vectors)
    if n <= k:
        raise ValueError(f"{n} vectors: a background floor needs more than k={k}")
    index = EmbeddingIndex(vectors.shape[1], "Flat", use_gpu=False)
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    return float(np.median(index.search_self(k)[0][:, k - 1]))


def calibrate(
    vectors: np.ndarray,
    labels: Sequence[Any],
    thresholds: Sequence[float] | None = None,
    k: int = 32,
    norm: Normalisation | None = None,
    known: set[Any] | None = None,
) -> list[dict[str, float]]:
    """Pair precision and recall of :func:`group_duplicates` (with ``norm``) at each threshold,
    on images whose ``labels`` say which are copies of one another (every other pair is a
    different image): ``[{"threshold", "precision", "recall", "pairs"}]`` in ascending
    threshold. Precision is 1 where no pair is grouped; with ``known`` it counts only the pairs
    with an image of a ``known`` label (see :func:`pair_counts`). Default thresholds: -0.30
    to 0.99 in steps of 0.01."""
    grid = sorted(
        thresholds if thresholds is not None else [round(-0.3 + 0.01 * i, 2) for i in range(130)]
    )
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = list(labels)
    facts = [FileFacts(str(i)) for i in range(len(vectors))]
    sizes: dict[Any, int] = {}
    for label in labels:
        sizes[label] = sizes.get(label, 0) + 1
    true_pairs = sum(c * (c - 1) // 2 for c in sizes.values())
    graph = neighbour_graph(vectors, grid[0], k, norm=norm)
    table = []
    for threshold in grid:
        groups = group_duplicates(vectors, facts, threshold, keep="path", graph=graph)
        pairs, correct = pair_counts(groups, labels, known)
        table.append(
            {
                "threshold": float(threshold),
                "precision": correct / pairs if pairs else 1.0,
                "recall": correct / true_pairs if true_pairs else 1.0,
                "pairs": pairs,
            }
        )
        if not pairs:  # higher thresholds group nothing either
            break
    return table


def threshold_for(table: Sequence[dict[str, float]], precision: float) -> float:
    """The lowest calibrated threshold whose pair precision reaches ``precision`` (the most
    recall at that precision). Raises ValueError when none does."""
    if not 0.0 < precision <= 1.0:
        raise ValueError(f"--precision {precision} must lie in (0, 1]")
    fits = [row["threshold"] for row in table if row["precision"] >= precision]
    if not fits:
        best = max((row["precision"] for row in table), default=0.0)
        raise ValueError(
            f"no calibrated threshold reaches pair precision {precision} (the best is "
            f"{best:.4f}): ask for less, or pass --threshold"
        )
    return float(min(fits))


def _node_members(exact: np.ndarray, ranks: np.ndarray) -> dict[int, list[int]]:
    """Each exact set (keyed by its smallest row) with its rows, best first."""
    nodes: dict[int, list[int]] = {}
    for row in np.argsort(ranks, kind="stable"):
        nodes.setdefault(int(exact[row]), []).append(int(row))
    return nodes


def _near_groups(
    vectors: np.ndarray,
    graph: Graph,
    exact: np.ndarray,
    nodes: dict[int, list[int]],
    ranks: np.ndarray,
    threshold: float,
) -> list[list[int]]:
    """Groups of the exact sets (keyed by their smallest row) grown from centres, keeper first."""
    keys = np.array(sorted(nodes), dtype=np.int64)
    rep = np.array([nodes[int(key)][0] for key in keys], dtype=np.int64)  # best row of each
    slot = np.full(len(exact), -1, dtype=np.int64)
    slot[keys] = np.arange(len(keys))
    a, b = slot[exact[graph.src]], slot[exact[graph.dst]]
    same_reps = (graph.src == rep[a]) & (graph.dst == rep[b])
    score = graph.score.copy()
    for e in np.flatnonzero(~same_reps & (a != b)):  # an edge of an exact set's other copy
        score[e] = graph.pair_scores(vectors, rep[a[e]][None], int(rep[b[e]]))[0]
    keep = (a != b) & (score >= threshold)
    links = neighbour_lists(len(keys), a[keep], b[keep])
    order = sorted(range(len(keys)), key=lambda i: (-len(links[i]), i))
    assigned = np.zeros(len(keys), dtype=bool)
    groups = []
    for centre in order:
        if assigned[centre]:
            continue
        offered = np.array([j for j in links[centre] if not assigned[j]], dtype=np.int64)
        members = _grown(vectors, graph, rep, centre, offered, threshold)
        keeper = int(members[np.argmin(ranks[rep[members]])])
        assigned[members] = True
        groups.append([int(keys[keeper])] + [int(keys[m]) for m in members if m != keeper])
    return groups


def _grown(
    vectors: np.ndarray,
    graph: Graph,
    rep: np.ndarray,
    centre: int,
    offered: np.ndarray,
    threshold: float,
) -> np.ndarray:
    """The nodes of ``centre``'s group: ``offered`` in order of their score with the centre
    (then by node), each joining when its mean score with the members so far reaches the
    threshold (average linkage); the centre first."""
    members = [centre]
    if offered.size:
        to_centre = graph.pair_scores(vectors, rep[offered], int(rep[centre]))
        for node in offered[np.lexsort((offered, -to_centre))].tolist():
            if graph.pair_scores(vectors, rep[members], int(rep[node])).mean() >= threshold:
                members.append(node)
    return np.array(members, dtype=np.int64)


def neighbour_lists(n: int, src: np.ndarray, dst: np.ndarray) -> list[list[int]]:
    """The distinct ``dst`` of each of ``n`` sources, ascending (symmetric input expected)."""
    out: list[set[int]] = [set() for _ in range(n)]
    for i, j in zip(src.tolist(), dst.tolist(), strict=True):
        out[i].add(j)
    return [sorted(s) for s in out]


def _group(
    vectors: np.ndarray,
    graph: Graph,
    facts: Sequence[FileFacts],
    exact: np.ndarray,
    nodes: dict[int, list[int]],
    keys: list[int],
) -> DuplicateGroup:
    """The files of the exact sets ``keys`` (the keeper's first) as one group."""
    keeper = nodes[keys[0]][0]
    members = []
    for key in keys:
        for row in nodes[key]:
            f = facts[row]
            same = exact[row] == exact[keeper]
            kind = "keeper" if row == keeper else "exact" if same else "near"
            score = 1.0 if same else float(graph.pair_scores(vectors, np.array([row]), keeper)[0])
            keep = row == keeper or f.protected
            members.append(Member(row, f.path, kind, score, keep, f.width, f.height, f.bytes))
    first, rest = members[0], members[1:]
    rest.sort(key=lambda m: (not m.keep, -m.score, m.row))
    return DuplicateGroup([first, *rest])
