"""Recommender models sharing one small interface (fit / score / embed / save / load).

Evaluation, tuning, batch prediction and serving only use ``Recommender``; ``build_model`` turns a
``ModelArgs`` section into a model sized by a dataset's id maps.
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


# --------------------------------------------------------------------------------------------
# Closed-form models
# --------------------------------------------------------------------------------------------


def _rows(history: sp.csr_matrix, n_items: int) -> sp.csr_matrix:
    """Binary CSR restricted to the model's item columns (new items are unknown to it)."""
    h = sp.csr_matrix(history, dtype=np.float32)
    if h.shape[1] != n_items:
        h = (
            h[:, :n_items]
            if h.shape[1] > n_items
            else sp.hstack(
                [h, sp.csr_matrix((h.shape[0], n_items - h.shape[1]), dtype=np.float32)],
                format="csr",
            )
        )
    h.data[:] = 1.0
    return h


class Popularity(Recommender):
    """Every user gets the items with the most training interactions."""

    family = "popularity"

    def __init__(self, n_users: int, n_items: int) -> None:
        super().__init__(n_users, n_items)
        self.counts = np.zeros(n_items, dtype=np.float32)

    def fit(self, train: sp.csr_matrix) -> Popularity:
        """Count interactions per item."""
        self.counts = np.asarray(_rows(train, self.n_items).sum(axis=0), dtype=np.float32).ravel()
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

    def fit(self, train: sp.csr_matrix) -> EASE:
        """Solve the closed form on the binary user-item matrix."""
        x = _rows(train, self.n_items)
        gram = (x.T @ x).toarray().astype(np.float64)
        gram[np.diag_indices_from(gram)] += self.ease_lambda
        p = np.linalg.inv(gram)
        b = -p / np.diag(p)[None, :]
        np.fill_diagonal(b, 0.0)
        self.weights = b.astype(np.float32)
        return self

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        return np.asarray(_rows(history, self.n_items) @ self.weights, dtype=np.float32)

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
    users = np.asarray(interactions["user_idx"], dtype=np.int64)
    items = np.asarray(interactions["item_idx"], dtype=np.int64)
    stamps = np.asarray(interactions["timestamp"], dtype=np.int64)
    order = np.lexsort((items, stamps, users))
    users, items = users[order], items[order]
    # The first event of a (user, item) pair is the one that counts.
    keys = users * n_items + items
    _, first = np.unique(keys, return_index=True)
    keep = np.zeros(len(keys), dtype=bool)
    keep[first] = True
    users, items = users[keep], items[keep]
    counts = np.bincount(users, minlength=n_users)
    rank = np.cumsum(counts)[users] - 1 - np.arange(len(users))  # 0 = the user's latest
    if tau is None or tau <= 0:
        values = np.ones(len(users), dtype=np.float32)
    else:
        # Floored above zero: a weight that underflowed would drop the item from the history
        # (and from the exclusion of seen items) once zeros are eliminated.
        values = np.maximum(np.exp(-rank / float(tau)), 1e-30).astype(np.float32)
    m = sp.csr_matrix((values, (users, items)), shape=(n_users, n_items), dtype=np.float32)
    m.sort_indices()
    return m


def _weighted_rows(history: sp.csr_matrix, n_items: int) -> sp.csr_matrix:
    """Like ``_rows`` but keeps the values (recency weights); duplicates are summed."""
    h = sp.csr_matrix(history, dtype=np.float32)
    if h.shape[1] > n_items:
        h = h[:, :n_items]
    elif h.shape[1] < n_items:
        h = sp.csr_matrix((h.data, h.indices, h.indptr), shape=(h.shape[0], n_items))
    return h


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

    def fit(self, train: sp.csr_matrix) -> EDLAE:
        """Solve the closed form on the binary user-item matrix (float32 Cholesky)."""
        x = _rows(train, self.n_items)
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
        h = _weighted_rows(history, self.n_items)
        out = np.zeros((h.shape[0], self.n_items), dtype=np.float32)
        if len(self.items):
            out[:, self.items] = h[:, self.items] @ self.weights
        return out

    def history_weights(self, interactions: Any) -> sp.csr_matrix:
        """The history this model was tuned for: ``recency_weighted`` with its ``recency_tau``."""
        return recency_weighted(interactions, self.n_users, self.n_items, self.recency_tau)

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


# --------------------------------------------------------------------------------------------
# Torch models
# --------------------------------------------------------------------------------------------


def _csr_tensors(m: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.asarray(m.indptr, dtype=np.int64)),
        torch.from_numpy(np.asarray(m.indices, dtype=np.int64)),
    )


