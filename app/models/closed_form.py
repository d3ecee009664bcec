"""Closed-form recommenders: popularity, EASE and EDLAE, plus the recency-weighted history.

Each ``fit`` solves for the weights in one step on the binary user × item matrix; there is
nothing to iterate, so the training options of ``Recommender.fit`` are accepted and ignored.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from app.models.base import Recommender, binary_history, item_columns, sequence_ranks


class Popularity(Recommender):
    """Every user gets the items with the most training interactions."""

    family = "popularity"

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.counts = np.zeros(n_items, dtype=np.float32)

    def fit(self, train: sp.csr_matrix, **options: Any) -> Popularity:
        """Count interactions per item."""
        self.counts = np.asarray(
            binary_history(train, self.n_items).sum(axis=0), dtype=np.float32
        ).ravel()
        return self

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        return np.broadcast_to(self.counts, (len(users), self.n_items)).astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return {"counts": torch.from_numpy(self.counts.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: D102
        self.counts = state["counts"].numpy().astype(np.float32)


class EASE(Recommender):
    """Embarrassingly Shallow Autoencoder (Steck 2019): a dense item-item ridge regression.

    ``B = I - P / diag(P)`` with ``P = (XᵀX + λI)⁻¹`` and a zero diagonal; ``score = history @ B``.
    """

    family = "ease"

    def __init__(
        self, n_users: int, n_items: int, ease_lambda: float = 500.0, ease_max_items: int = 40_000
    ) -> None:
        if n_items > ease_max_items:
            need_gib = 3 * n_items * n_items * 8 / 2**30  # Gram, inverse and B in float64
            raise ValueError(
                f"EASE needs a dense {n_items:,} x {n_items:,} item-item matrix (about "
                f"{need_gib:,.1f} GiB to fit), above model.ease_max_items={ease_max_items:,}; "
                "raise model.ease_max_items if the memory is there, or use model.name=mf"
            )
        super().__init__(n_users, n_items)
        self.ease_lambda = float(ease_lambda)
        self.ease_max_items = int(ease_max_items)
        self.weights = np.zeros((n_items, n_items), dtype=np.float32)

    def fit(self, train: sp.csr_matrix, **options: Any) -> EASE:
        """Solve the closed form on the binary user-item matrix."""
        x = binary_history(train, self.n_items)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.ease_lambda
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.weights = b.astype(np.float32)
        return self

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        return np.asarray(binary_history(history, self.n_items) @ self.weights, dtype=np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return {"weights": torch.from_numpy(self.weights.copy())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: D102
        self.weights = state["weights"].numpy().astype(np.float32)

    def hparams(self) -> dict[str, Any]:  # noqa: D102
        return {"ease_lambda": self.ease_lambda, "ease_max_items": self.ease_max_items}


def recency_weighted(
    interactions: Any, n_users: int, n_items: int, tau: float | None
) -> sp.csr_matrix:
    """User × item CSR whose values weight each history item by how recent it is.

    Per user, interactions are ordered by (timestamp, item index) as in the evaluation protocol;
    the latest gets weight 1 and the one ``r`` positions before it ``exp(-r / tau)``. Repeats of a
    (user, item) pair count once, at their first event. ``tau`` None or <= 0 gives a binary
    matrix. Pass the result as ``history`` to ``Recommender.score``: ``EDLAE`` uses the values
    as weights, the other families binarise them.

    Args:
        interactions: columns ``user_idx``, ``item_idx`` and ``timestamp`` (an Arrow table, a
            dict of arrays or a DataFrame), e.g. ``DatasetVersion.read_table("train", "valid")``.
        n_users: rows of the result.
        n_items: columns of the result.
        tau: decay length in interactions.
    """
    return rank_weights(sequence_ranks(interactions, n_users, n_items), n_items, tau)


def rank_weights(ranks: sp.csr_matrix, n_items: int, tau: float | None) -> sp.csr_matrix:
    """A copy of ``ranks`` (rank from the latest + 1) with ``exp(-(rank - 1) / tau)`` values."""
    m = item_columns(ranks, n_items)
    if tau is None or tau <= 0:
        m.data[:] = 1.0
    else:
        # Floored above zero: a weight that underflowed would drop the item from the history
        # (and from the exclusion of seen items) once zeros are eliminated.
        m.data = np.maximum(np.exp(-(m.data.astype(np.float64) - 1.0) / float(tau)), 1e-30)
        m.data = m.data.astype(np.float32)
    return m


def _spd_inverse(a: np.ndarray) -> np.ndarray:
    """Inverse of a symmetric positive definite matrix by Cholesky (cheaper than LU).

    ``a`` is overwritten. Falls back to a general inverse if the factorisation fails.
    """
    from scipy.linalg import lapack

    potrf, potri = (
        (lapack.spotrf, lapack.spotri) if a.dtype == np.float32 else (lapack.dpotrf, lapack.dpotri)
    )
    c, info = potrf(a, lower=0, clean=0, overwrite_a=1)
    if info != 0:
        return np.linalg.inv(a)
    p, info = potri(c, lower=0, overwrite_c=1)
    if info != 0:
        return np.linalg.inv(a)
    # potri fills the upper triangle only.
    lower = np.tril_indices_from(p, -1)
    p[lower] = p.T[lower]
    return p


class EDLAE(Recommender):
    """Emphasised denoising linear autoencoder (Steck 2020) scored on recency-weighted history.

    ``P = (XᵀX + Λ)⁻¹`` with ``Λ = λI + p/(1-p)·diagMat(diag(XᵀX))``, the closed form of a
    linear autoencoder trained with dropout ``p`` on its input, which stops it from learning the
    identity. With ``zero_diagonal`` (EDLAE) ``B = I - P·diagMat(1/diag(P))``, else (DLAE)
    ``B = I - PΛ``; ``p = 0`` with a zero diagonal is EASE. Only items with a training
    interaction get rows and columns (the others would be all zero), which also shrinks the
    solve. ``score = history @ B`` uses the history's values as weights, so a history from
    ``recency_weighted(..., tau=recency_tau)`` emphasises each user's latest items; a binary
    history gives plain EDLAE scores.
    """

    family = "edlae"

    def __init__(
        self,
        n_users: int,
        n_items: int,
        edlae_lambda: float = 200.0,
        dropout: float = 0.25,
        zero_diagonal: bool = True,
        recency_tau: float = 0.0,
        max_items: int = 40_000,
    ) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"EDLAE dropout must be in [0, 1), got {dropout}")
        if edlae_lambda <= 0:
            raise ValueError(f"EDLAE lambda must be > 0, got {edlae_lambda}")
        super().__init__(n_users, n_items)
        self.edlae_lambda = float(edlae_lambda)
        self.dropout = float(dropout)
        self.zero_diagonal = bool(zero_diagonal)
        self.recency_tau = float(recency_tau)
        self.max_items = int(max_items)
        self.items = np.zeros(0, dtype=np.int64)
        self.weights = np.zeros((0, 0), dtype=np.float32)

    def fit(self, train: sp.csr_matrix, **options: Any) -> EDLAE:
        """Solve the closed form on the binary user-item matrix (float32 Cholesky)."""
        x = binary_history(train, self.n_items)
        items = np.flatnonzero(np.diff(x.tocsc().indptr) > 0)
        if len(items) > self.max_items:
            need_gib = 2 * len(items) ** 2 * 4 / 2**30
            raise ValueError(
                f"EDLAE needs a dense {len(items):,} x {len(items):,} item-item matrix (about "
                f"{need_gib:,.1f} GiB), above model.max_items={self.max_items:,}"
            )
        x = x[:, items]
        gram = (x.T @ x).toarray().astype(np.float32)
        counts = np.diag(gram).astype(np.float64)
        reg = self.edlae_lambda + self.dropout / (1.0 - self.dropout) * counts
        gram[np.diag_indices_from(gram)] += reg.astype(np.float32)
        p = _spd_inverse(gram)
        if self.zero_diagonal:
            b = p / (-np.diag(p))[None, :]
        else:
            b = p * (-reg.astype(np.float32))[None, :]
        np.fill_diagonal(b, 0.0)
        self.items = items.astype(np.int64)
        self.weights = np.ascontiguousarray(b, dtype=np.float32)
        return self

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        h = item_columns(history, self.n_items)
        out = np.zeros((h.shape[0], self.n_items), dtype=np.float32)
        if len(self.items):
            out[:, self.items] = h[:, self.items] @ self.weights
        return out

    def history_weights(self, interactions: Any) -> sp.csr_matrix:
        """The history this model was tuned for: ``recency_weighted`` with its ``recency_tau``."""
        return recency_weighted(interactions, self.n_users, self.n_items, self.recency_tau)

    def weigh_history(self, ranks: sp.csr_matrix) -> sp.csr_matrix:
        """Recency weights ``exp(-(rank - 1) / recency_tau)`` (binary for tau 0)."""
        return rank_weights(ranks, self.n_items, self.recency_tau)

    def history(self, dataset: Any, *splits: str) -> sp.csr_matrix:
        """Recency-weighted history of the dataset's splits (see ``history_weights``)."""
        return self.history_weights(dataset.read_table(*splits))

    def state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return {
            "items": torch.from_numpy(self.items.copy()),
            "weights": torch.from_numpy(self.weights.copy()),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: D102
        self.items = state["items"].numpy().astype(np.int64)
        self.weights = state["weights"].numpy().astype(np.float32)

    def hparams(self) -> dict[str, Any]:  # noqa: D102
        return {
            "edlae_lambda": self.edlae_lambda,
            "dropout": self.dropout,
            "zero_diagonal": self.zero_diagonal,
            "recency_tau": self.recency_tau,
            "max_items": self.max_items,
        }
