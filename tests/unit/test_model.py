from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.evaluate import evaluate
from app.model import (
    EASE,
    EDLAE,
    MODELS,
    MatrixFactorization,
    Popularity,
    TwoTower,
    build_model,
    load_model,
    recency_weighted,
)

GENRES = [["a"], ["a", "b"], ["b"], [], ["c"], ["a", "c"]]


def _matrix(n_users: int = 7, n_items: int = 6, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < 0.45).astype(np.float32)
    x[0, :3] = 1.0
    return sp.csr_matrix(x)


def _args(name: str, **kw) -> object:
    """``ModelArgs``, or a stand-in for families the config does not list yet."""
    try:
        return ModelArgs(name=name, embed_dim=8, num_negatives=4, **kw)
    except ValueError:
        return SimpleNamespace(name=name, embed_dim=8, num_negatives=4, ease_max_items=40_000, **kw)


def _built(name: str, seed: int = 0, **kw) -> object:
    model = build_model(_args(name, **kw), 7, 6, item_genres=GENRES, seed=seed)
    x = _matrix()
    if name in ("popularity", "ease", "edlae"):
        model.fit(x)
    else:
        model.set_train(x)
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_score_shape_and_dtype(name):
    model = _built(name)
    x = _matrix()
    scores = model.score(np.array([0, 3, 6]), x[[0, 3, 6]])
    assert scores.shape == (3, 6)
    assert scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert model.family == name


def test_popularity_orders_by_train_count():
    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=np.float32))
    model = Popularity(3, 4).fit(x)
    scores = model.score(np.array([0, 1]), x[[0, 1]])
    assert list(np.argsort(-scores[0], kind="stable")) == [0, 1, 3, 2]
    assert (scores[0] == scores[1]).all()


def test_ease_matches_numpy_solve_and_has_zero_diagonal():
    x = _matrix(20, 6, seed=3)
    lam = 2.0
    model = EASE(20, 6, ease_lambda=lam).fit(x)
    g = (x.T @ x).toarray().astype(np.float64) + lam * np.eye(6)
    # Direct solve of the constrained problem: B = I - P diagMat(1 / diag(P)).
    p = np.linalg.solve(g, np.eye(6))
    expected = np.eye(6) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(model.weights, expected, atol=1e-5)
    assert np.all(np.diag(model.weights) == 0.0)
    np.testing.assert_allclose(model.score(np.arange(3), x[:3]), x[:3] @ model.weights, rtol=1e-5)


def test_ease_refuses_above_max_items():
    with pytest.raises(ValueError, match=r"model\.ease_max_items") as err:
        build_model(ModelArgs(name="ease", ease_max_items=100), 5, 101)
    assert "GiB" in str(err.value)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip_with_weights_only(name):
    model = _built(name, seed=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    fresh = build_model(_args(name), 7, 6, item_genres=GENRES, seed=99)
    fresh.load_state_dict(state)
    x = _matrix()
    users = np.arange(7)
    np.testing.assert_array_equal(model.score(users, x), fresh.score(users, x))
    assert set(model.hparams()) == set(fresh.hparams())


@pytest.mark.parametrize("name", ["mf", "two_tower"])
def test_seed_reproduces_and_differs(name):
    x = _matrix()
    users = np.arange(7)
    a, b, c = _built(name, seed=5), _built(name, seed=5), _built(name, seed=6)
    np.testing.assert_array_equal(a.score(users, x), b.score(users, x))
    assert not np.array_equal(a.score(users, x), c.score(users, x))
    torch.manual_seed(0)
    la = a.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    torch.manual_seed(0)
    lb = b.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert la.item() == lb.item()


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_losses_are_finite_and_differentiable(loss):
    model = _built("mf", loss=loss)
    out = model.loss(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))
    out.backward()
    assert torch.isfinite(out)
    assert model.module.item_emb.weight.grad is not None


