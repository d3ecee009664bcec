"""The sequence autoencoder: a user's recency-weighted history in, the items that come next out.

The evaluation protocol asks for each user's next items after the end of their history, not for
the items of the history itself, so the model is trained on exactly that: each training sample
cuts one user's sequence at a random point, encodes the items before the cut (weighted by
recency, with input dropout as denoising) and is scored by a full softmax over the catalogue on
the items of the window after the cut. Ray Train feeds it the same ``(user, item)`` rows as MF;
each row stands for its user, kept with probability ``cuts_per_user / len(sequence)`` so every
user gives about ``cuts_per_user`` samples an epoch however long their sequence.

A user vector is the encoder's output on the (recency-weighted) history, so any history can be
scored, new users and live events included, and the item vectors are the decoder's rows (its
bias as one more dimension): exact and approximate inner-product retrieval serve it as they
serve MF.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from app.models.base import item_columns, sequence_ranks
from app.models.modules import ragged_ranges
from app.models.neural import TorchRecommender


def rank_weights(ranks: torch.Tensor, tau: float) -> torch.Tensor:
    """Recency weight of history items ``ranks`` positions before the latest (0 = latest)."""
    if tau <= 0:
        return torch.ones_like(ranks, dtype=torch.float32)
    return torch.exp(-ranks.float() / tau)


class SequenceAEModule(torch.nn.Module):
    """Encoder (weighted sum of item embeddings) and decoder (a logit per catalogue item).

    ``forward(users, items)`` is the training loss; ``items`` only mark the rows (see the module
    docstring). ``prepare`` must give it the users' time-ordered sequences first.
    """

    def __init__(
        self,
        n_items: int,
        embed_dim: int,
        recency_tau: float,
        input_dropout: float,
        window: float,
        cuts_per_user: float,
        min_cut: float,
    ) -> None:
        super().__init__()
        self.n_items = n_items
        self.recency_tau = recency_tau
        self.input_dropout = input_dropout
        self.window = window
        self.cuts_per_user = cuts_per_user
        self.min_cut = min_cut
        # Read row by row: sparse gradients (GradientSync gathers the touched rows).
        self.encoder = torch.nn.EmbeddingBag(n_items, embed_dim, mode="sum", sparse=True)
        self.decoder = torch.nn.Linear(embed_dim, n_items)
        torch.nn.init.normal_(self.encoder.weight, std=0.05)
        torch.nn.init.normal_(self.decoder.weight, std=0.05)
        torch.nn.init.zeros_(self.decoder.bias)
        # Time-ordered training sequences (CSR); set by ``prepare``, not saved.
        self.seq_indptr = torch.zeros(1, dtype=torch.int64)
        self.seq_items = torch.zeros(0, dtype=torch.int64)

    def encode(self, items: torch.Tensor, row: torch.Tensor, weights: torch.Tensor, n_rows: int):
        """User vectors from history ``items`` of rows ``row`` (sorted) with recency weights.

        The weights are normalised to sum 1 per row, so short and long histories give vectors
        of one scale; a row without items gets the zero vector (scores = the decoder's bias).
        """
        total = torch.zeros(n_rows, dtype=weights.dtype, device=weights.device)
        total.index_add_(0, row, weights)
        w = weights / total[row].clamp(min=1e-12)
        lens = torch.bincount(row, minlength=n_rows)
        offsets = torch.cumsum(lens, 0) - lens
        return self.encoder(items, offsets, per_sample_weights=w)

    def forward(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Mean over sampled cuts of the window's softmax cross-entropy (per item, averaged)."""
        dev = users.device
        indptr, seq = self.seq_indptr.to(dev), self.seq_items.to(dev)
        n = indptr[users + 1] - indptr[users]
        keep = (torch.rand(len(users), device=dev) < self.cuts_per_user / n.clamp(min=1)) & (n >= 2)
        if not bool(keep.any()):  # every rank must step: keep the row with the longest sequence
            keep = torch.zeros_like(keep)
            keep[torch.argmax(n)] = True
        users, n = users[keep], n[keep]
        starts = indptr[users]
        lo = torch.clamp((self.min_cut * n).long(), min=1)
        cut = torch.minimum(lo + (torch.rand(len(users), device=dev) * (n - lo)).long(), n - 1)
        cut = torch.clamp(cut, min=1)

        hist, hrow = ragged_ranges(starts, cut)
        ranks = (starts + cut - 1)[hrow] - hist
        kept = torch.rand(len(hist), device=dev) >= self.input_dropout
        n_kept = torch.zeros(len(users), dtype=torch.int64, device=dev).index_add_(
            0, hrow, kept.long()
        )
        kept |= (ranks == 0) & (n_kept[hrow] == 0)  # never an empty input: keep the latest
        w = rank_weights(ranks, self.recency_tau)
        h = self.encode(seq[hist[kept]], hrow[kept], w[kept], len(users))
        logits = self.decoder(h)
        # History items are never recommended (seen items are excluded): no mass on them.
        logits = logits.index_put((hrow, seq[hist]), torch.tensor(-1e9, device=dev))
        logp = torch.log_softmax(logits, 1)

        width = torch.minimum(torch.ceil(self.window * cut.double()).long().clamp(min=1), n - cut)
        tgt, trow = ragged_ranges(starts + cut, width)
        per_item = logp[trow, seq[tgt]] / width[trow].to(logp.dtype)
        return -per_item.sum() / len(users)


class SequenceAutoencoder(TorchRecommender):
    """Predicts a user's next window of items from their recency-weighted history.

    Histories passed to ``score`` / ``user_embeddings`` carry each item's rank from the latest
    plus one as its value (``history``, ``sequence_ranks``); a binary history weighs every item
    alike. Trained with ``TorchRecommender.fit`` or the Ray Train worker loop, whose training
    matrix is ``history`` of the fit splits (the order is what it learns from).
    """

    family = "seq_ae"
    module: SequenceAEModule  # type: ignore[assignment]

    def __init__(
        self,
        n_users: int,
        n_items: int,
        embed_dim: int = 512,
        recency_tau: float = 5.0,
        input_dropout: float = 0.5,
        window: float = 0.25,
        cuts_per_user: float = 4.0,
        min_cut: float = 0.3,
        seed: int = 0,
    ) -> None:
        super().__init__(n_users, n_items, embed_dim=embed_dim, seed=seed)
        if not 0.0 <= input_dropout < 1.0:
            raise ValueError(f"input_dropout must be in [0, 1), got {input_dropout}")
        self._hp = {
            "embed_dim": int(embed_dim),
            "recency_tau": float(recency_tau),
            "input_dropout": float(input_dropout),
            "window": float(window),
            "cuts_per_user": float(cuts_per_user),
            "min_cut": float(min_cut),
            "seed": int(seed),
        }
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.module = SequenceAEModule(
                n_items,
                int(embed_dim),
                float(recency_tau),
                float(input_dropout),
                float(window),
                float(cuts_per_user),
                float(min_cut),
            )

    def history(self, dataset: Any, *splits: str) -> sp.csr_matrix:
        """The splits' interactions with rank-from-latest + 1 as values (``sequence_ranks``)."""
        return sequence_ranks(dataset.read_table(*splits), self.n_users, self.n_items)

    def weigh_history(self, ranks: sp.csr_matrix) -> sp.csr_matrix:
        """The ranks themselves: ``user_embeddings`` turns them into recency weights."""
        return item_columns(ranks, self.n_items)

    def prepare(self, train: sp.csr_matrix, sparse: bool = True) -> None:
        """Time-ordered sequences from ``train``'s rank values (a binary matrix: item order)."""
        if not sparse:
            self.module.encoder.sparse = False
        x = item_columns(train, self.n_items)
        order = np.lexsort((-x.data, np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))))
        self.module.seq_indptr = torch.from_numpy(x.indptr.astype(np.int64))
        self.module.seq_items = torch.from_numpy(x.indices[order].astype(np.int64))

    def user_embeddings(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:  # noqa: D102
        h = item_columns(history, self.n_items)
        h.eliminate_zeros()
        lens = torch.from_numpy(np.diff(h.indptr).astype(np.int64))
        row = torch.repeat_interleave(torch.arange(h.shape[0]), lens)
        ranks = torch.from_numpy(h.data.astype(np.float32)) - 1.0
        w = rank_weights(ranks.clamp(min=0), self.module.recency_tau)
        items = torch.from_numpy(h.indices.astype(np.int64))
        with torch.no_grad():
            self.module.eval()
            u = self.module.encode(items, row, w, h.shape[0])
        ones = torch.ones(len(u), 1)
        return torch.cat([u, ones], 1).numpy().astype(np.float32)

    def item_embeddings(self) -> np.ndarray:  # noqa: D102
        with torch.no_grad():
            d = self.module.decoder
            return torch.cat([d.weight, d.bias[:, None]], 1).float().cpu().numpy()
