"""The torch modules behind the embedding recommenders; ``forward`` is the training loss.

Returning the loss from ``forward`` lets DistributedDataParallel wrap a module as it is and
sync its gradients; ``app.models.neural`` wraps each module in a ``Recommender``.

Embedding tables that a step reads row by row (user ids, and items under a sampled loss) have
sparse gradients: a step's backward, its gradient sync (``GradientSync`` gathers the rows) and
``RowAdam`` cost the rows the batch touches, not the table. Tables that a loss reads whole
(items under the exact softmax) stay dense.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def ragged_ranges(starts: torch.Tensor, lens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``starts[r] .. starts[r] + lens[r] - 1`` for every row, flattened, and each entry's row."""
    row = torch.repeat_interleave(torch.arange(len(lens), device=lens.device), lens)
    first = torch.cumsum(lens, 0) - lens
    flat = starts[row] + torch.arange(int(lens.sum()), device=lens.device) - first[row]
    return flat, row


def _ragged_positions(
    indptr: torch.Tensor, rows: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions in a CSR's flat arrays of the entries of ``rows`` (in order), and row lengths."""
    starts = indptr[rows]
    lens = indptr[rows + 1] - starts
    return ragged_ranges(starts, lens)[0], lens


class RowAdam(torch.optim.Optimizer):
    """Adam that updates only the rows a sparse gradient touches ("lazy" Adam), dense Adam else.

    Dense gradients get ``torch.optim.Adam``'s update (no weight decay). A sparse gradient
    (``nn.Embedding(sparse=True)``) updates the moments and weights of its rows only, as
    ``torch.optim.SparseAdam`` does, so a step costs the batch, not the table; the bias
    correction uses the parameter's step count. Regularisation belongs in the loss.
    """

    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: D102
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps = group["lr"], group["betas"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                step_size = lr / (1 - b1**t)
                root_bc2 = math.sqrt(1 - b2**t)
                m_all, v_all = state["exp_avg"], state["exp_avg_sq"]
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                    m = m_all.index_select(0, rows).mul_(b1).add_(values, alpha=1 - b1)
                    v = v_all.index_select(0, rows).mul_(b2).addcmul_(values, values, value=1 - b2)
                    m_all.index_copy_(0, rows, m)
                    v_all.index_copy_(0, rows, v)
                    update = m.div_(v.sqrt_().div_(root_bc2).add_(eps))
                    p.index_add_(0, rows, update, alpha=-step_size)
                else:
                    m_all.mul_(b1).add_(grad, alpha=1 - b1)
                    v_all.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                    denom = v_all.sqrt().div_(root_bc2).add_(eps)
                    p.addcdiv_(m_all, denom, value=-step_size)
        return loss


class RetrievalModule(torch.nn.Module):
    """Shared loss of the embedding models; ``forward`` is the loss (DDP can wrap it as it is)."""

    users_alone: bool = False
    """Whether a user's vector depends on the user alone (not on the batch's target items)."""

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

    @property
    def exact_softmax(self) -> bool:
        """Whether the softmax runs over the whole catalogue (no sampled negatives)."""
        return self.loss_name == "softmax" and self.num_negatives >= self.n_items

    def user_vectors(self, users: torch.Tensor, pos_items: torch.Tensor | None) -> torch.Tensor:
        """User vectors of a batch; ``pos_items`` are the batch's targets while training."""
        raise NotImplementedError

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:
        """Vectors of ``items``, or of the whole catalogue for None."""
        raise NotImplementedError

    def item_bias(self, items: torch.Tensor | None = None) -> torch.Tensor | None:
        """Per-item score offsets of ``items`` (whole catalogue for None), or None."""
        return None

    def _logits(
        self,
        u: torch.Tensor,
        items: torch.Tensor | None,
        offset: torch.Tensor | None = None,
        v: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``(u · v + bias) / temperature + offset`` for ``items`` (all for None).

        ``v`` is ``item_vectors(items)`` when the caller has it. The temperature scales ``u``
        and the bias, and the offsets join the matrix product (``addmm``), so no extra pass
        runs over the ``(users, candidates)`` logits.
        """
        v = self.item_vectors(items) if v is None else v
        b = self.item_bias(items)
        if b is not None:
            b = b / self.temperature
            offset = b if offset is None else b + offset
        if offset is None:
            return (u / self.temperature) @ v.T
        return torch.addmm(offset, u / self.temperature, v.T)

    def _exact_softmax_by_user(self, users: torch.Tensor, pos_items: torch.Tensor) -> torch.Tensor:
        # The exact softmax of every pair, with each distinct user's logits over the catalogue
        # computed once: the same loss and gradient as one row of logits per pair, at the cost
        # of the batch's distinct users (a user's pairs share the normaliser).
        distinct, row = torch.unique(users, return_inverse=True)
        u = self.user_vectors(distinct, None)
        logits = self._logits(u, None)
        loss = (torch.logsumexp(logits, 1)[row] - logits[row, pos_items]).mean()
        reg = u[row].pow(2).sum(1).mean() + self.item_vectors(pos_items).pow(2).sum(1).mean()
        return loss + self.l2 * reg

    def forward(self, users: torch.Tensor, pos_items: torch.Tensor) -> torch.Tensor:
        """Training loss of a batch of (user, positive item) pairs."""
        if self.users_alone and self.exact_softmax:
            return self._exact_softmax_by_user(users, pos_items)
        u = self.user_vectors(users, pos_items)
        dev = users.device
        if self.loss_name != "bpr" and not self.exact_softmax:
            return self._sampled_softmax(users, pos_items, u)
        pos_v = self.item_vectors(pos_items)
        reg = u.pow(2).sum(1).mean() + pos_v.pow(2).sum(1).mean()
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
        else:
            # Exact softmax over the whole catalogue (cheap for small catalogues).
            loss = torch.nn.functional.cross_entropy(self._logits(u, None), pos_items)
        return loss + self.l2 * reg

    def _sampled_softmax(
        self, users: torch.Tensor, pos_items: torch.Tensor, u: torch.Tensor
    ) -> torch.Tensor:
        # In-batch positives + uniform negatives; logQ corrects the popularity bias of in-batch
        # sampling (uniform samples all share log(1/n) and need no correction). The positives'
        # vectors are the candidates' first rows: one lookup, one sparse gradient row each.
        dev = users.device
        neg = torch.randint(self.n_items, (self.num_negatives,), device=dev)
        cand = torch.cat([pos_items, neg])
        v = self.item_vectors(cand)
        corr = None
        if self.logq and self.log_q is not None:
            corr = -torch.cat(
                [
                    self.log_q.to(dev)[pos_items],
                    torch.full_like(neg, 0, dtype=u.dtype) - float(np.log(self.n_items)),
                ]
            )
        logits = self._logits(u, cand, corr, v)
        # The same item elsewhere in the candidates is not a negative.
        dup = cand[None, :] == pos_items[:, None]
        dup[torch.arange(len(users), device=dev), torch.arange(len(users), device=dev)] = False
        logits = logits.masked_fill(dup, float("-inf"))
        target = torch.arange(len(users), device=dev)
        loss = torch.nn.functional.cross_entropy(logits, target)
        reg = u.pow(2).sum(1).mean() + v[: len(users)].pow(2).sum(1).mean()
        return loss + self.l2 * reg


class MFModule(RetrievalModule):
    """Matrix factorisation: a user and an item embedding table, optional item bias.

    The user table has sparse gradients; so has the item table unless the exact softmax reads
    it whole every step. With ``normalize`` the vectors are the rows scaled to unit length, so
    a score is a cosine (plus the bias) and the temperature sets how sharp the softmax is.
    """

    users_alone = True

    def __init__(
        self,
        n_users: int,
        n_items: int,
        embed_dim: int,
        use_bias: bool,
        normalize: bool = False,
        **loss_kw: Any,
    ) -> None:
        super().__init__(n_items, **loss_kw)
        self.normalize = normalize
        self.user_emb = torch.nn.Embedding(n_users, embed_dim, sparse=True)
        self.item_emb = torch.nn.Embedding(n_items, embed_dim, sparse=not self.exact_softmax)
        torch.nn.init.normal_(self.user_emb.weight, std=0.1)
        torch.nn.init.normal_(self.item_emb.weight, std=0.1)
        self.bias = torch.nn.Parameter(torch.zeros(n_items)) if use_bias else None

    def unit(self, x: torch.Tensor) -> torch.Tensor:
        """``x``'s rows at unit length with ``normalize``, else ``x``."""
        return torch.nn.functional.normalize(x, dim=-1) if self.normalize else x

    def user_vectors(self, users: torch.Tensor, pos_items: torch.Tensor | None) -> torch.Tensor:  # noqa: D102
        return self.unit(self.user_emb(users))

    def item_vectors(self, items: torch.Tensor | None = None) -> torch.Tensor:  # noqa: D102
        return self.unit(self.item_emb.weight if items is None else self.item_emb(items))

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
        # Sparse gradients for the tables read row by row (see the module docstring).
        self.item_id_emb = torch.nn.Embedding(n_items, d, sparse=not self.exact_softmax)
        self.genre_emb = torch.nn.EmbeddingBag(max(n_genres, 1), d, mode="mean")
        self.history_emb = torch.nn.EmbeddingBag(n_items, d, mode="sum", sparse=True)
        self.user_id_emb = torch.nn.Embedding(n_users, d, sparse=True)
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
