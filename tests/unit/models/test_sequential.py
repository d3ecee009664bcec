"""The sequence autoencoder: rank histories, its window loss, scoring, sparse rows, learning."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.evaluate import evaluate
from app.models import (
    Popularity,
    SequenceAutoencoder,
    build_model,
    recency_weighted,
    sequence_ranks,
)


def _ranks(sequences: list[list[int]], n_items: int) -> sp.csr_matrix:
    users = [u for u, s in enumerate(sequences) for _ in s]
    items = [i for s in sequences for i in s]
    stamps = [t for s in sequences for t in range(len(s))]
    return sequence_ranks(
        {"user_idx": users, "item_idx": items, "timestamp": stamps}, len(sequences), n_items
    )


def test_sequence_ranks_count_from_the_latest_first_event_and_break_ties_by_item():
    table = {
        "user_idx": [0, 0, 0, 0, 1, 1],
        "item_idx": [5, 2, 5, 3, 1, 0],
        "timestamp": [10, 20, 30, 40, 7, 7],  # item 5 repeats: its first event counts
    }
    m = sequence_ranks(table, 2, 6).toarray()
    np.testing.assert_array_equal(m[0], [0, 0, 2, 1, 0, 3])
    np.testing.assert_array_equal(m[1], [2, 1, 0, 0, 0, 0])  # same time: item 0 comes first


def test_build_model_passes_the_seq_settings():
    args = ModelArgs(
        name="seq_ae", embed_dim=8, recency_tau=2.0, history_dropout=0.1, seq_window=0.5
    )
    model = build_model(args, 3, 6, seed=1)
    assert isinstance(model, SequenceAutoencoder)
    hp = model.hparams()
    assert hp["embed_dim"] == 8 and hp["recency_tau"] == 2.0 and hp["input_dropout"] == 0.1
    assert hp["window"] == 0.5 and hp["cuts_per_user"] == 4.0 and hp["min_cut"] == 0.3


def test_loss_is_the_softmax_of_the_window_after_the_cut_with_history_masked():
    # One user, sequence 3 1 4 0 2; min_cut 0.8 puts the only cut at 4: input 3 1 4 0, and
    # the window of ceil(0.5 * 4) = 2 items is cut short by the sequence's end: item 2.
    model = SequenceAutoencoder(
        1, 8, embed_dim=4, recency_tau=2.0, input_dropout=0.0, window=0.5, min_cut=0.8, seed=0
    )
    model.module.cuts_per_user = 100.0  # keep every row
    model.prepare(_ranks([[3, 1, 4, 0, 2]], 8))
    loss = model.loss(torch.tensor([0]), torch.tensor([3]))

    m = model.module
    w = torch.exp(-torch.tensor([3.0, 2.0, 1.0, 0.0]) / 2.0)
    h = (w[:, None] * m.encoder.weight[[3, 1, 4, 0]]).sum(0) / w.sum()
    logits = m.decoder(h)
    logits[[3, 1, 4, 0]] = -1e9
    expected = -torch.log_softmax(logits, 0)[2]
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    loss.backward()
    grad = m.encoder.weight.grad
    assert grad is not None and grad.is_sparse  # only the history's rows
    assert sorted(set(grad.coalesce().indices()[0].tolist())) == [0, 1, 3, 4]


def test_short_sequences_and_no_kept_row_still_give_a_loss():
    model = SequenceAutoencoder(3, 5, embed_dim=4, seed=0)
    model.module.cuts_per_user = 1e-9  # no row kept by chance: the longest one steps
    model.prepare(_ranks([[0], [1, 2], [3, 4, 0, 1]], 5))
    loss = model.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 3]))
    assert torch.isfinite(loss) and loss.item() > 0


def test_user_vectors_weigh_history_by_rank_and_scores_are_their_dot_products():
    model = SequenceAutoencoder(2, 6, embed_dim=4, recency_tau=1.0, seed=0)
    ranked = sp.csr_matrix(np.array([[0, 1, 0, 2, 0, 0]], dtype=np.float32))  # 1 is latest
    binary = sp.csr_matrix(np.array([[0, 1, 0, 1, 0, 0]], dtype=np.float32))
    enc = model.module.encoder.weight.detach()
    u = model.user_embeddings(np.array([0]), ranked)
    w = np.exp(-np.array([0.0, 1.0]))
    want = (w[0] * enc[1] + w[1] * enc[3]) / w.sum()
    np.testing.assert_allclose(u[0, :4], want.numpy(), rtol=1e-5)
    assert u[0, 4] == 1.0  # the bias dimension
    np.testing.assert_allclose(
        model.user_embeddings(np.array([0]), binary)[0, :4],
        ((enc[1] + enc[3]) / 2).numpy(),
        rtol=1e-5,
    )
    scores = model.score(np.array([0, -1]), sp.vstack([ranked, sp.csr_matrix((1, 6))]))
    items = model.item_embeddings()
    np.testing.assert_allclose(scores[0], u[0] @ items.T, rtol=1e-5)
    # An empty history (a new user) scores by the decoder's bias alone.
    np.testing.assert_allclose(scores[1], items[:, -1], rtol=1e-6)
    wide = sp.csr_matrix(np.array([[0, 1, 0, 2, 0, 0, 1]], dtype=np.float32))
    np.testing.assert_allclose(model.score(np.array([0]), wide), scores[:1], rtol=1e-6)


def test_state_round_trips_through_the_factory():
    model = SequenceAutoencoder(2, 6, embed_dim=4, seed=3)
    hp = model.hparams()
    again = build_model(
        ModelArgs(name="seq_ae", embed_dim=4, history_dropout=hp["input_dropout"]), 2, 6, seed=9
    )
    again.load_state_dict(model.state_dict())
    h = sp.csr_matrix(np.array([[1, 0, 2, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=np.float32))
    np.testing.assert_array_equal(again.score(np.arange(2), h), model.score(np.arange(2), h))


def test_learns_what_comes_next_where_popularity_cannot():
    # Every user walks the items in order (0 1 2 ... from a random start, wrapping): the next
    # items follow from the latest ones, while every item is as popular as any other.
    rng = np.random.default_rng(0)
    n_items, n_users = 24, 120
    seqs = [
        [(start + k) % n_items for k in range(int(rng.integers(8, 14)))]
        for start in rng.integers(0, n_items, n_users)
    ]
    history = _ranks([s[:-3] for s in seqs], n_items)
    target = sp.csr_matrix(
        (
            np.ones(3 * n_users),
            ([u for u in range(n_users) for _ in range(3)], [i for s in seqs for i in s[-3:]]),
        ),
        shape=(n_users, n_items),
    )
    model = SequenceAutoencoder(n_users, n_items, embed_dim=32, recency_tau=2.0, seed=0)
    losses: list[float] = []
    model.fit(history, epochs=30, batch_size=64, lr=0.01, on_epoch=lambda _, x: losses.append(x))
    assert losses[-1] < 0.7 * losses[0]
    ndcg = evaluate(lambda u: model.score(u, history[u]), history, target)["ndcg@10"]
    pop = Popularity(n_users, n_items).fit(history)
    base = evaluate(lambda u: pop.score(u, history[u]), history, target)["ndcg@10"]
    assert ndcg > 0.8 and ndcg > base + 0.4


def test_time_ordered_rows_become_each_models_history():
    rows = [np.array([4, 0, 2]), np.array([], dtype=np.int64), np.array([1])]
    seq = SequenceAutoencoder(3, 5, embed_dim=4)
    ranks = seq.sequence_history(rows).toarray()
    np.testing.assert_array_equal(ranks[0], [2, 0, 1, 0, 3])  # 2 is the latest: rank 1
    assert not ranks[1].any() and ranks[2].tolist() == [0, 1, 0, 0, 0]
    edlae = build_model(ModelArgs(name="edlae", recency_tau=2.0), 3, 5)
    table = {"user_idx": [0, 0, 0, 2], "item_idx": [4, 0, 2, 1], "timestamp": [1, 2, 3, 1]}
    np.testing.assert_allclose(
        edlae.sequence_history(rows).toarray(),
        recency_weighted(table, 3, 5, 2.0).toarray(),
        rtol=1e-6,
    )
    mf = build_model(ModelArgs(name="mf", embed_dim=4), 3, 5)
    assert set(mf.sequence_history(rows).data.tolist()) == {1.0}  # order-blind: binary
