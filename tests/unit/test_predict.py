"""Batch prediction: every user, raw ids, protocol exclusions, atomic publish, job output.

The ``Ranker`` tests run in this process (no Ray); the two tests taking ``ray_cluster`` start it.
"""

from __future__ import annotations

import pickle
import posixpath

import numpy as np
import pytest
import scipy.sparse as sp

from app import predict
from app.config import AppConfig, DataArgs, ModelArgs
from app.models import EASE, build_model, top_k_dot
from app.store import (
    MANIFEST,
    LakeError,
    RegistryError,
    load_predictions,
    promote,
    read_predictions,
    register,
    registry_name,
)

NAME = registry_name("tiny", "ease")
MF_NAME = registry_name("tiny", "mf")


def _cfg(lake_uri: str) -> AppConfig:
    return AppConfig(
        lake=lake_uri,
        data=DataArgs(name="tiny", source="synthetic"),
        model=ModelArgs(name="ease", ease_lambda=10.0),
    )


@pytest.fixture
def registered(tiny_dataset, tmp_lake):
    cfg = _cfg(tmp_lake.uri)
    history = tiny_dataset.csr("train", "valid")
    model = EASE(tiny_dataset.n_users, tiny_dataset.n_items, ease_lambda=10.0).fit(history)
    record = register(tmp_lake, NAME, model, cfg, tiny_dataset, {})
    return cfg, model, record, history


def test_batch_predict_job_matches_in_process(
    ray_cluster, registered, tiny_dataset, tmp_lake, tmp_path, capsys
):
    from jobs import batch_predict

    cfg, model, record, history = registered
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"lake: {tmp_lake.uri}\n"
        "data: {name: tiny, source: synthetic}\n"
        "model: {name: ease, ease_lambda: 10.0}\n"
        "cluster: {progress_bars: false}\n"
    )
    path = batch_predict.main(["--config", str(config)])
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == path
    # The job's logging.basicConfig(force=True) logs to (captured) stderr.
    assert "no 'production' alias" in out.err
    assert path == tmp_lake.full_uri("predictions", record.version)
    manifest = tmp_lake.read_json(posixpath.join("predictions", record.version, MANIFEST))
    assert manifest["model_version"] == record.version
    assert manifest["dataset"]["version"] == tiny_dataset.version
    assert manifest["k"] == 10 and manifest["users"] == tiny_dataset.n_users
    assert not [n for n in tmp_lake.listdir("predictions") if n.startswith(".")]

    preds = load_predictions(tmp_lake, "latest")
    assert len(preds) == tiny_dataset.n_users
    item_idx = {f"i{i}": i for i in range(tiny_dataset.n_items)}
    users = np.arange(tiny_dataset.n_users)
    expected = predict.predict_table(
        model,
        users,
        history,
        np.array([f"u{u}" for u in users], dtype=object),
        np.array([f"i{i}" for i in range(tiny_dataset.n_items)], dtype=object),
        10,
    )
    cols = [expected.column(c).to_pylist() for c in ("user_id", "items", "scores")]
    direct = {u: (i, s) for u, i, s in zip(*cols, strict=True)}
    for u in users:
        items, scores = preds[f"u{u}"]
        assert (items, scores) == tuple(direct[f"u{u}"])
        assert len(items) == 10 and all(s.startswith("i") for s in items)
        seen = set(history[u].indices)
        assert not seen & {item_idx[i] for i in items}
        assert all(a >= b for a, b in zip(scores, scores[1:], strict=False))
    # Same model, same k: already published, returned without recomputing (no Ray work).
    assert predict.run(tmp_lake, NAME, None, k=10) == path
    with pytest.raises(LakeError, match="immutable"):
        predict.run(tmp_lake, NAME, None, k=5)


def test_model_ref_resolution(registered, tmp_lake) -> None:
    _, _, record, _ = registered
    assert predict.resolve_model_ref(tmp_lake, NAME, None) == record.version
    promote(tmp_lake, NAME, record.version, "production", force=True)
    assert predict.resolve_model_ref(tmp_lake, NAME, "production") == record.version
    assert predict.resolve_model_ref(tmp_lake, NAME, None) == record.version


