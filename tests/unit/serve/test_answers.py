"""Answers: cached by everything they depend on, and warmed from published batch predictions."""

from __future__ import annotations

import asyncio

import numpy as np
import pyarrow as pa

from app.serve import Candidates, Query, ServeAppArgs, load_catalogue
from app.serve.answers import Answers, rec_key, warm_answers
from app.serve.retriever import LoadedModel
from app.serve.store import Catalogues
from app.store import load_dataset, load_model


class _Metrics:
    def __init__(self) -> None:
        self.counts: list[tuple[str, dict[str, str]]] = []

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

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def recommend(self, state, user_id, live, context, exclude, include_seen, k):
        self.calls.append((user_id, tuple(live), k))
        items = np.arange(k, dtype=np.int64)
        return "personal", Candidates(state.version, items, np.ones(k, np.float32))

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
