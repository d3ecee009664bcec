from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.evaluate import evaluate
from app.model import (
    EASE,
    MODELS,
    MatrixFactorization,
    Popularity,
    TwoTower,
    build_model,
)

GENRES = [["a"], ["a", "b"], ["b"], [], ["c"], ["a", "c"]]


def _matrix(n_users: int = 7, n_items: int = 6, seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < 0.45).astype(np.float32)
    x[0, :3] = 1.0
    return sp.csr_matrix(x)


def _built(name: str, seed: int = 0, **kw) -> object:
    args = ModelArgs(name=name, embed_dim=8, num_negatives=4, **kw)
    model = build_model(args, 7, 6, item_genres=GENRES, seed=seed)
    x = _matrix()
    if name in ("popularity", "ease"):
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
    fresh = build_model(
        ModelArgs(name=name, embed_dim=8, num_negatives=4), 7, 6, item_genres=GENRES, seed=99
    )
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
