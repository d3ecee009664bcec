"""Embedding recommenders trained with torch: matrix factorisation and two towers.

``run_epoch`` is the one step loop: ``TorchRecommender.fit`` drives it over in-memory batches,
the Ray Train worker loop over a Ray Data shard with the DDP-wrapped module; both step the
optimiser of ``TorchRecommender.optimizer`` (``RowAdam``: sparse embedding gradients update
only the rows a batch touches).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from app.models.base import Recommender, binary_history
from app.models.modules import MFModule, RetrievalModule, RowAdam, TwoTowerModule

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
HEAP_KEPT = 1 << 30
_heap_kept: bool | None = None


def keep_freed_heap() -> bool:
    """Keep up to ``HEAP_KEPT`` bytes of freed memory in this process's heap (glibc only).

    A step's logits and their gradients are tens of MB: by default glibc unmaps each such
    block when it is freed, so every step page-faults its activations in again. ``run_epoch``
    calls this, so every loop that steps a model (a Ray Train worker, ``TorchRecommender.fit``,
    a benchmark's plain loop) runs on the same heap. Returns whether glibc took the setting.
    """
    global _heap_kept
    if _heap_kept is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _heap_kept = bool(
                libc.mallopt(_M_MMAP_THRESHOLD, HEAP_KEPT)
                and libc.mallopt(_M_TRIM_THRESHOLD, HEAP_KEPT)
            )
        except (OSError, AttributeError):  # not glibc: its allocator keeps its own policy
            _heap_kept = False
    return _heap_kept


def run_epoch(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    sync: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """One pass of optimiser steps: loss, zero the gradients, backward, step, per batch.

    The caller sets train mode and seeds; the loss is summed on its device and read once at
    the end, so steps on an accelerator do not wait for each other.

    Args:
        loss_fn: ``(users, items) -> loss``: a module whose ``forward`` is the loss, possibly
            wrapped by DistributedDataParallel.
        optimizer: Optimiser over ``loss_fn``'s parameters.
        batches: ``(users, items)`` int64 tensors, one pair per row.
        sync: Called between backward and the step to average gradients across workers
            (``GradientSync``); None in one process or under DDP.

    Returns:
        ``(sum of loss × rows, rows)`` over the batches.
    """
    keep_freed_heap()
    total: torch.Tensor | None = None
    rows = 0
    for users, items in batches:
        loss = loss_fn(users, items)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            sync()
        optimizer.step()
        part = loss.detach().double() * len(users)
        total = part if total is None else total + part
        rows += len(users)
    return (0.0 if total is None else float(total)), rows


def _csr_tensors(m: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.asarray(m.indptr, dtype=np.int64)),
        torch.from_numpy(np.asarray(m.indices, dtype=np.int64)),
    )


class TorchRecommender(Recommender):
    """A recommender backed by a ``torch.nn.Module`` whose ``forward`` returns the loss.

    ``module`` is what a training loop optimises (``prepare`` first); ``fit`` is the plain
    single-process loop. Callers tell these models apart with ``isinstance``.
    """

    module: RetrievalModule

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
        loss_args = ("loss", "num_negatives", "temperature", "l2", "logq")
        self._loss_kw = {name: self._hp[name] for name in loss_args}

    def prepare(self, train: sp.csr_matrix, sparse: bool = True) -> None:
        """Give the module what training needs from the train split (history, item frequency).

        Call it before any training step; ``fit`` does, and so must a loop that drives the
        module itself (the Ray Train worker loop). Nothing it sets is saved in ``state_dict``.
        ``sparse=False`` gives every embedding table dense gradients (for NCCL, whose
        all-reduce takes dense tensors only); by default the tables a step reads row by row
        have sparse ones.
        """
        if not sparse:
            for m in self.module.modules():
                if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag):
                    m.sparse = False
        x = binary_history(train, self.n_items)
        self.module.train_indptr, self.module.train_indices = _csr_tensors(x)
        counts = np.asarray(x.sum(axis=0), dtype=np.float64).ravel() + 1.0
        self.module.log_q = torch.from_numpy(np.log(counts / counts.sum()).astype(np.float32))

    def loss(self, users: torch.Tensor, pos_items: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch (a distributed loop calls the DDP-wrapped module instead)."""
        return self.module(users, pos_items)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        """The optimiser every training loop steps: ``RowAdam`` over the module's parameters.

        Sparse gradients (the embedding tables a step reads row by row) update only their
        rows; the plain loop, the Ray Train workers and the benchmarks all take this one.
        """
        return RowAdam(self.module.parameters(), lr=lr)

    def fit(  # type: ignore[override]  # named options instead of the base's **options
        self,
        train: sp.csr_matrix,
        *,
        epochs: int = 50,
        batch_size: int = 1024,
        lr: float = 0.005,
        seed: int = 0,
        on_epoch: Callable[[int, float], None] | None = None,
    ) -> TorchRecommender:
        """Train in this process: ``optimizer(lr)`` over the shuffled (user, item) pairs.

        Training continues from the current weights (a new model starts from its seeded
        initialisation). Each epoch reshuffles the pairs with a numpy generator seeded by
        ``seed``, and torch's CPU generator (negatives, history dropout) is seeded by ``seed``
        too, so the same call gives the same weights; the caller's torch RNG state is kept.
        The defaults are those of ``TrainArgs``.

        Args:
            train: ``(n_users, n_items)`` interactions; every non-zero entry is one pair.
            epochs: Passes over the pairs.
            batch_size: Pairs per optimiser step.
            lr: Adam learning rate.
            seed: Shuffling and sampling seed.
            on_epoch: Called after each epoch with its number (from 1) and mean loss, the
                module in eval mode (e.g. to evaluate or log).
        """
        self.prepare(train)
        pairs = binary_history(train, self.n_items).tocoo()
        users = torch.from_numpy(pairs.row.astype(np.int64))
        items = torch.from_numpy(pairs.col.astype(np.int64))
        optimizer = self.optimizer(lr)
        rng = np.random.default_rng(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for epoch in range(1, epochs + 1):
                order = torch.from_numpy(rng.permutation(len(users)))
                batches = ((users[b], items[b]) for b in order.split(batch_size))
                self.module.train()
                loss_sum, rows = run_epoch(self.module, optimizer, batches)
                self.module.eval()
                if on_epoch is not None:
                    on_epoch(epoch, loss_sum / max(rows, 1))
        return self

    def fold_in(self, history: sp.csr_matrix) -> np.ndarray:
        """User vectors from history alone: the mean of the history's item vectors."""
        h = binary_history(history, self.n_items)
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


class MatrixFactorization(TorchRecommender):
    """User and item embeddings (optional item bias) trained with BPR or (sampled) softmax.

    Users outside ``[0, n_users)`` (unseen in training) are folded in from their history: the
    mean of their history's item embeddings. ``normalize`` scores by cosine (``MFModule``).
    """

    family = "mf"
    module: MFModule

    def __init__(
        self,
        n_users: int,
        n_items: int,
        use_bias: bool = False,
        normalize: bool = False,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(n_users, n_items, seed=seed, **kw)
        self._hp.update(use_bias=bool(use_bias), normalize=bool(normalize))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = MFModule(
                n_users, n_items, self._hp["embed_dim"], use_bias, normalize, **self._loss_kw
            )

    def user_embeddings(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        users = np.asarray(users, dtype=np.int64)
        known = (users >= 0) & (users < self.n_users)
        with torch.no_grad():
            emb = self.module.user_emb.weight.detach().cpu()
            out = np.zeros((len(users), emb.shape[1]), dtype=np.float32)
            out[known] = self.module.unit(emb[torch.from_numpy(users[known])]).numpy()
            if (~known).any():
                h = binary_history(history, self.n_items)[np.flatnonzero(~known)]
                folded = torch.from_numpy(self.fold_in(h)[:, : emb.shape[1]])
                out[~known] = self.module.unit(folded).numpy()
        return self._append_bias_dim(out)


class TwoTower(TorchRecommender):
    """Two towers: items from id + mean genre embedding, users from history + user id.

    Item tower: ``Linear(item id embedding + mean genre embedding)``; new items are scored from
    their genres alone (``embed_new_items``). User tower: ``Linear(mean history embedding + user id
    embedding)``; users unseen in training get a zero id part, so any history can be scored.
    """

    family = "two_tower"
    module: TwoTowerModule

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
            self.module = TwoTowerModule(
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
        h = binary_history(history, self.n_items)
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
