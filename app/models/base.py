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

    def weigh_history(self, ranks: sp.csr_matrix) -> sp.csr_matrix:
        """The history this model scores from, given each item's rank from the latest + 1.

        ``ranks`` is ``sequence_ranks``-shaped (1 = the user's latest item). Binary by default;
        models that weight items by recency override it (``EDLAE``, ``SequenceAutoencoder``).
        """
        return binary_history(ranks, self.n_items)

    def sequence_history(self, rows: list[np.ndarray]) -> sp.csr_matrix:
        """``weigh_history`` of time-ordered item rows (oldest first, each item once).

        Serving calls it with a user's stored sequence followed by their live events.
        """
        return self.weigh_history(rows_as_ranks(rows, self.n_items))


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


def sequence_ranks(interactions: Any, n_users: int, n_items: int) -> sp.csr_matrix:
    """User × item CSR whose values are each item's rank from the user's latest, plus one.

    Per user, interactions are ordered by (timestamp, item index) as in the evaluation protocol;
    the latest gets 1, the one before it 2, and so on. Repeats of a (user, item) pair count
    once, at their first event.

    Args:
        interactions: columns ``user_idx``, ``item_idx`` and ``timestamp`` (an Arrow table, a
            dict of arrays or a DataFrame), e.g. ``DatasetVersion.read_table("train", "valid")``.
        n_users: rows of the result.
        n_items: columns of the result.
    """
    users = np.asarray(interactions["user_idx"], dtype=np.int64)
    items = np.asarray(interactions["item_idx"], dtype=np.int64)
    stamps = np.asarray(interactions["timestamp"], dtype=np.int64)
    order = np.lexsort((items, stamps, users))
    users, items = users[order], items[order]
    # The first event of a (user, item) pair is the one that counts.
    _, first = np.unique(users * n_items + items, return_index=True)
    keep = np.zeros(len(users), dtype=bool)
    keep[first] = True
    users, items = users[keep], items[keep]
    counts = np.bincount(users, minlength=n_users)
    ranks = np.cumsum(counts)[users] - np.arange(len(users))  # 1 = the user's latest
    m = sp.csr_matrix(
        (ranks.astype(np.float32), (users, items)), shape=(n_users, n_items), dtype=np.float32
    )
    m.sort_indices()
    return m


def rows_as_ranks(rows: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    """CSR of time-ordered item rows (oldest first) with rank from the latest + 1 as values."""
    lens = np.array([len(r) for r in rows], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    indices = np.concatenate(rows).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    row_of = np.repeat(np.arange(len(rows)), lens)
    ranks = (indptr[1:][row_of] - np.arange(len(indices))).astype(np.float32)
    m = sp.csr_matrix((ranks, indices, indptr), shape=(len(rows), n_items))
    m.sort_indices()
    return m
