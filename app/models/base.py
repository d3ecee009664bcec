"""The interface every ScaleRec model implements, and the history matrices models read.

Evaluation, tuning, batch prediction and serving only use ``Recommender``: ``fit`` on a user ×
item training matrix, ``score`` a batch of users from their history, optionally expose item and
user vectors (for exact or approximate inner-product retrieval), and round-trip through
``state_dict`` / ``hparams``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import scipy.sparse as sp
import torch


class Recommender(ABC):
    """Base class of every ScaleRec model.

    Users and items are internal indices (``user_idx``, ``item_idx`` of the dataset version).
    ``history`` is a CSR matrix whose row ``r`` holds the known items of ``users[r]`` (it may
    contain items of users unseen in training: fold-in for new users and real-time events).
    """

    family: ClassVar[str]

    def __init__(self, n_users: int, n_items: int) -> None:
        self.n_users = n_users
        self.n_items = n_items

    def fit(self, train: sp.csr_matrix, **options: Any) -> Recommender:
        """Fit the model on a user × item training matrix and return it.

        Closed-form models solve for their weights and ignore ``options``; torch models run
        the plain single-process training loop (``TorchRecommender.fit`` lists its options).

        Args:
            train: ``(n_users, n_items)`` interactions; non-zero entries are positives.
            **options: Training settings of iterative models (epochs, lr, ...).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be fitted")

    @abstractmethod
    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        """Scores of every item for each user, shape ``(len(users), n_items)``, float32."""

    def item_embeddings(self) -> np.ndarray | None:
        """Item vectors whose dot product with ``user_embeddings`` gives ``score`` (or None)."""
        return None

    def user_embeddings(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray | None:
        """User vectors matching ``item_embeddings`` (or None for models without them)."""
        return None

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors that fully describe the fitted model (saved with weights_only loading)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from ``state_dict()``."""

    def hparams(self) -> dict[str, Any]:
        """Constructor arguments besides sizes (stored with the weights)."""
        return {}

    def history(self, dataset: Any, *splits: str) -> sp.csr_matrix:
        """The user × item history this model scores from (binary by default).

        Models that weight history items (e.g. by recency) override it; the sparsity pattern is
        always that of ``dataset.csr(*splits)``, so it also serves to exclude seen items.
        """
        matrix: sp.csr_matrix = dataset.csr(*splits)
        return matrix


def item_columns(history: sp.spmatrix | sp.sparray, n_items: int) -> sp.csr_matrix:
    """A float32 copy of ``history`` with exactly ``n_items`` columns, values kept.

    Columns past ``n_items`` (items newer than the model) are dropped and missing ones are
    added empty, so any history can be multiplied with the model's item weights.
    """
    h = sp.csr_matrix(history, dtype=np.float32, copy=True)
    if h.shape[1] > n_items:
        return h[:, :n_items]
    if h.shape[1] < n_items:
        return sp.csr_matrix((h.data, h.indices, h.indptr), shape=(h.shape[0], n_items))
    return h


def binary_history(history: sp.spmatrix | sp.sparray, n_items: int) -> sp.csr_matrix:
    """``item_columns`` with every stored value set to 1 (the caller's matrix is untouched)."""
    h = item_columns(history, n_items)
    h.data[:] = 1.0
    return h
