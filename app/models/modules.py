"""The torch modules behind the embedding recommenders; ``forward`` is the training loss.

Returning the loss from ``forward`` lets DistributedDataParallel wrap a module as it is and
sync its gradients; ``app.models.neural`` wraps each module in a ``Recommender``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def _ragged_positions(
    indptr: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in a CSR's flat arrays of the entries of ``rows`` (in order), and row lengths."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    flat = torch.repeat_interleave(starts - torch.cumsum(lens, 0) + lens, lens) + torch.arange(
        int(lens.sum()), device=indptr.device
    )
    return flat, lens


class RetrievalModule(torch.nn.Module):
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
        """User vectors of a batch; ``pos_items`` are the batch's targets while training."""
        raise NotImplementedError

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of ``items``, or of the whole catalogue for None."""
        raise NotImplementedError

    def item_bias(self, items: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-item score offsets of ``items`` (whole catalogue for None), or None."""
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


class MFModule(RetrievalModule):
    """Matrix factorisation: a user and an item embedding table, optional item bias."""

    def __init__(
        self, n_users: int, n_items: int, embed_dim: int, use_bias: bool, **loss_kw: Any
    ) -> None:
        super().__init__(n_items, **loss_kw)
        self.user_emb = torch.nn.Embedding(n_users, embed_dim)
        self.item_emb = torch.nn.Embedding(n_items, embed_dim)
        torch.nn.init.normal_(self.user_emb.weight, std=0.1)
        torch.nn.init.normal_(self.item_emb.weight, std=0.1)
        self.bias = torch.nn.Parameter(torch.zeros(n_items)) if use_bias else None

    def user_vectors(self, users: torch.Tensor, pos_items: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        return self.user_emb(users)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        return self.item_emb.weight if items is None else self.item_emb(items)

    def item_bias(self, items: torch.Tensor | None = None) -> torch.Tensor | None:  # noqa: D102
        if self.bias is None:
            return None
        return self.bias if items is None else self.bias[items]


class TwoTowerModule(RetrievalModule):
    """Item tower over id + mean genre embedding, user tower over history + user id."""

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
        """Item vectors from their id and mean-genre embeddings."""
        return self.item_proj(id_part + genre_part)

    def _genre_mean(self, items: torch.Tensor | None) -> torch.Tensor:
        if items is None:
            items = torch.arange(self.n_items, device=self.genre_offsets.device)
        flat, lens = _ragged_positions(self.genre_offsets, items)
        return self.genre_emb(self.genre_indices[flat], torch.cumsum(lens, 0) - lens)

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        ids = self.item_id_emb.weight if items is None else self.item_id_emb(items)
        return self.item_tower(ids, self._genre_mean(items))

    def user_tower(self, id_part: torch.Tensor, hist_mean: torch.Tensor) -> torch.Tensor:
        """User vectors from their id and mean-history embeddings."""
        return self.user_proj(id_part + hist_mean)

    def user_vectors(self, users: torch.Tensor, pos_items: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        # Training: the user's train history minus the target item (else the tower learns to
        # find the target in its own input), with random history dropout as denoising.
        assert self.train_indptr is not None and self.train_indices is not None
        flat, lens = _ragged_positions(self.train_indptr.to(users.device), users)
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
