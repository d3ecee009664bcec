"""Torch models: losses, seeding, fold-in, new items, sparse gradients, RowAdam, and the one
training loop (fit, run_epoch)."""

from __future__ import annotations

import platform
import resource

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.evaluate import evaluate
from app.models import (
    MatrixFactorization,
    Popularity,
    TorchRecommender,
    TwoTower,
    build_model,
    keep_freed_heap,
    run_epoch,
)
from app.models.modules import RowAdam


@pytest.mark.parametrize("name", ["mf", "two_tower"])
def test_seed_reproduces_and_differs(built, small_matrix, name):
    users = np.arange(7)
    a, b, c = built(name, seed=5), built(name, seed=5), built(name, seed=6)
    np.testing.assert_array_equal(a.score(users, small_matrix), b.score(users, small_matrix))
    assert not np.array_equal(a.score(users, small_matrix), c.score(users, small_matrix))
    torch.manual_seed(0)
    la = a.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    torch.manual_seed(0)
    lb = b.loss(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert la.item() == lb.item()


@pytest.mark.parametrize("loss", ["bpr", "softmax"])
def test_losses_are_finite_and_differentiable(built, loss):
    model = built("mf", loss=loss)
    out = model.loss(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2, 2]))
    out.backward()
    assert torch.isfinite(out)
    assert model.module.item_emb.weight.grad is not None


def test_mf_folds_in_unseen_users(built):
    model = built("mf")
    history = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0]], dtype=np.float32))
    scores = model.score(np.array([7]), history)  # user 7 is outside the trained range
    items = model.item_embeddings()
    np.testing.assert_allclose(scores[0], items[:2].mean(0) @ items.T, rtol=1e-5, atol=1e-6)


def test_two_tower_scores_new_users_and_new_items(built):
    model: TwoTower = built("two_tower")
    history = sp.csr_matrix(np.array([[0, 1, 1, 0, 0, 0]], dtype=np.float32))
    scores = model.score(np.array([-1]), history)  # a user never seen in training
    assert scores.shape == (1, 6) and np.isfinite(scores).all()
    other = model.score(np.array([-1]), sp.csr_matrix(np.eye(6, dtype=np.float32)[[4]]))
    assert not np.allclose(scores, other)  # the history matters
    new_items = model.embed_new_items([["a", "b"], ["c"], ["unknown-genre"]])
    assert new_items.shape == (3, model.item_embeddings().shape[1])
    assert not np.allclose(new_items[0], new_items[1])
    user = model.user_embeddings(np.array([-1]), history)
    assert (user @ new_items.T).shape == (1, 3)


def test_torch_models_are_told_apart_by_type(built):
    assert isinstance(built("mf"), TorchRecommender)
    assert isinstance(built("two_tower"), TorchRecommender)
    assert not isinstance(built("ease"), TorchRecommender)
    assert not isinstance(built("popularity"), TorchRecommender)


@pytest.mark.parametrize("name", ["mf", "two_tower"])
def test_trained_model_beats_random_and_popularity_on_planted_data(tiny_dataset, name):
    train, test = tiny_dataset.csr("train", "valid"), tiny_dataset.csr("test")
    genres = [list(g) for g in tiny_dataset.items().column("genres").to_pylist()]
    args = ModelArgs(name=name, embed_dim=16, num_negatives=10_000, temperature=0.2)
    model = build_model(args, tiny_dataset.n_users, tiny_dataset.n_items, genres, seed=0)
    losses: list[float] = []
    model.fit(
        train, epochs=25, batch_size=64, lr=0.02, on_epoch=lambda _, loss: losses.append(loss)
    )
    assert len(losses) == 25 and losses[-1] < 0.8 * losses[0]
    assert not model.module.training  # fit leaves the module in eval mode

    def ndcg(m):
        return evaluate(lambda u: m.score(u, train[u]), train, test)["ndcg@10"]

    pop = ndcg(Popularity(tiny_dataset.n_users, tiny_dataset.n_items).fit(train))
    rng = np.random.default_rng(0)

    class _Random(Popularity):
        def score(self, users, history):
            return rng.random((len(users), self.n_items)).astype(np.float32)

    rand = ndcg(_Random(tiny_dataset.n_users, tiny_dataset.n_items))
    trained = ndcg(model)
    assert trained > 2.5 * rand
    assert trained > pop + 0.1


