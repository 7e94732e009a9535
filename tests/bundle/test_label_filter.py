"""Searching with a label filter: exactly the top k among the label's items, read from the
store in O(matches) rows, and about as fast as a search without a filter when nothing matches."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.bundle.items import IndexedItems
from retrieval.bundle.records import ItemRecord
from retrieval.postprocess import AQE, Rerank, search_with_steps
from retrieval.search import Retriever

DIM = 32
N = 20_000


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def label_of(i: int) -> str:
    """Item ``i`` (0-based): 3 "rare" ones, half "big", the rest spread over 50 labels."""
    if i < 3:
        return "rare"
    return "big" if i % 2 == 0 else f"l{i % 50}"


class CountingCursor:
    def __init__(self, cursor: Any, owner: CountingConnection) -> None:
        self._cursor, self._owner = cursor, owner

    def fetchall(self) -> list[Any]:
        rows = self._cursor.fetchall()
        self._owner.rows += len(rows)
        return rows

    def fetchone(self) -> Any:
        row = self._cursor.fetchone()
        self._owner.rows += row is not None
        return row

    def __iter__(self) -> Any:
        for row in self._cursor:
            self._owner.rows += 1
            yield row

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)


class CountingConnection:
    """The store's connection, counting the rows its queries hand back."""

    def __init__(self, conn: Any) -> None:
        self._conn, self.rows = conn, 0

    def execute(self, sql: str, params: Any = ()) -> CountingCursor:
        return CountingCursor(self._conn.execute(sql, params), self)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def build(folder: Path, n: int, factory: str = "Flat", seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    vectors = unit(rng, n)
    records = [ItemRecord(f"img/{i}.jpg", label=label_of(i)) for i in range(n)]
    with IndexedItems.create(folder, DIM, factory, train_vectors=vectors) as items:
        items.add(records, vectors)
    return vectors


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("labels") / "b"
    return folder, build(folder, N)


@pytest.fixture
def retriever(gallery: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch):
    folder, _ = gallery
    with IndexedItems.open(folder) as items:
        yield Retriever(folder, {"embedding_dim": DIM}, None, None, items, 1)  # type: ignore[arg-type]


def exact_among(
    vectors: np.ndarray, query: np.ndarray, label: str, k: int
) -> tuple[list[int], np.ndarray]:
    """Ids (1-based) and scores of the exact top k among the label's items, ties by id."""
    members = np.array([i for i in range(len(vectors)) if label_of(i) == label])
    scores = vectors[members] @ query
    order = np.lexsort((members, -scores))[:k]
    return [int(i) + 1 for i in members[order]], scores[order]


def median_time(run: Any, repeat: int = 15) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.parametrize("label", ["rare", "l7", "big"])
def test_a_label_filter_returns_the_exact_top_k_among_the_label(retriever, gallery, label):
    _, vectors = gallery
    queries = unit(np.random.default_rng(1), 4)
    results = retriever.search(queries, k=10, label=label)
    for query, hits in zip(queries, results, strict=True):
        ids, scores = exact_among(vectors, query, label, 10)
        assert [h.id for h in hits] == ids
        np.testing.assert_allclose([h.score for h in hits], scores, atol=1e-5)
        assert all(h.label == label for h in hits)


def test_equal_scores_under_a_label_filter_come_by_ascending_id(tmp_path):
    rng = np.random.default_rng(2)
    vector = unit(rng, 1)
    vectors = np.repeat(vector, 30, axis=0)
    records = [ItemRecord(f"{i}.jpg", label="same" if i % 3 else "other") for i in range(30)]
    with IndexedItems.create(tmp_path / "b", DIM) as items:
        items.add(records, vectors)
        retriever = Retriever(tmp_path, {"embedding_dim": DIM}, None, None, items, 1)  # type: ignore[arg-type]
        hits = retriever.search(vector, k=5, label="same")[0]
    assert [h.id for h in hits] == [2, 3, 5, 6, 8]


def test_a_label_that_matches_nothing_reads_no_rows_and_is_fast(retriever):
    query = unit(np.random.default_rng(3), 1)
    counter = CountingConnection(retriever.items.store._conn)
    retriever.items.store._conn = counter
    try:
        assert retriever.search(query, k=10, label="nobody") == [[]]
        assert counter.rows <= 2, f"{counter.rows} rows read for a label nobody has"
        counter.rows = 0
        assert len(retriever.search(query, k=10, label="rare")[0]) == 3
        assert counter.rows <= 3 * 3 + 2, f"{counter.rows} rows read for a label of 3 items"
    finally:
        retriever.items.store._conn = counter._conn
    normal = median_time(lambda: retriever.search(query, k=10))
    nothing = median_time(lambda: retriever.search(query, k=10, label="nobody"))
    # 3x a normal search, plus slack for a busy 2-core machine (the old code took ~1 s here)
    assert nothing <= 3 * normal + 0.01, (
        f"no-match {nothing * 1e3:.2f} ms, normal {normal * 1e3:.2f} ms"
    )


def test_store_reads_grow_with_matches_not_with_the_gallery(retriever):
    query = unit(np.random.default_rng(4), 1)
    counter = CountingConnection(retriever.items.store._conn)
    retriever.items.store._conn = counter
    try:
        retriever.search(query, k=10, label="l7")  # 400 items of 20,000
        assert counter.rows <= 2 * 400 + 10 + 2  # their ids, their vectors, the hits
    finally:
        retriever.items.store._conn = counter._conn


@pytest.mark.parametrize("factory", ["IVF16,Flat", "HNSW16"])
def test_approximate_indexes_keep_to_the_label(tmp_path, factory):
    vectors = build(tmp_path / "b", 4000, factory, seed=5)
    queries = unit(np.random.default_rng(6), 5)
    with IndexedItems.open(tmp_path / "b") as items:
        retriever = Retriever(tmp_path, {"embedding_dim": DIM}, None, None, items, 1)  # type: ignore[arg-type]
        for label in ("rare", "l7", "big"):
            for query, hits in zip(
                queries, retriever.search(queries, 10, label=label), strict=True
            ):
                expected, _ = exact_among(vectors, query, label, 10)
                assert all(h.label == label for h in hits)
                assert len(hits) == len(expected)
                if label != "big":  # few items: searched exactly
                    assert [h.id for h in hits] == expected


def test_a_label_filter_with_query_expansion_and_reranking(gallery, monkeypatch):
    folder, vectors = gallery
    steps = {"postprocess": {"steps": {"aqe": {"k": 3, "alpha": 3.0}}}}
    query = unit(np.random.default_rng(7), 2)
    members = np.array([i for i in range(N) if label_of(i) == "l7"])
    table = np.vstack([np.zeros((1, DIM), np.float32), vectors])  # row = item id

    def exact(q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = q @ vectors[members].T
        order = np.lexsort((np.broadcast_to(members, scores.shape), -scores), axis=1)[:, :k]
        return np.take_along_axis(scores, order, 1), members[order] + 1

    with IndexedItems.open(folder) as items:
        retriever = Retriever(folder, {"embedding_dim": DIM, **steps}, None, None, items, 1)  # type: ignore[arg-type]
        for rerank in (False, True):
            hits = retriever.search(query, k=8, label="l7", rerank=rerank)
            expected = search_with_steps(
                query,
                8,
                exact,
                lambda found: table[found],
                aqe=AQE(3, 3.0),
                rerank=Rerank() if rerank else None,
            )[1]
            assert [[h.id for h in row] for row in hits] == expected.tolist()
            assert all(h.label == "l7" for row in hits for h in row)


def test_a_store_written_before_the_label_index_gets_it_when_opened(tmp_path):
    import sqlite3

    vectors = build(tmp_path / "b", 300)
    conn = sqlite3.connect(tmp_path / "b" / "items.sqlite")
    with conn:
        conn.execute("DROP INDEX items_by_label")  # as schema version 1 stores were written
    conn.close()
    with IndexedItems.open(tmp_path / "b") as items:
        plan = items.store._fetch(
            "EXPLAIN QUERY PLAN SELECT id FROM items WHERE label = ? AND removed_seq IS NULL",
            ("l7",),
        )
        assert any("items_by_label" in str(row) for row in plan)
        query = unit(np.random.default_rng(8), 1)
        hits = Retriever(tmp_path, {"embedding_dim": DIM}, None, None, items, 1).search(  # type: ignore[arg-type]
            query, k=3, label="l7"
        )[0]
    assert [h.id for h in hits] == exact_among(vectors, query[0], "l7", 3)[0]
