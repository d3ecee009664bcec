"""Tests for app.evaluate: exact hand-computed metrics, ranx agreement, Ray, the stage's run."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.evaluate import evaluate, evaluate_ds, metrics_table, ranking_metrics, run
from app.models import Recommender, top_k


def _csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    r = [u for u, items in enumerate(rows) for _ in items]
    c = [i for items in rows for i in items]
    return sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n_items))


# --- hand-built case ---
# 4 users x 6 items, k = 3.
# user 0: scores [.1 .9 .5 .9 .2 .7], history {1} -> ranking 3 (.9), 5 (.7), 2 (.5); relevant {2, 4}
#         hits [0 0 1]; recall = 1 / min(3, 2) = 0.5; DCG = 1/log2(4) = 0.5;
#         IDCG over min(3, 2) = 2 items = 1/log2(2) + 1/log2(3) = 1 + 0.630929753571457 = 1.63093
#         NDCG = 0.5 / 1.630929753571457 = 0.306571...; HR = 1; MRR = 1/3
# user 1: all scores 1.0 (ties -> lower index), no history -> top [0 1 2]; relevant {0,1,2,3,4}
#         hits [1 1 1]; recall = 3 / min(3, 5) = 1; NDCG = 1; HR = 1; MRR = 1
# user 2: no relevant item -> not evaluated (its list does not count for coverage either)
# user 3: scores [.3 .2 .1 0 0 0], history {0} -> 1, 2, then the tie at 0 goes to item 3;
#         relevant {5}: no hit -> every metric 0
# means over the 3 evaluated users:
#   ndcg = (0.306571 + 1 + 0) / 3; recall = (0.5 + 1 + 0) / 3 = 0.5; hr = 2/3;
#   mrr = (1/3 + 1 + 0) / 3 = 4/9; coverage = |{3,5,2} u {0,1,2} u {1,2,3}| / 6 = 5/6
_SCORES = np.array(
    [
        [0.1, 0.9, 0.5, 0.9, 0.2, 0.7],
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],
        [0.6, 0.5, 0.4, 0.3, 0.2, 0.1],
        [0.3, 0.2, 0.1, 0.0, 0.0, 0.0],
    ],
    dtype=np.float32,
)
_HISTORY = _csr([[1], [], [], [0]], 6)
_TARGET = _csr([[2, 4], [0, 1, 2, 3, 4], [], [5]], 6)


def test_hand_built_case_top_k_and_per_user_metrics() -> None:
    top = top_k(_SCORES, _HISTORY, 3).indices
    np.testing.assert_array_equal(top, [[3, 5, 2], [0, 1, 2], [0, 1, 2], [1, 2, 3]])
    m = ranking_metrics(top, _TARGET, 3)
    ndcg0 = 0.5 / (1.0 + 1.0 / math.log2(3))
    np.testing.assert_allclose(m["ndcg@3"][[0, 1, 3]], [ndcg0, 1.0, 0.0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(m["recall@3"][[0, 1, 3]], [0.5, 1.0, 0.0])
    np.testing.assert_array_equal(m["hr@3"][[0, 1, 3]], [1.0, 1.0, 0.0])
    np.testing.assert_allclose(m["mrr@3"][[0, 1, 3]], [1 / 3, 1.0, 0.0], atol=1e-15)
    assert all(np.isnan(m[key][2]) for key in ("ndcg@3", "recall@3", "hr@3", "mrr@3"))
    np.testing.assert_array_equal(m["n_relevant"], [2, 5, 0, 1])


def test_hand_built_case_evaluate() -> None:
    res = evaluate(lambda users: _SCORES[users], _HISTORY, _TARGET, k=3, batch_size=2)
    assert set(res) == {"ndcg@3", "recall@3", "hr@3", "mrr@3", "coverage@3", "users"}
    assert res["users"] == 3
    assert res["ndcg@3"] == pytest.approx((0.5 / (1.0 + 1.0 / math.log2(3)) + 1.0) / 3, abs=1e-15)
    assert res["recall@3"] == pytest.approx(0.5, abs=1e-15)
    assert res["hr@3"] == pytest.approx(2 / 3, abs=1e-15)
    assert res["mrr@3"] == pytest.approx(4 / 9, abs=1e-15)
    assert res["coverage@3"] == pytest.approx(5 / 6, abs=1e-15)


def test_default_keys_use_k() -> None:
    res = evaluate(lambda users: _SCORES[users], _HISTORY, _TARGET)
    assert set(res) == {"ndcg@10", "recall@10", "hr@10", "mrr@10", "coverage@10", "users"}


# --- agreement with ranx ---
@pytest.mark.slow  # numba compiles ranx's metrics on first use, which takes a while
def test_agrees_with_ranx() -> None:
    """Per-user NDCG@10, HR@10 and MRR@10 equal ranx on every user; Recall@10 equals ranx's
    recall (hits/|rel|) on users with |rel| <= 10, and hits@10 / 10 on users with |rel| > 10
    (the protocol divides by min(10, |rel|), ranx by |rel|)."""
    ranx = pytest.importorskip("ranx")
    rng = np.random.default_rng(7)
    n_users, n_items, k = 400, 120, 10
    scores = rng.standard_normal((n_users, n_items)).astype(np.float32)
    history = sp.random(n_users, n_items, density=0.1, random_state=2, format="csr")
    sizes = rng.integers(1, 25, size=n_users)  # 1..24 relevant items: both sides of k
    target = _csr([list(rng.choice(n_items, s, replace=False)) for s in sizes], n_items)
    target = target - target.multiply(history > 0)  # relevant items are never in the history
    target.eliminate_zeros()
    top = top_k(scores, history, k).indices
    ours = ranking_metrics(top, target, k)

    users = [u for u in range(n_users) if target[u].nnz > 0]
    qrels = ranx.Qrels({f"u{u}": {f"i{i}": 1 for i in target[u].indices} for u in users})
    run_ = ranx.Run({f"u{u}": {f"i{i}": float(k - r) for r, i in enumerate(top[u])} for u in users})
    names = ["ndcg@10", "recall@10", "hit_rate@10", "mrr@10", "hits@10"]
    ranx.evaluate(qrels, run_, names)
    theirs = {name: np.array([run_.scores[name][f"u{u}"] for u in users]) for name in names}
    n_rel = ours["n_relevant"][users]
    assert (n_rel > 10).any() and (n_rel <= 10).any()

    np.testing.assert_allclose(ours["ndcg@10"][users], theirs["ndcg@10"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["hr@10"][users], theirs["hit_rate@10"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(ours["mrr@10"][users], theirs["mrr@10"], rtol=0, atol=1e-12)
    small = n_rel <= 10
    np.testing.assert_allclose(
        ours["recall@10"][users][small], theirs["recall@10"][small], rtol=0, atol=1e-12
    )
    np.testing.assert_allclose(
        ours["recall@10"][users][~small], theirs["hits@10"][~small] / 10, rtol=0, atol=1e-12
    )


# --- Ray Data ---
class _TableModel(Recommender):
    """Scores are a fixed table lookup, so they never depend on how users are batched."""

    family = "mf"

    def __init__(self, n_users: int, n_items: int, seed: int = 0, ties: bool = True) -> None:
        super().__init__(n_users, n_items)
        rng = np.random.default_rng(seed)
        raw = (
            rng.integers(0, 8, size=(n_users, n_items)) if ties else rng.random((n_users, n_items))
        )
        self.table = torch.tensor(raw, dtype=torch.float32)

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return self.table[torch.as_tensor(users)].numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"table": self.table}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.table = state["table"]


@pytest.fixture(scope="module")
def ray_session(request: pytest.FixtureRequest):
    """The shared ``ray_cluster`` fixture when conftest has it, else a small local cluster."""
    import ray
    from ray import cloudpickle

    # Workers cannot import this test module: ship its classes (the test model) by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        request.getfixturevalue("ray_cluster")
        yield
        return
    except pytest.FixtureLookupError:
        pass
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def _random_split(n_users: int, n_items: int, seed: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    history = sp.random(n_users, n_items, density=0.15, random_state=seed, format="csr")
    target = sp.random(n_users, n_items, density=0.05, random_state=seed + 1, format="csr")
    target = target - target.multiply(history > 0)
    target.eliminate_zeros()
    return history, target


def test_evaluate_ds_equals_evaluate(ray_session: None) -> None:
    n_users, n_items = 700, 90
    model = _TableModel(n_users, n_items, seed=3)
    history, target = _random_split(n_users, n_items, seed=4)

    def score_fn(users: np.ndarray) -> np.ndarray:
        return model.score(users, history[users])

    local = evaluate(score_fn, history, target, k=10, batch_size=1024)
    local_small = evaluate(score_fn, history, target, k=10, batch_size=37)
    dist = evaluate_ds(model, history, target, k=10, batch_size=128)
    assert local["users"] > 500
    assert dist == local  # exact: sums are error-free, so batching changes nothing
    assert local_small == local


def test_metrics_table() -> None:
    rows = [
        {
            "model": "popularity",
            "ndcg@10": 0.0885,
            "recall@10": 0.0822,
            "hr@10": 0.39,
            "mrr@10": 0.2,
            "coverage@10": 0.01,
        },
        {"model": "ease", "ndcg@10": 0.1303},
    ]
    table = metrics_table(rows)
    lines = table.splitlines()
    assert lines[0].split() == ["model", "ndcg@10", "recall@10", "hr@10", "mrr@10", "coverage@10"]
    assert "0.0885" in lines[2] and lines[2].startswith("popularity")
    assert lines[3].split() == ["ease", "0.1303", "-", "-", "-", "-"]
    assert len({len(line) for line in lines}) == 1


# --- the jobs.evaluate entry point ---
@pytest.mark.slow  # a second Ray Data actor pool
def test_run_writes_test_metrics(ray_session: None, tmp_path) -> None:
    from app.config import load_config
    from app.models import EASE
    from app.store import Lake, get_record, load_dataset, register, registry_name, write_dataset

    n_users, n_items = 60, 40
    train, test = _random_split(n_users, n_items, seed=11)
    valid = _csr([[int(np.argmin(train[u].toarray()))] for u in range(n_users)], n_items)
    lake = Lake(str(tmp_path / "lake"))
    ids = [str(i) for i in range(max(n_users, n_items))]
    splits = {"train": train, "valid": valid, "test": test}
    write_dataset(lake, "tiny", "v1", splits, ids[:n_users], ids[:n_items], [["a"]] * n_items)
    cfg = load_config(
        overrides=[f"lake={lake.uri}", "data.source=synthetic", "data.name=tiny"]
        + ["model.name=ease", "model.ease_lambda=10"]
    )
    model = EASE(n_users, n_items, ease_lambda=10.0).fit(train)
    dataset = load_dataset(lake, "tiny", "v1")
    name = registry_name("tiny", "ease")
    rec = register(lake, name, model, cfg, dataset, {"valid_ndcg@10": 0.1})
    res = run(lake, name, "latest")

    history = dataset.csr("train", "valid")
    expected = evaluate(lambda u: model.score(u, history[u]), history, dataset.csr("test"))
    assert res == expected
    stored = get_record(lake, name, rec.version).metrics
    assert stored["valid_ndcg@10"] == 0.1  # merged, not replaced
    assert stored["ndcg@10"] == res["ndcg@10"]
    assert all(stored[k] == res[k] for k in ("recall@10", "hr@10", "mrr@10", "coverage@10"))
    assert stored["test_users"] == res["users"]
    assert stored["test_fit_on"] == "train"