def test_fit_is_reproducible_and_keeps_the_callers_rng(small_matrix):
    def trained(seed: int) -> MatrixFactorization:
        model = MatrixFactorization(7, 6, embed_dim=4, num_negatives=3, seed=1)
        return model.fit(small_matrix, epochs=3, batch_size=4, lr=0.05, seed=seed)

    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    a, b, c = trained(0), trained(0), trained(1)
    assert torch.equal(torch.random.get_rng_state(), state)
    users = np.arange(7)
    np.testing.assert_array_equal(a.score(users, small_matrix), b.score(users, small_matrix))
    assert not np.array_equal(a.score(users, small_matrix), c.score(users, small_matrix))


def test_run_epoch_steps_once_per_batch_and_weights_the_loss_by_rows():
    weight = torch.nn.Parameter(torch.tensor([2.0]))
    seen: list[int] = []

    def loss_fn(users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        seen.append(len(users))
        return weight * (users + items).float().mean()

    optimizer = torch.optim.SGD([weight], lr=0.5)
    batches = [
        (torch.tensor([1, 2, 3]), torch.tensor([0, 0, 0])),
        (torch.tensor([4]), torch.tensor([4])),
    ]
    loss_sum, rows = run_epoch(loss_fn, optimizer, batches)
    assert seen == [3, 1] and rows == 4
    # Batch 1: loss 2 * 2 = 4 (x3 rows), step -> weight 2 - 0.5 * 2 = 1; batch 2: 1 * 8 (x1).
    assert loss_sum == pytest.approx(4.0 * 3 + 8.0 * 1)
    assert weight.item() == pytest.approx(1.0 - 0.5 * 8.0)
    assert run_epoch(loss_fn, optimizer, []) == (0.0, 0)


@pytest.mark.parametrize(("num_negatives", "item_sparse"), [(3, True), (100, False)])
def test_mf_tables_read_row_by_row_get_sparse_gradients(num_negatives, item_sparse):
    # Users always; items unless the exact softmax (negatives >= catalogue) reads them whole.
    model = MatrixFactorization(50, 30, embed_dim=4, num_negatives=num_negatives, use_bias=True)
    model.prepare(sp.csr_matrix(np.eye(50, 30, dtype=np.float32)))
    model.loss(torch.tensor([0, 1, 1, 7]), torch.tensor([0, 1, 2, 2])).backward()
    user_grad = model.module.user_emb.weight.grad
    assert user_grad is not None and user_grad.is_sparse
    assert set(user_grad.coalesce().indices()[0].tolist()) == {0, 1, 7}  # the batch's rows only
    assert model.module.item_emb.weight.grad.is_sparse == item_sparse
    assert isinstance(model.optimizer(0.01), RowAdam)
    model.module.zero_grad(set_to_none=True)
    model.prepare(sp.csr_matrix(np.eye(50, 30, dtype=np.float32)), sparse=False)  # for NCCL
    model.loss(torch.tensor([0, 1]), torch.tensor([0, 1])).backward()
    assert not any(p.grad.is_sparse for p in model.module.parameters())


def test_exact_softmax_by_user_is_the_per_pair_cross_entropy():
    # Each distinct user's logits are computed once; loss and gradients equal one row per pair.
    model = MatrixFactorization(40, 25, embed_dim=6, num_negatives=25, use_bias=True, l2=0.01)
    m = model.module
    with torch.no_grad():
        m.bias.normal_()
    users, items = torch.tensor([3, 3, 5, 0, 5, 3]), torch.tensor([1, 2, 2, 7, 24, 1])
    model.loss(users, items).backward()
    u = m.user_emb.weight.detach().clone().requires_grad_()
    v = m.item_emb.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    logits = (u[users] @ v.T + b) / m.temperature
    reg = u[users].pow(2).sum(1).mean() + v[items].pow(2).sum(1).mean()
    ref = torch.nn.functional.cross_entropy(logits, items) + 0.01 * reg
    ref.backward()
    torch.testing.assert_close(model.loss(users, items), ref)
    torch.testing.assert_close(m.user_emb.weight.grad.to_dense(), u.grad)
    torch.testing.assert_close(m.item_emb.weight.grad, v.grad)
    torch.testing.assert_close(m.bias.grad, b.grad)


def test_row_adam_is_sparse_adam_on_touched_rows_and_adam_on_dense():
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(20, 4))
    dense = torch.nn.Parameter(torch.randn(5))
    table_ref = torch.nn.Parameter(table.detach().clone())
    dense_ref = torch.nn.Parameter(dense.detach().clone())
    opt = RowAdam([table, dense], lr=0.1)
    refs = [torch.optim.SparseAdam([table_ref], lr=0.1), torch.optim.Adam([dense_ref], lr=0.1)]
    untouched = table.detach()[10:].clone()
    for _ in range(4):
        rows = torch.randint(10, (7,))  # rows 10-19 never appear in a batch
        for t, d in ((table, dense), (table_ref, dense_ref)):
            emb = torch.nn.functional.embedding(rows, t, sparse=True)
            (emb.pow(2).sum() + d.pow(3).sum()).backward()
        for o in (opt, *refs):
            o.step()
            o.zero_grad(set_to_none=True)
    torch.testing.assert_close(table, table_ref)
    torch.testing.assert_close(dense, dense_ref)
    assert torch.equal(table.detach()[10:], untouched)
    state = opt.state_dict()
    again = RowAdam([table, dense], lr=0.1)
    again.load_state_dict(state)
    assert again.state_dict()["state"][0]["step"] == 4


