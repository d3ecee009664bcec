"""Torch models: losses, seeding, fold-in, new items, and the one training loop (fit, run_epoch)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.evaluate import evaluate
from app.models import (
    MatrixFactorization,
    Popularity,
    TorchRecommender,
    TwoTower,
    build_model,
    run_epoch,
)


@pytest.mark.parametrize("name", ["mf", "two_tower"])
def test_seed_reproduces_and_differs(built, small_matrix, name):
    users = np.arange(7)
    a, b, c = built(name, seed=5), built(name, seed=5), built(name, seed=6)
    np.testing.assert_array_equal(a.score(users, small_matrix), b.score(users, small_matrix))
    assert not np.array_equal(a.score(users, small_matrix), c.score(users, small_matrix))
    torch.manual_seed(0)
    la = a.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    torch.manual_seed(0)
    lb = b.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert la.item() == lb.item()


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_losses_are_finite_and_differentiable(built, loss):
    model = built("mf", loss=loss)
    out = model.loss(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))
    out.backward()
    assert torch.isfinite(out)
    assert model.module.item_emb.weight.grad is not None


def test_mf_folds_in_unseen_users(built):
    model = built("mf")
    history = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0]], dtype=np.float32))
    scores = model.score(np.array([7]), history)  # user 7 is outside the trained range
    items = model.item_embeddings()
    np.testing.assert_allclose(scores[0], items[:2].mean(0) @ items.T, rtol=1e-5, atol=1e-6)


def test_two_tower_scores_new_users_and_new_items(built):
    model: TwoTower = built("two_tower")
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


def test_torch_models_are_told_apart_by_type(built):
    assert isinstance(built("mf"), TorchRecommender)
    assert isinstance(built("two_tower"), TorchRecommender)
    assert not isinstance(built("ease"), TorchRecommender)
    assert not isinstance(built("popularity"), TorchRecommender)


@pytest.mark.parametrize("name", ["mf", "two_tower"])
def test_trained_model_beats_random_and_popularity_on_planted_data(tiny_dataset, name):
    train, test = tiny_dataset.csr("train", "valid"), tiny_dataset.csr("test")
    genres = [list(g) for g in tiny_dataset.items().column("genres").to_pylist()]
    args = ModelArgs(name=name, embed_dim=16, num_negatives=10_000, temperature=0.2)
    model = build_model(args, tiny_dataset.n_users, tiny_dataset.n_items, genres, seed=0)
    losses: list[float] = []
    model.fit(
        train, epochs=25, batch_size=64, lr=0.02, on_epoch=lambda _, loss: losses.append(loss)
    )
    assert len(losses) == 25 and losses[-1] < 0.8 * losses[0]
    assert not model.module.training  # fit leaves the module in eval mode

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


def test_fit_is_reproducible_and_keeps_the_callers_rng(small_matrix):
    def trained(seed: int) -> MatrixFactorization:
        model = MatrixFactorization(7, 6, embed_dim=4, num_negatives=3, seed=1)
        return model.fit(small_matrix, epochs=3, batch_size=4, lr=0.05, seed=seed)

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = trained(0), trained(0), trained(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    users = np.arange(7)
    np.testing.assert_array_equal(a.score(users, small_matrix), b.score(users, small_matrix))
    assert not np.array_equal(a.score(users, small_matrix), c.score(users, small_matrix))


def test_run_epoch_steps_once_per_batch_and_weights_the_loss_by_rows():
    weight = torch.nn.Parameter(torch.tensor([2.0]))
    seen: list[int] = []

    def loss_fn(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        seen.append(len(users))
        return weight * (users + items).float().mean()

    optimizer = torch.optim.SGD([weight], lr=0.5)
    batches = [
        (torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])),
        (torch.tensor([4]), torch.tensor([4])),
    ]
    loss_sum, rows = run_epoch(loss_fn, optimizer, batches)
    assert seen == [3, 1] and rows == 4
    # Batch 1: loss 2 * 2 = 4 (x3 rows), step -> weight 2 - 0.5 * 2 = 1; batch 2: 1 * 8 (x1).
    assert loss_sum == pytest.approx(4.0 * 3 + 8.0 * 1)
    assert weight.item() == pytest.approx(1.0 - 0.5 * 8.0)
    assert run_epoch(loss_fn, optimizer, []) == (0.0, 0)
