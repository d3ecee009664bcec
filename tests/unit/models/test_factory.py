"""Every family through the factory: shapes, weights-only round trips, hparams, restore_model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.models import EDLAE, MODELS, MatrixFactorization, Recommender, build_model, restore_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_score_shape_and_dtype(built, small_matrix, name):
    model = built(name)
    scores = model.score(np.array([0, 3, 6]), small_matrix[[0, 3, 6]])
    assert scores.shape == (3, 6)
    assert scores.dtype == np.float32
    assert np.isfinite(scores).all()
    assert model.family == name


@pytest.mark.parametrize("name", sorted(MODELS))
def test_state_dict_round_trip_with_weights_only(built, small_matrix, item_genres, name):
    model = built(name, seed=1)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    args = ModelArgs(name=name, embed_dim=8, num_negatives=4)
    fresh = build_model(args, 7, 6, item_genres=item_genres, seed=99)
    fresh.load_state_dict(state)
    users = np.arange(7)
    np.testing.assert_array_equal(
        model.score(users, small_matrix), fresh.score(users, small_matrix)
    )
    assert set(model.hparams()) == set(fresh.hparams())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_restore_model_rebuilds_every_family(built, small_matrix, name):
    model = built(name, seed=2)
    again = restore_model(model.family, 7, 6, model.hparams(), model.state_dict())
    assert type(again) is type(model)
    users = np.arange(7)
    np.testing.assert_array_equal(
        again.score(users, small_matrix), model.score(users, small_matrix)
    )


def test_restore_model_refuses_unknown_families():
    with pytest.raises(ValueError, match="unknown model family"):
        restore_model("als", 2, 2, {}, {})


def test_build_model_passes_hparams():
    model = build_model(ModelArgs(name="mf", embed_dim=12, temperature=0.3), 4, 5, seed=3)
    assert isinstance(model, MatrixFactorization)
    hp = model.hparams()
    assert hp["embed_dim"] == 12 and hp["temperature"] == 0.3 and hp["seed"] == 3
    assert model.item_embeddings().shape == (5, 12)


def test_edlae_round_trip_keeps_recency_tau(make_matrix):
    x = make_matrix()
    model = EDLAE(7, 6, edlae_lambda=5.0, dropout=0.1, recency_tau=4.0).fit(x)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    again = restore_model("edlae", 7, 6, model.hparams(), torch.load(buf, weights_only=True))
    assert isinstance(again, EDLAE) and again.recency_tau == 4.0
    np.testing.assert_array_equal(again.score(np.arange(7), x), model.score(np.arange(7), x))


def test_a_model_without_fit_says_so():
    class Fixed(Recommender):
        family = "fixed"

        def score(self, users, history):
            return np.zeros((len(users), self.n_items), dtype=np.float32)

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(NotImplementedError, match="Fixed cannot be fitted"):
        Fixed(2, 2).fit(sp.csr_matrix((2, 2)))
