"""GradientSync on 2 gloo processes: the same weights as one process stepping on whole batches."""

from __future__ import annotations

import socket

import numpy as np
import torch

from app.models import GradientSync, MatrixFactorization, run_epoch
from app.models.sync import sparse_parameters

N_USERS, N_ITEMS = 60, 20


def _model(num_negatives: int, seed: int) -> MatrixFactorization:
    return MatrixFactorization(
        N_USERS,
        N_ITEMS,
        embed_dim=4,
        num_negatives=num_negatives,
        use_bias=True,
        l2=0.01,
        seed=seed,
    )


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    # The first step touches one user and one item per rank: the capacities it agrees on are
    # outgrown at once, so the next step takes the gather-again path.
    first = (torch.full((16,), 5), torch.full((16,), 3))
    out = [first] + [
        (torch.randint(N_USERS, (16,), generator=gen), torch.randint(N_ITEMS, (16,), generator=gen))
        for _ in range(4)
    ]
    # rank 1's half of the last batch touches only user 0, rank 0's only users >= 30.
    users = torch.cat([torch.arange(30, 38), torch.zeros(8, dtype=torch.int64)])
    return [*out, (users, torch.randint(N_ITEMS, (16,), generator=gen))]


def _rank(rank: int, port: int, num_negatives: int, dense_fraction: float, queue) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    model = _model(num_negatives, seed=rank)  # different inits: the sync starts them equal
    sync = GradientSync(model.module, dense_fraction=dense_fraction)
    opt = model.optimizer(0.05)
    torch.manual_seed(rank)
    halves = [(u[8 * rank : 8 * rank + 8], i[8 * rank : 8 * rank + 8]) for u, i in _batches()]
    run_epoch(model.module, opt, halves, sync)
    queue.put((rank, {k: v.numpy().copy() for k, v in model.state_dict().items()}))
    dist.destroy_process_group()


def _run_ranks(num_negatives: int, dense_fraction: float = 0.5) -> dict[int, dict[str, np.ndarray]]:
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=_rank, args=(r, port, num_negatives, dense_fraction, queue))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    return dict([queue.get(), queue.get()])


def test_two_ranks_match_one_process_on_whole_batches():
    # Exact softmax: dense item table and bias, sparse user table with uneven rows per rank.
    states = _run_ranks(N_ITEMS)
    model = _model(N_ITEMS, seed=0)
    opt = model.optimizer(0.05)
    for users, items in _batches():
        loss = 0.5 * (model.loss(users[:8], items[:8]) + model.loss(users[8:], items[8:]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(states[0][key], states[1][key])
        np.testing.assert_allclose(states[0][key], value.numpy(), atol=1e-6)


def test_ranks_stay_equal_with_sampled_negatives():
    # Sampled negatives differ per rank, so both tables are sparse and touch different rows.
    states = _run_ranks(5)
    initial = _model(5, seed=0).state_dict()
    for key in states[0]:
        np.testing.assert_array_equal(states[0][key], states[1][key])
    assert not np.allclose(states[0]["item_emb.weight"], initial["item_emb.weight"].numpy())


def test_sparse_parameters_are_the_sparse_tables():
    model = _model(5, seed=0)
    module = model.module
    ids = sparse_parameters(module)
    assert id(module.user_emb.weight) in ids and id(module.item_emb.weight) in ids
    assert id(module.bias) not in ids


def test_dense_sum_and_row_gather_step_the_same_rows():
    # 0 sums every sparse table densely, inf gathers every table's rows: with sampled
    # negatives (uneven rows per rank) both must leave the same weights, including rows no
    # rank touched (a dense sum must not turn them into zero-gradient Adam steps).
    dense, gathered = _run_ranks(5, dense_fraction=0.0), _run_ranks(5, dense_fraction=np.inf)
    for key in dense[0]:
        np.testing.assert_array_equal(dense[0][key], dense[1][key])
        np.testing.assert_allclose(dense[0][key], gathered[0][key], atol=1e-6)