def test_explicit_missing_alias_is_an_error(registered, tmp_lake) -> None:
    with pytest.raises(RegistryError, match="production"):
        predict.resolve_model_ref(tmp_lake, NAME, "production")


# ---------------------------------------------------------------- Ranker (no Ray)


def _random_history(n_users: int, n_items: int, per_user: int, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.integers(n_items, size=len(rows))
    m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def _brute_force(model, users, history, k):
    """Dense scores, known items dropped, (score desc, index asc): the lists to expect."""
    scores = model.score(users, history[users]).astype(np.float64)
    scores[history[users].toarray() > 0] = -np.inf
    out = []
    for row in scores:
        order = [i for i in np.lexsort((np.arange(len(row)), -row)) if np.isfinite(row[i])][:k]
        out.append(([f"i{i}" for i in order], row[order]))
    return out


def _assert_lists(table, users, expected) -> None:
    assert table.column("user_id").to_pylist() == [f"u{u}" for u in users]
    got = zip(table.column("items").to_pylist(), table.column("scores").to_pylist(), strict=True)
    for (items, scores), (want_items, want_scores) in zip(got, expected, strict=True):
        assert items == want_items
        np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-6)


def _ids(n: int, prefix: str) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_ranker_vectors_match_brute_force() -> None:
    # 4,000 items: wide enough for top_k's chunked candidate search at k=3.
    n_users, n_items, k = 40, 4000, 3
    model = build_model(ModelArgs(name="mf", embed_dim=8), n_users, n_items, seed=0)
    history = _random_history(n_users, n_items, 5)
    ranker = predict.Ranker(model, history, _ids(n_users, "u"), _ids(n_items, "i"), k, chunk_rows=7)
    assert ranker.model is None and ranker.queries is not None  # MF keeps vectors only
    rng = np.random.default_rng(1)
    for users in (np.arange(3, 33), rng.permutation(n_users)[:23]):  # a batch, any subset
        _assert_lists(ranker.predict(users), users, _brute_force(model, users, history, k))


def test_ranker_scores_model_without_vectors() -> None:
    n_users, n_items, k = 30, 60, 5
    history = _random_history(n_users, n_items, 6)
    model = EASE(n_users, n_items, ease_lambda=10.0).fit(history)
    ranker = predict.Ranker(model, history, _ids(n_users, "u"), _ids(n_items, "i"), k, chunk_rows=4)
    assert ranker.model is model and ranker.items is None
    users = np.arange(n_users)[::-1]
    _assert_lists(ranker.predict(users), users, _brute_force(model, users, history, k))


def test_short_lists_drop_empty_slots() -> None:
    model = build_model(ModelArgs(name="mf", embed_dim=4), 3, 5, seed=1)
    history = sp.csr_matrix(np.array([[1, 1, 1, 0, 0], [0] * 5, [1] * 5], dtype=np.float32))
    table = predict.Ranker(model, history, _ids(3, "u"), _ids(5, "i"), 4).predict(np.arange(3))
    lengths = [len(items) for items in table.column("items").to_pylist()]
    assert lengths == [2, 4, 0]
    assert set(table.column("items").to_pylist()[0]) == {"i3", "i4"}
    assert table.schema == predict.PREDICTION_SCHEMA


def test_ranker_works_from_read_only_buffers() -> None:
    """What an actor gets from the object store: the arrays mapped read-only, no scratch."""
    n_users, n_items = 25, 700
    model = build_model(ModelArgs(name="mf", embed_dim=8, use_bias=True), n_users, n_items)
    history = _random_history(n_users, n_items, 4)
    ranker = predict.Ranker(model, history, _ids(n_users, "u"), _ids(n_items, "i"), 10)
    users = np.arange(n_users)
    want = ranker.predict(users)  # allocates the scratch buffer
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(ranker, protocol=5, buffer_callback=buffers.append)
    assert sum(b.raw().nbytes for b in buffers) > ranker.queries.nbytes  # out of band
    copy = pickle.loads(data, buffers=[bytes(b.raw()) for b in buffers])
    assert not copy.queries.flags.writeable and not copy.items.flags.writeable
    assert copy.predict(users).equals(want)
    assert copy.predict(users).equals(want)  # the buffer reused