def test_mf_trained_with_sparse_rows_beats_popularity_on_a_latent_factor_set():
    # A small synthetic set of the kind the synthetic source generates: latent user/item factors
    # and popular items; MF (exact softmax, item bias, the sparse path) must beat popularity.
    rng = np.random.default_rng(1)
    n_users, n_items = 300, 120
    pu, pi = rng.normal(size=(n_users, 4)), rng.normal(size=(n_items, 4))
    logits = pu @ pi.T * 1.5 - np.log1p(np.arange(n_items))[None, :] * 0.5
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    rows, cols = [], []
    for u in range(n_users):
        picked = rng.choice(n_items, 20, replace=False, p=probs[u])
        rows += [u] * 20
        cols += picked.tolist()
    x = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n_users, n_items))
    split = rng.random(x.nnz) < 0.8
    coo = x.tocoo()
    train = sp.csr_matrix((coo.data[split], (coo.row[split], coo.col[split])), shape=x.shape)
    test = sp.csr_matrix((coo.data[~split], (coo.row[~split], coo.col[~split])), shape=x.shape)
    model = MatrixFactorization(
        n_users,
        n_items,
        embed_dim=8,
        num_negatives=n_items,
        temperature=0.5,
        l2=0.01,
        use_bias=True,
    )
    losses: list[float] = []
    model.fit(train, epochs=15, batch_size=256, lr=0.02, on_epoch=lambda _, v: losses.append(v))
    assert losses[-1] < losses[0]

    def ndcg(m):
        return evaluate(lambda u: m.score(u, train[u]), train, test)["ndcg@10"]

    assert ndcg(model) > 2 * ndcg(Popularity(n_users, n_items).fit(train))


def test_normalized_mf_scores_by_cosine_plus_bias_for_known_and_folded_in_users():
    model = MatrixFactorization(9, 6, embed_dim=4, num_negatives=6, use_bias=True, normalize=True)
    with torch.no_grad():
        model.module.bias.normal_()
        model.module.user_emb.weight.mul_(7.0)  # raw lengths do not matter
    history = sp.csr_matrix(np.array([[1, 1, 0, 0, 0, 0]] * 2, dtype=np.float32))
    users = np.array([3, 20])  # a known user and one folded in from the history
    u = model.user_embeddings(users, history)
    np.testing.assert_allclose(np.linalg.norm(u[:, :4], axis=1), 1.0, rtol=1e-5)
    v = model.item_embeddings()
    np.testing.assert_allclose(np.linalg.norm(v[:, :4], axis=1), 1.0, rtol=1e-5)
    raw_u = model.module.user_emb.weight.detach()[3]
    raw_v = model.module.item_emb.weight.detach()
    cos = torch.nn.functional.cosine_similarity(raw_u[None, :], raw_v).numpy()
    scores = model.score(users, history)
    np.testing.assert_allclose(scores[0], cos + model.module.bias.detach().numpy(), rtol=1e-5)
    assert model.hparams()["normalize"] is True
    again = MatrixFactorization(9, 6, **model.hparams())
    again.load_state_dict(model.state_dict())
    np.testing.assert_allclose(again.score(users, history), scores, rtol=1e-6)


def test_freed_heap_is_kept_so_a_second_step_does_not_fault_its_tensors_in():
    glibc = platform.libc_ver()[0] == "glibc"
    assert keep_freed_heap() is glibc
    if not glibc:
        pytest.skip("the heap setting is glibc's")
    pages = (64 << 20) // resource.getpagesize()

    def faults_of_one_tensor() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.ones(16 << 20)  # 64 MB, written: every page touched
        del t
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    faults_of_one_tensor()
    # Freed, the block stays in the heap: the next one reuses its pages.
    assert faults_of_one_tensor() < pages // 10