class _RetrievalModule(torch.nn.Module):
    """Shared loss of the embedding models; ``forward`` is the loss so DDP syncs its gradients."""

    def __init__(
        self,
        n_items: int,
        loss: str,
        num_negatives: int,
        temperature: float,
        l2: float,
        logq: bool,
    ) -> None:
        super().__init__()
        self.n_items = n_items
        self.loss_name = loss
        self.num_negatives = num_negatives
        self.temperature = temperature
        self.l2 = l2
        self.logq = logq
        # log item frequency in train (logQ correction); set by the trainer, not saved.
        self.log_q: torch.Tensor | None = None
        # Training history (CSR) for user towers; set by the trainer, not saved.
        self.train_indptr: torch.Tensor | None = None
        self.train_indices: torch.Tensor | None = None

    def user_vectors(self, users: torch.Tensor, pos_items: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def item_bias(self, items: torch.Tensor | None = None) -> torch.Tensor | None:
        return None

    def _logits(self, u: torch.Tensor, items: torch.Tensor | None) -> torch.Tensor:
        v = self.item_vectors(items)
        logits = u @ v.T
        b = self.item_bias(items)
        return logits if b is None else logits + b[None, :]

    def forward(self, users: torch.Tensor, pos_items: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch of (user, positive item) pairs."""
        u = self.user_vectors(users, pos_items)
        pos_v = self.item_vectors(pos_items)
        reg = u.pow(2).sum(1).mean() + pos_v.pow(2).sum(1).mean()
        dev = users.device
        if self.loss_name == "bpr":
            neg = torch.randint(self.n_items, (len(users), self.num_negatives), device=dev)
            neg_v = self.item_vectors(neg.reshape(-1)).reshape(len(users), self.num_negatives, -1)
            s_pos = (u * pos_v).sum(-1, keepdim=True)
            s_neg = torch.einsum("bd,bnd->bn", u, neg_v)
            bp, bn = self.item_bias(pos_items), self.item_bias(neg.reshape(-1))
            if bp is not None and bn is not None:
                s_pos = s_pos + bp[:, None]
                s_neg = s_neg + bn.reshape(len(users), -1)
            loss = -torch.nn.functional.logsigmoid(s_pos - s_neg).mean()
            reg = reg + neg_v.pow(2).sum(-1).mean()
        elif self.num_negatives >= self.n_items:
            # Exact softmax over the whole catalogue (cheap for small catalogues).
            logits = self._logits(u, None) / self.temperature
            loss = torch.nn.functional.cross_entropy(logits, pos_items)
        else:
            # In-batch positives + uniform negatives; logQ corrects the popularity bias of
            # in-batch sampling (uniform samples all share log(1/n) and need no correction).
            neg = torch.randint(self.n_items, (self.num_negatives,), device=dev)
            cand = torch.cat([pos_items, neg])
            logits = self._logits(u, cand) / self.temperature
            if self.logq and self.log_q is not None:
                corr = torch.cat(
                    [
                        self.log_q.to(dev)[pos_items],
                        torch.full_like(neg, 0, dtype=u.dtype) - float(np.log(self.n_items)),
                    ]
                )
                logits = logits - corr[None, :]
            # The same item elsewhere in the candidates is not a negative.
            dup = cand[None, :] == pos_items[:, None]
            dup[torch.arange(len(users), device=dev), torch.arange(len(users), device=dev)] = False
            logits = logits.masked_fill(dup, float("-inf"))
            target = torch.arange(len(users), device=dev)
            loss = torch.nn.functional.cross_entropy(logits, target)
        return loss + self.l2 * reg


class _MFModule(_RetrievalModule):
    def __init__(
        self, n_users: int, n_items: int, embed_dim: int, use_bias: bool, **loss_kw: Any
    ) -> None:
        super().__init__(n_items, **loss_kw)
        self.user_emb = torch.nn.Embedding(n_users, embed_dim)
        self.item_emb = torch.nn.Embedding(n_items, embed_dim)
        torch.nn.init.normal_(self.user_emb.weight, std=0.1)
        torch.nn.init.normal_(self.item_emb.weight, std=0.1)
        self.bias = torch.nn.Parameter(torch.zeros(n_items)) if use_bias else None

    def user_vectors(self, users: torch.Tensor, pos_items: torch.Tensor | None) -> torch.Tensor:
        return self.user_emb(users)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        return self.item_emb.weight if items is None else self.item_emb(items)

    def item_bias(self, items: torch.Tensor | None = None) -> torch.Tensor | None:
        if self.bias is None:
            return None
        return self.bias if items is None else self.bias[items]


class _TwoTowerModule(_RetrievalModule):
    genre_offsets: torch.Tensor
    genre_indices: torch.Tensor

    def __init__(
        self,
        n_users: int,
        n_items: int,
        n_genres: int,
        embed_dim: int,
        history_dropout: float,
        **loss_kw: Any,
    ) -> None:
        super().__init__(n_items, **loss_kw)
        d = embed_dim
        self.history_dropout = history_dropout
        self.item_id_emb = torch.nn.Embedding(n_items, d)
        self.genre_emb = torch.nn.EmbeddingBag(max(n_genres, 1), d, mode="mean")
        self.history_emb = torch.nn.EmbeddingBag(n_items, d, mode="sum")
        self.user_id_emb = torch.nn.Embedding(n_users, d)
        for emb in (self.item_id_emb, self.genre_emb, self.history_emb, self.user_id_emb):
            torch.nn.init.normal_(emb.weight, std=0.1)
        with torch.no_grad():
            self.user_id_emb.weight.mul_(0.1)  # the history carries most of the signal
        self.item_proj = torch.nn.Linear(d, d)
        self.user_proj = torch.nn.Linear(d, d)
        self.register_buffer("genre_offsets", torch.zeros(n_items + 1, dtype=torch.int64))
        self.register_buffer("genre_indices", torch.zeros(0, dtype=torch.int64))

    def item_tower(self, id_part: torch.Tensor, genre_part: torch.Tensor) -> torch.Tensor:
        return self.item_proj(id_part + genre_part)

    def _genre_mean(self, items: torch.Tensor | None) -> torch.Tensor:
        off = self.genre_offsets
        if items is None:
            items = torch.arange(self.n_items, device=off.device)
        starts, ends = off[items], off[items + 1]
        lens = ends - starts
        flat = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens) + torch.arange(
            int(lens.sum()), device=off.device
        )
        bag_offsets = torch.cumsum(lens, 0) - lens
        return self.genre_emb(self.genre_indices[flat], bag_offsets)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        ids = self.item_id_emb.weight if items is None else self.item_id_emb(items)
        return self.item_tower(ids, self._genre_mean(items))

    def user_tower(self, id_part: torch.Tensor, hist_mean: torch.Tensor) -> torch.Tensor:
        return self.user_proj(id_part + hist_mean)

    def user_vectors(self, users: torch.Tensor, pos_items: torch.Tensor | None) -> torch.Tensor:
        # Training: the user's train history minus the target item (else the tower learns to
        # find the target in its own input), with random history dropout as denoising.
        assert self.train_indptr is not None and self.train_indices is not None
        indptr = self.train_indptr.to(users.device)
        starts, ends = indptr[users], indptr[users + 1]
        lens = ends - starts
        flat = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens) + torch.arange(
            int(lens.sum()), device=users.device
        )
        items = self.train_indices.to(users.device)[flat]
        row = torch.repeat_interleave(torch.arange(len(users), device=users.device), lens)
        keep = torch.ones_like(items, dtype=torch.float32)
        if pos_items is not None:
            keep = keep * (items != pos_items[row]).float()
        if self.training and self.history_dropout > 0:
            keep = keep * (torch.rand_like(keep) >= self.history_dropout).float()
        summed = self.history_emb(items, torch.cumsum(lens, 0) - lens, per_sample_weights=keep)
        count = torch.zeros(len(users), device=users.device).index_add_(0, row, keep)
        hist_mean = summed / count.clamp(min=1.0)[:, None]
        return self.user_tower(self.user_id_emb(users), hist_mean)


class _TorchRecommender(Recommender):
    """A recommender backed by a ``torch.nn.Module`` whose ``forward`` returns the loss."""

    module: _RetrievalModule

    def __init__(
        self,
        n_users: int,
        n_items: int,
        embed_dim: int = 64,
        loss: str = "softmax",
        num_negatives: int = 256,
        temperature: float = 0.1,
        l2: float = 0.0,
        logq: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(n_users, n_items)
        self._hp: dict[str, Any] = {
            "embed_dim": int(embed_dim),
            "loss": str(loss),
            "num_negatives": int(num_negatives),
            "temperature": float(temperature),
            "l2": float(l2),
            "logq": bool(logq),
            "seed": int(seed),
        }
        self._loss_kw = {
            "loss": loss,
            "num_negatives": num_negatives,
            "temperature": temperature,
            "l2": l2,
            "logq": logq,
        }

    def set_train(self, train: sp.csr_matrix) -> None:
        """Give the module what training needs from the train split (history, item frequency)."""
        x = _rows(train, self.n_items)
        self.module.train_indptr, self.module.train_indices = _csr_tensors(x)
        counts = np.asarray(x.sum(axis=0), dtype=np.float64).ravel() + 1.0
        self.module.log_q = torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))

    def loss(self, users: torch.Tensor, pos_items: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch (the train loop calls the possibly DDP-wrapped module)."""
        return self.module(users, pos_items)

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User vectors from history alone: the mean of the history's item vectors."""
        h = _rows(history, self.n_items)
        n = np.maximum(np.asarray(h.sum(axis=1)).ravel(), 1.0)
        items = self.item_embeddings()
        assert items is not None
        return np.asarray((h @ items) / n[:, None], dtype=np.float32)

    def item_embeddings(self) -> np.ndarray:  # noqa: D102
        with torch.no_grad():
            self.module.eval()
            v = self.module.item_vectors(None)
            b = self.module.item_bias(None)
            if b is not None:
                # Bias as an extra dimension so that a dot product gives the full score.
                v = torch.cat([v, b[:, None]], dim=1)
            return v.float().cpu().numpy()

    def _append_bias_dim(self, u: np.ndarray) -> np.ndarray:
        if self.module.item_bias(None) is None:
            return u
        return np.concatenate([u, np.ones((len(u), 1), dtype=np.float32)], axis=1)

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        u = self.user_embeddings(users, history)
        return np.asarray(u @ self.item_embeddings().T, dtype=np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: D102
        self.module.load_state_dict(state)

    def hparams(self) -> dict[str, Any]:  # noqa: D102
        return dict(self._hp)


class MatrixFactorization(_TorchRecommender):
    """User and item embeddings (optional item bias) trained with BPR or sampled softmax.

    Users outside ``[0, n_users)`` (unseen in training) are folded in from their history: the
    mean of their history's item embeddings.
    """

    family = "mf"
    module: _MFModule

    def __init__(
        self, n_users: int, n_items: int, use_bias: bool = False, seed: int = 0, **kw: Any
    ) -> None:
        super().__init__(n_users, n_items, seed=seed, **kw)
        self._hp["use_bias"] = bool(use_bias)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = _MFModule(
                n_users, n_items, self._hp["embed_dim"], use_bias, **self._loss_kw
            )

    def user_embeddings(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        users = np.asarray(users, dtype=np.int64)
        known = (users >= 0) & (users < self.n_users)
        with torch.no_grad():
            emb = self.module.user_emb.weight.detach().cpu().numpy()
        out = np.zeros((len(users), emb.shape[1]), dtype=np.float32)
        out[known] = emb[users[known]]
        if (~known).any():
            h = _rows(history, self.n_items)[np.flatnonzero(~known)]
            folded = self.fold_in(h)
            out[~known] = folded[:, : emb.shape[1]]
        return self._append_bias_dim(out)


class TwoTower(_TorchRecommender):
    """Two towers: items from id + mean genre embedding, users from history + user id.

    Item tower: ``Linear(item id embedding + mean genre embedding)``; new items are scored from
    their genres alone (``embed_new_items``). User tower: ``Linear(mean history embedding + user id
    embedding)``; users unseen in training get a zero id part, so any history can be scored.
    """

    family = "two_tower"
    module: _TwoTowerModule

    def __init__(
        self,
        n_users: int,
        n_items: int,
        genre_vocab: list[str] | None = None,
        item_genres: list[list[str]] | None = None,
        history_dropout: float = 0.2,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(n_users, n_items, seed=seed, **kw)
        if genre_vocab is None:
            genre_vocab = sorted({g for gs in item_genres or [] for g in gs})
        self.genre_vocab = list(genre_vocab)
        self._genre_index = {g: i for i, g in enumerate(self.genre_vocab)}
        self._hp.update(genre_vocab=self.genre_vocab, history_dropout=float(history_dropout))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = _TwoTowerModule(
                n_users,
                n_items,
                len(self.genre_vocab),
                self._hp["embed_dim"],
                history_dropout,
                **self._loss_kw,
            )
        if item_genres is not None:
            if len(item_genres) != n_items:
                raise ValueError(f"item_genres has {len(item_genres)} rows, expected {n_items}")
            offsets, indices = self._encode_genres(item_genres)
            self.module.genre_offsets = offsets
            self.module.genre_indices = indices

    def _encode_genres(self, item_genres: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = [[self._genre_index[g] for g in gs if g in self._genre_index] for gs in item_genres]
        lens = np.array([len(x) for x in idx], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        flat = np.array([g for x in idx for g in x], dtype=np.int64)
        return torch.from_numpy(offsets), torch.from_numpy(flat)

    def embed_new_items(self, item_genres: list[list[str]]) -> np.ndarray:
        """Vectors of items unseen in training, from their genres (unknown genres are ignored)."""
        offsets, indices = self._encode_genres(item_genres)
        with torch.no_grad():
            self.module.eval()
            genre = self.module.genre_emb(indices, offsets[:-1])
            v = self.module.item_tower(torch.zeros_like(genre), genre)
        return v.cpu().numpy().astype(np.float32)

    def user_embeddings(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        users = np.asarray(users, dtype=np.int64)
        h = _rows(history, self.n_items)
        indptr, indices = _csr_tensors(h)
        lens = indptr[1:] - indptr[:-1]
        known = torch.from_numpy((users >= 0) & (users < self.n_users))
        with torch.no_grad():
            self.module.eval()
            m = self.module
            summed = m.history_emb(indices, indptr[:-1])
            hist_mean = summed / lens.clamp(min=1).float()[:, None]
            safe = torch.from_numpy(np.where(known.numpy(), users, 0))
            id_part = m.user_id_emb(safe) * known.float()[:, None]
            u = m.user_tower(id_part, hist_mean)
        return u.cpu().numpy().astype(np.float32)

    def state_dict(self) -> dict[str, torch.Tensor]:  # noqa: D102
        return super().state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:  # noqa: D102
        # The genre lists are sized by the catalogue: swap the buffers before a strict load.
        self.module.genre_offsets = state["genre_offsets"].clone()
        self.module.genre_indices = state["genre_indices"].clone()
        weight = state["genre_emb.weight"]
        if weight.shape != self.module.genre_emb.weight.shape:
            self.module.genre_emb = torch.nn.EmbeddingBag(
                int(weight.shape[0]), int(weight.shape[1]), mode="mean"
            )
        super().load_state_dict(state)


MODELS: dict[str, type[Recommender]] = {
    m.family: m for m in (Popularity, EASE, EDLAE, MatrixFactorization, TwoTower)
}


def build_model(
    args: Any,
    n_users: int,
    n_items: int,
    item_genres: list[list[str]] | None = None,
    seed: int = 0,
) -> Recommender:
    """Build an unfitted model of family ``args.name`` (a ``ModelArgs``) for a catalogue.

    Args:
        args: the ``model`` config section.
        n_users: users in the dataset version.
        n_items: items in the dataset version.
        item_genres: per item, its genres (two-tower item features).
        seed: initialisation seed; the same seed gives the same weights.
    """
    name = args.name
    if name == "popularity":
        return Popularity(n_users, n_items)
    if name == "ease":
        return EASE(n_users, n_items, args.ease_lambda, args.ease_max_items)
    if name == "edlae":
        return EDLAE(
            n_users,
            n_items,
            edlae_lambda=getattr(args, "edlae_lambda", 200.0),
            dropout=getattr(args, "edlae_dropout", 0.25),
            zero_diagonal=getattr(args, "edlae_zero_diagonal", True),
            recency_tau=getattr(args, "recency_tau", 0.0),
            max_items=getattr(args, "ease_max_items", 40_000),
        )
    kw: dict[str, Any] = {
        "embed_dim": args.embed_dim,
        "loss": args.loss,
        "num_negatives": args.num_negatives,
        "temperature": args.temperature,
        "l2": args.l2,
        "seed": seed,
    }
    for extra in ("logq", "use_bias", "history_dropout"):
        if hasattr(args, extra):
            kw[extra] = getattr(args, extra)
    if name == "mf":
        kw.pop("history_dropout", None)
        return MatrixFactorization(n_users, n_items, **kw)
    if name == "two_tower":
        kw.pop("use_bias", None)
        return TwoTower(n_users, n_items, item_genres=item_genres, **kw)
    raise ValueError(f"unknown model.name {name!r}; expected one of {sorted(MODELS)}")


def load_model(
    family: str, n_users: int, n_items: int, hparams: dict[str, Any], state: dict[str, torch.Tensor]
) -> Recommender:
    """Rebuild a fitted model from its family, sizes, ``hparams()`` and ``state_dict()``."""
    if family not in MODELS:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(MODELS)}")
    model = MODELS[family](n_users, n_items, **hparams)  # type: ignore[call-arg]
    model.load_state_dict(state)
    return model