def test_mf_folds_in_unseen_users():
    model = _built("mf")
    history = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0]], dtype=np.float32))
    scores = model.score(np.array([7]), history)  # user 7 is outside the trained range
    items = model.item_embeddings()
    np.testing.assert_allclose(scores[0], items[:2].mean(0) @ items.T, rtol=1e-5, atol=1e-6)


def test_two_tower_scores_new_users_and_new_items():
    model: TwoTower = _built("two_tower")
    history = sp.csr_matrix(np.array([[0, 1, 1, 0, 0, 0]], dtype=np.float32))
    scores = model.score(np.array([-1]), history)  # a user never seen in training
    assert scores.shape == (1, 6) and np.isfinite(scores).all()
    other = model.score(np.array([-1]), sp.csr_matrix(np.eye(6, dtype=np.float32)[[4]]))
    assert not np.allclose(scores, other)  # the history matters
    new_items = model.embed_new_items([["a", "b"], ["c"], ["unknown-genre"]])
    assert new_items.shape == (3, model.item_embeddings().shape[1])
    assert not np.allclose(new_items[0], new_items[1])
    user = model.user_embeddings(np.array([-1]), history)
    assert (user @ new_items.T).shape == (1, 3)


def _train_plain(model, train: sp.csr_matrix, epochs: int, lr: float = 0.02) -> list[float]:
    model.set_train(train)
    coo = train.tocoo()
    users = torch.from_numpy(coo.row.astype(np.int64))
    items = torch.from_numpy(coo.col.astype(np.int64))
    opt = torch.optim.Adam(model.module.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(epochs):
        model.module.train()
        perm = torch.randperm(len(users), generator=gen)
        total = 0.0
        for start in range(0, len(users), 64):
            b = perm[start : start + 64]
            loss = model.loss(users[b], items[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        losses.append(total / len(users))
    return losses


@pytest.mark.parametrize("name", ["mf", "two_tower"])
def test_trained_model_beats_random_and_popularity_on_planted_data(tiny_dataset, name):
    train, test = tiny_dataset.csr("train", "valid"), tiny_dataset.csr("test")
    genres = [list(g) for g in tiny_dataset.items().column("genres").to_pylist()]
    args = ModelArgs(name=name, embed_dim=16, num_negatives=10_000, temperature=0.2)
    model = build_model(args, tiny_dataset.n_users, tiny_dataset.n_items, genres, seed=0)
    losses = _train_plain(model, train, epochs=25)
    assert losses[-1] < 0.8 * losses[0]

    def ndcg(m):
        return evaluate(lambda u: m.score(u, train[u]), train, test)["ndcg@10"]

    pop = ndcg(Popularity(tiny_dataset.n_users, tiny_dataset.n_items).fit(train))
    rng = np.random.default_rng(0)

    class _Random(Popularity):
        def score(self, users, history):
            return rng.random((len(users), self.n_items)).astype(np.float32)

    rand = ndcg(_Random(tiny_dataset.n_users, tiny_dataset.n_items))
    trained = ndcg(model)
    assert trained > 2.5 * rand
    assert trained > pop + 0.1


def test_build_model_passes_hparams():
    model = build_model(ModelArgs(name="mf", embed_dim=12, temperature=0.3), 4, 5, seed=3)
    assert isinstance(model, MatrixFactorization)
    hp = model.hparams()
    assert hp["embed_dim"] == 12 and hp["temperature"] == 0.3 and hp["seed"] == 3
    assert model.item_embeddings().shape == (5, 12)


def _edlae_numpy(x: np.ndarray, lam: float, p: float, zero_diagonal: bool) -> np.ndarray:
    """Steck (2020) closed forms, solved directly in float64 on the full matrix."""
    g = x.T @ x
    big_lambda = np.diag(lam + p / (1 - p) * np.diag(g))
    if zero_diagonal:
        inv = np.linalg.inv(g + big_lambda)
        b = np.eye(len(g)) - inv / np.diag(inv)[None, :]
    else:
        b = np.linalg.solve(g + big_lambda, g)  # DLAE: (XᵀX + Λ)⁻¹XᵀX
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("zero_diagonal", [True, False])
def test_edlae_matches_numpy_closed_form(zero_diagonal):
    x = _matrix(30, 8, seed=4).toarray()
    x[:, 5] = 0.0  # an item without training interactions gets all-zero weights
    model = EDLAE(30, 8, edlae_lambda=3.0, dropout=0.3, zero_diagonal=zero_diagonal)
    model.fit(sp.csr_matrix(x))
    expected = _edlae_numpy(x, 3.0, 0.3, zero_diagonal)
    full = np.zeros((8, 8), dtype=np.float32)
    full[np.ix_(model.items, model.items)] = model.weights
    np.testing.assert_allclose(full, expected, atol=2e-5)
    assert 5 not in model.items
    scores = model.score(np.arange(30), sp.csr_matrix(x))
    np.testing.assert_allclose(scores, x @ expected, atol=1e-4)


def test_edlae_without_dropout_is_ease():
    x = _matrix(20, 6, seed=3)
    ease = EASE(20, 6, ease_lambda=2.0).fit(x)
    edlae = EDLAE(20, 6, edlae_lambda=2.0, dropout=0.0).fit(x)
    users = np.arange(20)
    np.testing.assert_allclose(edlae.score(users, x), ease.score(users, x), atol=1e-4)


def test_recency_weighted_orders_by_time_and_keeps_first_event():
    table = {
        "user_idx": np.array([0, 0, 0, 0, 1]),
        "item_idx": np.array([2, 0, 1, 2, 3]),
        "timestamp": np.array([10, 30, 30, 40, 5]),
    }
    m = recency_weighted(table, 2, 4, tau=1.0).toarray()
    # User 0: item 2 first at t=10, then items 0 and 1 tie at t=30 (item order), the repeat of 2
    # at t=40 collapses into its first event. Latest (item 1) weighs 1.
    np.testing.assert_allclose(m[0], [np.exp(-1), 1.0, np.exp(-2), 0.0], rtol=1e-6)
    np.testing.assert_allclose(m[1], [0, 0, 0, 1.0])
    assert (recency_weighted(table, 2, 4, tau=None).toarray() == (m > 0)).all()


def test_recency_weighting_ranks_neighbours_of_the_latest_item_first():
    # Items 0-1 and 2-3 are two co-consumption pairs. The user saw 0 long ago and 2 last.
    x = np.zeros((40, 4), dtype=np.float32)
    x[:20, [0, 1]] = 1.0
    x[20:, [2, 3]] = 1.0
    model = EDLAE(40, 4, edlae_lambda=1.0, dropout=0.2).fit(sp.csr_matrix(x))
    table = {"user_idx": [0, 0], "item_idx": [0, 2], "timestamp": [1, 2]}
    binary = model.score(np.array([0]), recency_weighted(table, 1, 4, tau=None))[0]
    recent = model.score(np.array([0]), recency_weighted(table, 1, 4, tau=1.0))[0]
    assert binary[1] == pytest.approx(binary[3], rel=1e-5)  # no order: a tie
    assert recent[3] > recent[1] > 0  # the latest item's neighbour comes first
    weighted = sp.csr_matrix(np.array([[np.exp(-1.0), 0, 1.0, 0]], dtype=np.float32))
    np.testing.assert_allclose(
        recent,
        model.score(np.array([0]), weighted)[0],
    )


def test_edlae_load_model_round_trip_keeps_recency_tau():
    model = EDLAE(7, 6, edlae_lambda=5.0, dropout=0.1, recency_tau=4.0).fit(_matrix())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    again = load_model("edlae", 7, 6, model.hparams(), torch.load(buf, weights_only=True))
    assert isinstance(again, EDLAE) and again.recency_tau == 4.0
    np.testing.assert_array_equal(
        again.score(np.arange(7), _matrix()), model.score(np.arange(7), _matrix())
    )
