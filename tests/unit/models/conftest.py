"""Shared inputs of the model tests: a small random user × item matrix and built models."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import scipy.sparse as sp

from app.config import ModelArgs
from app.models import Recommender, TorchRecommender, build_model

GENRES = [["a"], ["a", "b"], ["b"], [], ["c"], ["a", "c"]]
"""Genres of the 6 items of ``small_matrix`` (two-tower item features)."""


def random_matrix(n_users: int = 7, n_items: int = 6, seed: int = 0) -> sp.csr_matrix:
    """A binary interaction matrix; user 0 always has items 0-2."""
    rng = np.random.default_rng(seed)
    x = (rng.random((n_users, n_items)) < 0.45).astype(np.float32)
    x[0, :3] = 1.0
    return sp.csr_matrix(x)


@pytest.fixture
def item_genres() -> list[list[str]]:
    """``GENRES``."""
    return GENRES


@pytest.fixture
def make_matrix() -> Callable[..., sp.csr_matrix]:
    """``make_matrix(n_users=7, n_items=6, seed=0)``: see ``random_matrix``."""
    return random_matrix


@pytest.fixture
def small_matrix() -> sp.csr_matrix:
    """7 users × 6 items (the matrix ``built`` models are fitted on)."""
    return random_matrix()


@pytest.fixture
def built() -> Callable[..., Recommender]:
    """``built(name, seed=0, **model_args)``: a 7 × 6 model, fitted (closed form) or prepared."""

    def build(name: str, seed: int = 0, **kw: object) -> Recommender:
        args = ModelArgs(name=name, embed_dim=8, num_negatives=4, **kw)
        model = build_model(args, 7, 6, item_genres=GENRES, seed=seed)
        if isinstance(model, TorchRecommender):
            model.prepare(random_matrix())
        else:
            model.fit(random_matrix())
        return model

    return build
