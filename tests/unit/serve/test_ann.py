"""Approximate retrieval: recall against exact search, exclusions, and the exact fallback."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from app.config import ModelArgs
from app.models import build_model
from app.serve.ann import AnnIndex
from app.serve.retriever import LoadedModel, Query, ScoringOptions, item_matrix, top_k_dot


def _clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Vectors around 50 centres, like trained item embeddings (not uniform noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim))
    x = centres[rng.integers(50, size=n)] + 0.3 * rng.normal(size=(n, dim))
    return x.astype(np.float32)


def _recall(index: AnnIndex, users: np.ndarray, items: np.ndarray, exclude: list) -> float:
    got, _, _ = index.search(users, exclude, 10)
    exact, _ = top_k_dot(users, item_matrix(items), exclude, 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, exact, strict=True)]))


def test_hnsw_recall_against_exact_and_exclusions_hold() -> None:
    items = _clustered(20_000, 32, seed=0)
    rng = np.random.default_rng(2)
    # Queries in the items' region (users near what they like), 20 seen items each.
    users = items[rng.choice(20_000, 64)] + 0.1 * rng.normal(size=(64, 32)).astype(np.float32)
    exclude = [rng.choice(20_000, 20, replace=False) for _ in range(64)]
    index = AnnIndex(items, ef_search=128)
    assert _recall(index, users, items, exclude) >= 0.95
    idx, vals, short = index.search(users, exclude, k=10)
    assert not short.any()
    for row, ex in enumerate(exclude):
        assert not set(idx[row].tolist()) & set(ex.tolist())
        assert (np.diff(vals[row]) <= 1e-6).all()  # best first
        np.testing.assert_allclose(vals[row], items[idx[row]] @ users[row], rtol=1e-4)
    # Queries far from every item are harder for the graph; more search effort buys recall.
    far = _clustered(64, 32, seed=1)
    none: list = [np.zeros(0, np.int64)] * 64
    index.ef_search = 32
    low = _recall(index, far, items, none)
    index.ef_search = 512
    high = _recall(index, far, items, none)
    assert high > low and high >= 0.85, (low, high)


def test_rows_left_short_by_their_history_are_flagged() -> None:
    items = _clustered(300, 8, seed=3)
    index = AnnIndex(items)
    everything_but_two = np.arange(298)
    idx, vals, short = index.search(items[:2], [everything_but_two, np.zeros(0, np.int64)], 5)
    # Row 0 may only get items 298 and 299; HNSW finds them or says it fell short.
    assert set(idx[0][idx[0] >= 0].tolist()) <= {298, 299}
    assert short[0] or sorted(idx[0][:2].tolist()) == [298, 299]
    assert not short[1] and (idx[1] >= 0).all()


def test_loaded_model_uses_the_index_and_falls_back_to_exact() -> None:
    model = build_model(ModelArgs(name="mf", embed_dim=16), n_users=30, n_items=500, seed=0)
    record = SimpleNamespace(version="v1")
    approx = LoadedModel(model, record, ScoringOptions(ann_min_items=0))  # type: ignore[arg-type]
    exact = LoadedModel(model, record)  # type: ignore[arg-type]
    assert approx.ann is not None and exact.ann is None
    rng = np.random.default_rng(4)
    queries = []
    for u in range(30):
        seen = np.sort(rng.choice(500, 490 if u == 0 else 5, replace=False))
        queries.append(Query("v1", u, seen, np.zeros(0, np.int64), seen, 10))
    got, want = approx.score(queries), exact.score(queries)
    # User 0 has seen 490 of 500 items: exactly the 10 others, whatever the graph found.
    assert sorted(got[0].items.tolist()) == sorted(want[0].items.tolist())
    for q, cand in zip(queries, got, strict=True):
        assert not set(cand.items.tolist()) & set(q.exclude.tolist())
    overlap = np.mean(
        [len(set(a.items) & set(b.items)) / 10 for a, b in zip(got, want, strict=True)]
    )
    assert overlap >= 0.9, overlap
