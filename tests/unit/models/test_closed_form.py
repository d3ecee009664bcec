"""Closed-form models: popularity, EASE, EDLAE against direct numpy solves; recency weights."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from app.config import ModelArgs
from app.models import EASE, EDLAE, Popularity, build_model, recency_weighted


def test_popularity_orders_by_train_count():
    x = sp.csr_matrix(np.array([[1, 1, 0, 0], [1, 0, 0, 1], [1, 1, 0, 0]], dtype=np.float32))
    model = Popularity(3, 4).fit(x)
    scores = model.score(np.array([0, 1]), x[[0, 1]])
    assert list(np.argsort(-scores[0], kind="stable")) == [0, 1, 3, 2]
    assert (scores[0] == scores[1]).all()


def test_ease_matches_numpy_solve_and_has_zero_diagonal(make_matrix):
    x = make_matrix(20, 6, seed=3)
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


def test_closed_form_fit_accepts_and_ignores_training_options(make_matrix):
    x = make_matrix()
    a = EASE(7, 6, ease_lambda=3.0).fit(x)
    b = EASE(7, 6, ease_lambda=3.0).fit(x, epochs=5, lr=0.1, seed=3)
    np.testing.assert_array_equal(a.weights, b.weights)


def test_scoring_leaves_the_callers_history_alone(make_matrix):
    x = make_matrix()
    weighted = x.copy()
    weighted.data[:] = np.linspace(0.1, 0.9, weighted.nnz, dtype=np.float32)
    before = weighted.data.copy()
    EASE(7, 6, ease_lambda=3.0).fit(weighted).score(np.arange(7), weighted)
    np.testing.assert_array_equal(weighted.data, before)


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
def test_edlae_matches_numpy_closed_form(make_matrix, zero_diagonal):
    x = make_matrix(30, 8, seed=4).toarray()
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


def test_edlae_without_dropout_is_ease(make_matrix):
    x = make_matrix(20, 6, seed=3)
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
    np.testing.assert_allclose(recent, model.score(np.array([0]), weighted)[0])