def test_predict_table_matches_ranker() -> None:
    n_users, n_items = 20, 90
    model = build_model(ModelArgs(name="mf", embed_dim=8), n_users, n_items, seed=3)
    history = _random_history(n_users, n_items, 3)
    user_ids = np.array(_ids(n_users, "u"), dtype=object)
    item_ids = np.array(_ids(n_items, "i"), dtype=object)
    users = np.arange(n_users)
    table = predict.predict_table(model, users, history, user_ids, item_ids, 10)
    ranked = predict.Ranker(model, history, user_ids, item_ids, 10).predict(users)
    assert table.column("items").equals(ranked.column("items"))
    _assert_lists(table, users, _brute_force(model, users, history, 10))


def test_top_k_dot_reuses_an_out_buffer() -> None:
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(6, 4)).astype(np.float32)
    items = np.asfortranarray(rng.normal(size=(50, 4)).astype(np.float32))
    exclude = _random_history(6, 50, 3)
    want = top_k_dot(queries, items, exclude, 5)
    out = np.full((8, 50), np.nan, dtype=np.float32)
    for _ in range(2):
        got = top_k_dot(queries, items, exclude, 5, out=out)
        np.testing.assert_array_equal(got.indices, want.indices)
        np.testing.assert_array_equal(got.scores, want.scores)
    with pytest.raises(ValueError, match="out must be"):
        top_k_dot(queries, items, exclude, 5, out=np.zeros((5, 50), np.float32))
    with pytest.raises(ValueError, match="out must be"):
        top_k_dot(queries, items, exclude, 5, out=np.zeros((8, 50), np.float64))


def test_id_array_follows_the_index_column() -> None:
    import pyarrow as pa

    table = pa.table({"user_idx": [2, 0, 1], "user_id": ["c", "a", "b"]})
    assert predict.id_array(table, "user_idx", "user_id").to_pylist() == ["a", "b", "c"]


# ---------------------------------------------------------------- Ray Data pool


def test_run_pool_matches_ranker(ray_cluster, tiny_dataset, tmp_lake) -> None:
    """Several actors, several batches and chunks: the same lists as one in-process Ranker."""
    cfg = AppConfig(
        lake=tmp_lake.uri,
        data=DataArgs(name="tiny", source="synthetic"),
        model=ModelArgs(name="mf", embed_dim=8),
    )
    model = build_model(cfg.model, tiny_dataset.n_users, tiny_dataset.n_items, seed=0)
    record = register(tmp_lake, MF_NAME, model, cfg, tiny_dataset, {})
    path = predict.run(
        tmp_lake, MF_NAME, None, k=10, num_actors=2, num_cpus=1, batch_size=16, chunk_rows=5
    )
    assert path == tmp_lake.full_uri("predictions", record.version)
    got = read_predictions(tmp_lake, record.version).sort_by("user_id")
    ranker = predict.Ranker.load(tmp_lake, MF_NAME, record.version, tiny_dataset, 10, chunk_rows=5)
    want = ranker.predict(np.arange(tiny_dataset.n_users)).sort_by("user_id")
    assert got.num_rows == tiny_dataset.n_users
    assert got.column("user_id").equals(want.column("user_id"))
    assert got.column("items").to_pylist() == want.column("items").to_pylist()
    np.testing.assert_allclose(
        np.array(got.column("scores").to_pylist()),
        np.array(want.column("scores").to_pylist()),
        rtol=1e-5,  # float32 sums in another order (BLAS threads differ per process)
    )
