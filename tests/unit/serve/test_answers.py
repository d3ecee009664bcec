"""Answers: cached by everything they depend on, and warmed from published batch predictions."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa

from app.serve import Candidates, Query, ServeAppArgs, load_catalogue
from app.serve.answers import Answers, popular_key, rec_key, warm_answers
from app.serve.retriever import LoadedModel
from app.serve.scoring import Scoring
from app.serve.store import Catalogues
from app.store import load_dataset, load_model


class _Histogram:
    def observe(self, value: float) -> None:
        pass


class _Metrics:
    def __init__(self) -> None:
        self.counts: list[tuple[str, dict[str, str]]] = []
        self.batch_size = _Histogram()

    def count(self, counter: str, n: int = 1, **tags: str) -> None:
        self.counts.append((counter, tags))


class _Events:
    def __init__(self) -> None:
        self.log: dict[str, list[str]] = {}

    def version(self, user_id: str) -> int:
        return len(self.log.get(user_id, ()))

    def items(self, user_id: str) -> list[str]:
        return self.log.get(user_id, [])


class _Scoring:
    """Scores every request with items 0, 1, 2 and counts the calls."""

    def __init__(self, strategy: str = "personal") -> None:
        self.calls: list[tuple] = []
        self.strategy = strategy

    async def recommend(self, state, user_id, live, context, exclude, include_seen, k):
        self.calls.append((user_id, tuple(live), k))
        items = np.arange(k, dtype=np.int64)
        return self.strategy, Candidates(state.version, items, np.ones(k, np.float32))

    async def similar(self, cat, version, item_idx, k):
        self.calls.append(("similar", item_idx, k))
        return Candidates(version, np.arange(k, dtype=np.int64), np.ones(k, np.float32))


def test_cache_keys_hold_everything_an_answer_depends_on() -> None:
    base = rec_key("v1", "u1", 0, 10)
    assert base == rec_key("v1", "u1", 0, 10, [], (), False)
    others = [
        rec_key("v2", "u1", 0, 10),
        rec_key("v1", "u2", 0, 10),
        rec_key("v1", "u1", 1, 10),
        rec_key("v1", "u1", 0, 5),
        rec_key("v1", "u1", 0, 10, ["i1"]),
        rec_key("v1", "u1", 0, 10, (), ["i1"]),
        rec_key("v1", "u1", 0, 10, include_seen=True),
    ]
    assert len({base, *others}) == 1 + len(others)
    pop = popular_key("v1", 10)
    assert pop == popular_key("v1", 10, ()) != popular_key("v1", 10, ["i1"])
    assert popular_key("v1", 10, ["i2", "i1", "i2"]) == popular_key("v1", 10, ["i1", "i2"])
    assert len({pop, popular_key("v2", 10), popular_key("v1", 5), base}) == 4


def test_answers_are_cached_until_the_users_history_changes(serve_lake) -> None:
    state = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0])
    metrics, events, scoring = _Metrics(), _Events(), _Scoring()
    args = ServeAppArgs(lake=serve_lake.lake.uri, name=serve_lake.name, cache_size=10)
    answers = Answers(args, scoring, events, metrics)  # type: ignore[arg-type]

    async def main() -> None:
        first = await answers.recommend(state, "u1", 3, [], [], False)
        again = await answers.recommend(state, "u1", 3, [], [], False)
        assert (first.cached, again.cached) == (False, True)
        assert [i.item_id for i in again.items] == ["i0", "i1", "i2"]
        events.log["u1"] = ["i7"]  # a new event: a new history version, scored again
        fresh = await answers.recommend(state, "u1", 3, [], [], False)
        assert (fresh.cached, fresh.history_version) == (False, 1)
        sim = [await answers.similar(state, "i4", 2) for _ in range(2)]
        assert [s.cached for s in sim] == [False, True]

    asyncio.run(main())
    assert scoring.calls == [("u1", (), 3), ("u1", ("i7",), 3), ("similar", 4, 2)]
    assert [tags["result"] for _, tags in metrics.counts] == ["miss", "hit", "miss"]
    assert answers.warm(serve_lake.lake, state) == 0  # warm_cache is off by default


def test_warm_answers_from_batch_predictions(serve_lake) -> None:
    from app.predict import predict_table

    lake, versions = serve_lake.lake, serve_lake.versions
    model, record = load_model(lake, serve_lake.name, versions[0])
    cat = load_catalogue(lake, "tiny", "v-tiny")
    ds = load_dataset(lake, "tiny", "v-tiny")
    users = np.arange(serve_lake.n_users)
    user_ids = np.array([f"u{u}" for u in users], object)
    item_ids = np.array([f"i{i}" for i in range(serve_lake.n_items)], object)
    table = predict_table(model, users, model.history(ds, "train"), user_ids, item_ids, k=12)
    # Plant a seen item at the head of u0's list: serving must drop it again.
    lists = table.column("items").to_pylist()
    seen0 = sorted(serve_lake.seen(0))
    lists[0] = [seen0[0]] + lists[0][:-1]
    table = table.set_column(1, "items", pa.array(lists, pa.list_(pa.string())))
    answers = warm_answers(table, cat, record.version, k=10, limit=50)
    assert len(answers) == 50
    by_user = {a.user_id: a for a in answers}
    assert seen0[0] not in [x.item_id for x in by_user["u0"].items]
    for user in (0, 5, 13):
        a = by_user[f"u{user}"]
        ids = [x.item_id for x in a.items]
        assert len(ids) == 10 and not set(ids) & serve_lake.seen(user)
        assert a.model_version == record.version and a.history_version == 0
    # The same lists the retriever computes for these users (u0 lost one item to the filter).
    loaded = LoadedModel(model, record)
    for user in (5, 13):
        known = cat.known_items(user)
        q = Query(record.version, user, known, np.zeros(0, np.int64), known, 10)
        want = [cat.item_ids[i] for i in loaded.score([q])[0].items]
        assert [x.item_id for x in by_user[f"u{user}"].items] == want


def test_users_without_a_history_share_one_popularity_answer(serve_lake) -> None:
    """100k unknown users cost one cache entry, not 100k; each still gets its own user_id."""
    state = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0])
    metrics, events = _Metrics(), _Events()
    args = ServeAppArgs(lake=serve_lake.lake.uri, name=serve_lake.name)
    real = Scoring(serve_lake.lake, args, serve_lake.versions[0], metrics)  # type: ignore[arg-type]
    calls: list[str | None] = []

    class _Counting:
        async def recommend(self, state, user_id, *rest):
            calls.append(user_id)
            return await real.recommend(state, user_id, *rest)

    answers = Answers(args, _Counting(), events, metrics)  # type: ignore[arg-type]
    users = [f"stranger-{n}" for n in range(300)] + [None]

    async def main() -> None:
        got = [await answers.recommend(state, u, 5, [], [], False) for u in users]
        assert [a.user_id for a in got] == users
        assert {a.strategy for a in got} == {"popularity"}
        assert [a.cached for a in got] == [False] + [True] * (len(users) - 1)
        assert len({tuple(i.item_id for i in a.items) for a in got}) == 1
        # include_seen changes nothing without a history; exclusions and k do
        seen = await answers.recommend(state, "stranger-x", 5, [], [], True)
        assert seen.cached and seen.user_id == "stranger-x"
        top = got[0].items[0].item_id
        other = await answers.recommend(state, "stranger-0", 5, [], [top], False)
        assert not other.cached and top not in [i.item_id for i in other.items]
        assert (await answers.recommend(state, "stranger-1", 5, [], [top], False)).cached
        assert not (await answers.recommend(state, "stranger-0", 4, [], [], False)).cached
        # a known user, a user with live events and a context request are not shared
        known = await answers.recommend(state, "u1", 5, [], [], False)
        events.log["stranger-7"] = ["i3"]
        live = await answers.recommend(state, "stranger-7", 5, [], [], False)
        ctx = await answers.recommend(state, "stranger-8", 5, ["i3"], [], False)
        assert (known.strategy, live.strategy, ctx.strategy) == ("personal", "context", "context")
        assert not (known.cached or live.cached or ctx.cached)

    asyncio.run(main())
    # one scoring call for the 301 users without a history, then one per distinct answer
    assert calls == ["stranger-0", "stranger-0", "stranger-0", "u1", "stranger-7", "stranger-8"]
    assert len(answers.cache) == 6


def test_an_answer_that_is_not_popularity_is_never_shared(serve_lake) -> None:
    # Should scoring ever personalise a request the cache took for history-free, its answer
    # stays under that user's own key (and the next such request is scored again: correct,
    # only uncached).
    state = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0])
    scoring = _Scoring(strategy="context")
    args = ServeAppArgs(lake=serve_lake.lake.uri, name=serve_lake.name)
    answers = Answers(args, scoring, _Events(), _Metrics())  # type: ignore[arg-type]

    async def main() -> None:
        for user in ("a", "b", "a"):
            await answers.recommend(state, user, 3, [], [], False)

    asyncio.run(main())
    assert [c[0] for c in scoring.calls] == ["a", "b", "a"]
    assert len(answers.cache) == 2 and answers.cache.get(popular_key(state.version, 3)) is None
    assert answers.cache.get(rec_key(state.version, "a", 0, 3)) is not None


def test_answers_cache_is_bounded_in_bytes(serve_lake) -> None:
    state = Catalogues(serve_lake.lake, serve_lake.name).load(serve_lake.versions[0])
    args = ServeAppArgs(
        lake=serve_lake.lake.uri, name=serve_lake.name, cache_size=10**6, cache_max_bytes=200_000
    )
    answers = Answers(args, _Scoring(), _Events(), _Metrics())  # type: ignore[arg-type]
    context = [f"i{i % serve_lake.n_items}" for i in range(500)]

    async def main() -> None:
        for u in range(300):
            await answers.recommend(state, f"u{u % serve_lake.n_users}", 10, context[u:], [], False)
            assert answers.cache.nbytes <= 200_000

    asyncio.run(main())
    stats = answers.cache.stats()
    assert stats.max_bytes == 200_000 and 0 < stats.entries < 300 and stats.evictions > 0
