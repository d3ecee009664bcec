"""What the ingress scores for a request, scored in its own replica (no Ray, no server)."""

from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import pytest
import scipy.sparse as sp

from app.config import ModelArgs
from app.models import build_model
from app.serve import Query, ServeAppArgs
from app.serve.retriever import LoadedModel
from app.serve.scoring import Scoring, new_in_order, popular
from app.serve.store import Catalogues
from app.store import ModelRecord


class _Histogram:
    def __init__(self) -> None:
        self.seen: list[int] = []

    def observe(self, value: int) -> None:
        self.seen.append(value)


class _Metrics:
    def __init__(self) -> None:
        self.batch_size = _Histogram()


def _scoring(serve_lake, **args) -> tuple[Scoring, _Metrics]:
    metrics = _Metrics()
    app_args = ServeAppArgs(lake=serve_lake.lake.uri, name=serve_lake.name, **args)
    version = serve_lake.versions[0]
    return Scoring(serve_lake.lake, app_args, version, metrics), metrics  # type: ignore[arg-type]


def test_popular_skips_excluded_items(serve_lake) -> None:
    cat = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0]).catalogue
    excluded = cat.popular[:3]
    cand = popular(cat, "v", excluded, 5)
    assert cand.items.tolist() == cat.popular[3:8].tolist()
    assert np.all(np.diff(cand.scores) <= 0)


def test_strategies_and_exclusions(serve_lake) -> None:
    state = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0])
    scoring, metrics = _scoring(serve_lake)
    seen = {state.catalogue.item_index[i] for i in serve_lake.seen(3)}

    async def main() -> None:
        strategy, cand = await scoring.recommend(state, "u3", [], [], [], False, 5)
        assert strategy == "personal" and len(cand.items) == 5
        assert not set(cand.items.tolist()) & seen
        strategy, cand = await scoring.recommend(state, "u3", [], [], [], True, 40)
        assert set(cand.items.tolist()) & seen  # include_seen
        strategy, cand = await scoring.recommend(state, None, [], ["i0"], ["i1"], False, 5)
        assert strategy == "context" and not {0, 1} & set(cand.items.tolist())
        strategy, cand = await scoring.recommend(state, "nobody", [], [], [], False, 5)
        assert strategy == "popularity"
        assert cand.items.tolist() == state.catalogue.popular[:5].tolist()
        strategy, cand = await scoring.recommend(state, "nobody", ["i9"], [], [], False, 5)
        assert strategy == "context" and 9 not in cand.items.tolist()  # folded in from events
        sim = await scoring.similar(state.catalogue, state.version, 3, 4)
        assert 3 not in sim.items.tolist() and len(sim.items) == 4

    asyncio.run(main())
    assert metrics.batch_size.seen and all(n >= 1 for n in metrics.batch_size.seen)


def test_ranker_rules_apply_in_the_replica(serve_lake) -> None:
    state = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0])
    scoring, _ = _scoring(serve_lake, max_per_genre=3, blocked_items=["i13"])
    _, cand = asyncio.run(scoring.recommend(state, "u1", [], [], [], False, 9))
    genres = Counter(i // serve_lake.items_per_group for i in cand.items.tolist())
    assert max(genres.values()) <= 3 and 13 not in cand.items.tolist()


def test_no_blocked_item_in_any_answer(serve_lake) -> None:
    """Random requests over every path (personal, context, popularity, similar): the rules hold."""
    state = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0])
    cat = state.catalogue
    # the most popular items, so popularity answers would return them if nothing filtered
    blocked_idx = cat.popular[:4].tolist()
    blocked = [cat.item_ids[i] for i in blocked_idx]
    scoring, _ = _scoring(serve_lake, max_per_genre=2, blocked_items=blocked)
    rng = np.random.default_rng(7)
    known = list(cat.user_index)
    strategies: Counter[str] = Counter()

    async def main() -> None:
        for _ in range(150):
            user = [known[rng.integers(len(known))], "nobody", None][rng.integers(3)]
            k = int(rng.integers(1, 10))
            context = [f"i{i}" for i in rng.choice(cat.n_items, rng.integers(0, 3), replace=False)]
            if user is None and not context and rng.random() < 0.5:
                context = ["i0"]
            strategy, cand = await scoring.recommend(state, user, [], context, [], False, k)
            strategies[strategy] += 1
            items = cand.items.tolist()
            assert not set(items) & set(blocked_idx), (strategy, items)
            assert len(items) == k
        for item in range(cat.n_items):
            sim = await scoring.similar(cat, state.version, item, 5)
            assert not set(sim.items.tolist()) & set(blocked_idx)
            assert len(sim.items) == 5 and item not in sim.items.tolist()

    asyncio.run(main())
    assert set(strategies) == {"personal", "context", "popularity"}, strategies


@pytest.mark.parametrize("family", ["popularity", "ease", "mf"])
def test_loaded_model_excludes_and_folds_in(family: str) -> None:
    rng = np.random.default_rng(0)
    train = sp.csr_matrix((rng.random((30, 12)) < 0.3).astype(np.float32))
    model = build_model(ModelArgs(name=family, embed_dim=4, ease_lambda=1.0), 30, 12)
    if hasattr(model, "fit"):
        model.fit(train)
    loaded = LoadedModel(model, ModelRecord("tiny-mf", "v1", "", {}))
    hist = np.array([0, 1, 2])
    queries = [
        Query("v1", 3, hist, hist[:0], hist, 5),
        Query("v1", -1, hist, hist[:0], np.arange(10), 5),  # new user: fold-in
    ]
    a, b = loaded.score(queries)
    assert len(a.items) == 5 and not set(a.items.tolist()) & {0, 1, 2}
    assert set(b.items.tolist()) <= {10, 11}
    assert np.all(np.diff(a.scores) <= 0)
    sim = loaded.similar(0, 3)
    assert 0 not in sim.items.tolist() and len(sim.items) == 3


def test_new_in_order_keeps_first_places_and_drops_known_items() -> None:
    items = np.array([7, 3, 7, 5, 1, 3])
    assert new_in_order(items, np.array([1, 2])).tolist() == [7, 3, 5]
    assert new_in_order(items[:0], np.array([1])).tolist() == []


@pytest.mark.parametrize("family", ["edlae", "seq_ae"])
def test_recency_models_score_the_history_in_time_order(family: str) -> None:
    # The same items in two orders: a recency-weighted model must answer them differently,
    # exactly as it scores the ranked history offline.
    model = build_model(
        ModelArgs(name=family, embed_dim=4, edlae_lambda=1.0, recency_tau=1.0), 30, 12, seed=0
    )
    if family == "edlae":
        rng = np.random.default_rng(0)
        model.fit(sp.csr_matrix((rng.random((30, 12)) < 0.3).astype(np.float32)))
    loaded = LoadedModel(model, ModelRecord("tiny", "v1", "", {}))
    forward, backward = np.array([0, 1, 2, 3]), np.array([3, 2, 1, 0])
    queries = [Query("v1", -1, h, h[:0], h, 12) for h in (forward, backward)]
    a, b = loaded.score(queries)
    assert a.items.tolist() != b.items.tolist() or not np.allclose(a.scores, b.scores)
    ranked = sp.csr_matrix(np.array([[4, 3, 2, 1] + [0] * 8], dtype=np.float32))  # 3 latest
    offline = model.score(np.array([-1]), model.weigh_history(ranked))[0]
    order = [i for i in np.argsort(-offline, kind="stable") if i not in forward][: len(a.items)]
    assert a.items.tolist() == order
