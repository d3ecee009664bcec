"""One top-k: equal scores go to the lower item index for every input kind, k-th place too."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.models import EmbeddingTable, item_matrix, rank_candidates, top_k, top_k_dot
from app.models.topk import CHUNK


def _reference(scores: np.ndarray, exclude: list[np.ndarray], k: int):
    """Brute force: sort whole rows by (excluded, -score, index), NaN/-inf as the lowest value."""
    s = np.array(scores)
    s[~(s > -np.inf)] = np.finfo(s.dtype).min
    banned = np.zeros(s.shape, dtype=bool)
    for r, ex in enumerate(exclude):
        banned[r, np.asarray(ex, dtype=np.int64)] = True
    index = np.broadcast_to(np.arange(s.shape[1]), s.shape)
    order = np.lexsort((index, -s, banned), axis=1)[:, :k]
    idx = np.full((len(s), k), -1)
    vals = np.full((len(s), k), -np.inf, dtype=s.dtype)
    width = order.shape[1]
    idx[:, :width] = order
    vals[:, :width] = np.take_along_axis(s, order, 1)
    out = np.take_along_axis(banned, order, 1)
    idx[:, :width][out] = -1
    vals[:, :width][out] = -np.inf
    return idx, vals


def _csr(rows: list[np.ndarray], n: int) -> sp.csr_matrix:
    r = np.repeat(np.arange(len(rows)), [len(x) for x in rows])
    c = np.concatenate([np.asarray(x, dtype=np.int64) for x in rows])
    return sp.csr_matrix((np.ones(len(c), np.float32), (r, c)), shape=(len(rows), n))


def _boundary_ties(n: int) -> np.ndarray:
    """One row whose 4th to 9th best scores tie (over several chunks and a chunk seam if wide)."""
    s = np.zeros((1, n), dtype=np.float32)
    if n < 10 * CHUNK:
        best, tied = [n - 2, 5, 1], [n - 1, 0, 2, 3, 4, 6]
    else:
        best = [n - 2, 5, 3 * CHUNK - 1]
        tied = [n - 1, 40, 2 * CHUNK - 1, 2 * CHUNK, 7 * CHUNK + 3, 6]
    s[0, best] = [9.0, 8.0, 7.0]
    s[0, tied] = 5.0
    return s


# --- the tie rule, one input kind at a time -------------------------------------------------


@pytest.mark.parametrize("n", [12, 60 * CHUNK + 17], ids=["whole-row", "chunked"])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_ties_at_the_k_boundary_go_to_the_lower_index(n: int, kind: str) -> None:
    s = _boundary_ties(n)
    scores = torch.from_numpy(s.copy()) if kind == "torch" else s
    for k in (3, 4, 5, 6, 8, 9):  # boundary before, inside and after the tied run
        want, want_s = _reference(s, [np.zeros(0)], k)
        got = top_k(scores, None, k)
        np.testing.assert_array_equal(got.indices, want, err_msg=f"k={k}")
        np.testing.assert_array_equal(got.scores, want_s)
    # Excluding the lowest tied index lets the next one in.
    lowest_tied = int(_reference(s, [np.zeros(0)], 4)[0][0, 3])
    got = top_k(scores, [np.array([lowest_tied])], 4).indices
    assert got[0, 3] == _reference(s, [np.array([lowest_tied])], 4)[0][0, 3] > lowest_tied


def test_evaluation_cases_keep_their_lists() -> None:
    scores = np.array([[0.0, 2.0, 1.0, 2.0, 2.0, 1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k(scores, None, 3).indices, [[1, 3, 4]])
    np.testing.assert_array_equal(top_k(scores, None, 6).indices, [[1, 3, 4, 6, 2, 5]])
    np.testing.assert_array_equal(top_k(np.zeros((1, 50)), None, 4).indices, [[0, 1, 2, 3]])
    # NaN and -inf rank last but remain candidates; k past the catalogue pads.
    odd = np.array([[np.nan, -np.inf, 1.0]])
    before = odd.copy()
    got = top_k(odd, None, 5)
    np.testing.assert_array_equal(got.indices, [[2, 0, 1, -1, -1]])
    assert got.scores[0, 1] == np.finfo(np.float64).min and np.isneginf(got.scores[0, 3:]).all()
    np.testing.assert_array_equal(odd, before)  # the input is left alone


def test_integer_scores_rank_as_float64() -> None:
    got = top_k(np.array([[1, 3, 3, 2]]), None, 2)
    np.testing.assert_array_equal(got.indices, [[1, 2]])
    assert got.scores.dtype == np.float64


def _integer_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Items and queries with exact, heavily tied inner products in every precision we store.

    Column 0 is 127 on every row, so an int8 table's row scales are exactly 1 and the int8,
    fp16 and fp32 tables all hold the same integers.
    """
    rng = np.random.default_rng(seed)
    items = rng.integers(-2, 3, size=(n, 4)).astype(np.float32)
    items[:, 0] = 127.0
    queries = rng.integers(-1, 2, size=(5, 4)).astype(np.float32)
    queries[:, 0] = 1.0
    return items, queries


@pytest.mark.parametrize("n", [900, 40 * CHUNK + 5], ids=["whole-row", "chunked"])
def test_dot_products_and_quantised_tables_follow_the_rule(n: int) -> None:
    items, queries = _integer_items(n, seed=n)
    rng = np.random.default_rng(1)
    exclude = [rng.choice(n, size, replace=False) for size in (0, 3, 50, n - 4, n)]
    scores = queries @ items.T
    for k in (1, 10, 37):
        want, want_s = _reference(scores, exclude, k)
        got = top_k_dot(queries, item_matrix(items), exclude, k)
        np.testing.assert_array_equal(got.indices, want, err_msg=f"top_k_dot k={k}")
        np.testing.assert_array_equal(got.scores, want_s)
        for mode in ("none", "fp16", "int8"):
            table = EmbeddingTable.from_float(items, mode, block_rows=700)
            idx, vals = table.search(queries, k, _csr(exclude, n))
            np.testing.assert_array_equal(idx, want, err_msg=f"{mode} k={k}")
            np.testing.assert_array_equal(vals, want_s)


def test_candidate_lists_follow_the_rule() -> None:
    idx = np.array([[30, 4, 17, 9, -1, 2], [5, 6, 7, -1, -1, -1]])
    scores = np.array([[1.0, 2.0, 2.0, 1.0, 5.0, np.nan], [0.0, -np.inf, 0.0, 0, 0, 0]])
    got = rank_candidates(idx, scores, 4)
    # -1 slots are empty whatever their score; NaN ranks as the lowest finite value.
    np.testing.assert_array_equal(got.indices, [[4, 17, 9, 30], [5, 7, -1, -1]])
    np.testing.assert_array_equal(got.scores[0], [2.0, 2.0, 1.0, 1.0])
    assert np.isneginf(got.scores[1, 2:]).all()


# --- agreement with brute force -------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_brute_force_with_ties_non_finite_scores_and_exclusions(dtype) -> None:
    rng = np.random.default_rng(7)
    for trial in range(40):
        n = int(rng.choice([5, 600, 25 * CHUNK + 7, 60 * CHUNK]))
        s = rng.integers(-3, 3, size=(4, n)).astype(dtype)
        s[0, rng.integers(n, size=3)] = np.nan
        s[1, -3:] = np.nan  # in the ragged tail
        s[2, rng.integers(n, size=4)] = -np.inf
        s[3, rng.integers(n, size=2)] = np.finfo(dtype).min
        if trial % 2:
            s[3, :] = -np.inf  # almost nothing left but -inf scores
            s[3, rng.integers(n, size=3)] = 1.0
        exclude = [np.flatnonzero(rng.random(n) < d) for d in (0.0, 0.2, 0.999, 0.5)]
        for k in (1, 4, 30):
            want, want_s = _reference(s, exclude, k)
            for scores in (s, torch.from_numpy(s.copy())):
                got = top_k(scores, exclude, k)
                np.testing.assert_array_equal(got.indices, want, err_msg=f"{trial} n={n} k={k}")
                np.testing.assert_array_equal(got.scores, want_s)
            np.testing.assert_array_equal(top_k(s, _csr(exclude, n), k).indices, want)


@pytest.mark.parametrize(("rows", "n", "k"), [(8, 100_000, 10), (3, 20_000, 50), (2, 5_000, 3)])
def test_chunked_selection_worst_cases(rows: int, n: int, k: int) -> None:
    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(rows, n, generator=gen)
    # All of a row's best scores in one chunk, in the ragged tail, or after excluded chunks.
    scores[0, 3 * CHUNK : 3 * CHUNK + 2 * k] += 10.0
    scores[1, -3:] += 10.0
    exclude = [np.zeros(0, np.int64)] * (rows - 1) + [np.arange(n // 2)]
    got = top_k(scores, exclude, k)
    want_s, want_i = torch.topk(scores, k, dim=1)  # randn has no ties
    np.testing.assert_array_equal(got.indices[:-1], want_i[:-1].numpy())
    np.testing.assert_array_equal(got.scores[:-1], want_s[:-1].numpy())
    last = _reference(scores[-1:].numpy(), exclude[-1:], k)[0]
    np.testing.assert_array_equal(got.indices[-1:], last)


def test_mostly_excluded_rows_are_padded() -> None:
    n = 50_000
    scores = np.ones((2, n), dtype=np.float32)
    scores[0, [7, 40_000]] = [1.5, 2.0]
    keep = np.array([7, 40_000])
    exclude = [np.setdiff1d(np.arange(n), keep), np.arange(n)]
    got = top_k(scores, exclude, 5)
    assert got.indices[0, :2].tolist() == [40_000, 7] and got.scores[0, :2].tolist() == [2.0, 1.5]
    assert (got.indices[0, 2:] == -1).all() and (got.indices[1] == -1).all()
    assert np.isneginf(got.scores[0, 2:]).all() and np.isneginf(got.scores[1]).all()


# --- inputs -----------------------------------------------------------------------------------


def test_inputs_are_left_alone_unless_overwrite() -> None:
    s = np.arange(12, dtype=np.float32).reshape(2, 6)
    t = torch.from_numpy(s.copy())
    before = s.copy()
    top_k(s, [np.array([5]), np.array([0])], 2)
    top_k(t, [np.array([5]), np.array([0])], 2)
    np.testing.assert_array_equal(s, before)
    np.testing.assert_array_equal(t.numpy(), before)
    top_k(s, [np.array([5]), np.array([0])], 2, overwrite=True)
    assert np.isneginf(s[0, 5]) and np.isneginf(s[1, 0])


def test_bad_arguments_are_errors() -> None:
    s = np.zeros((2, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="k must be"):
        top_k(s, None, 0)
    with pytest.raises(ValueError, match="2-D"):
        top_k(np.zeros(4), None, 1)
    with pytest.raises(ValueError, match="exclude has shape"):
        top_k(s, sp.csr_matrix((2, 5)), 1)
    with pytest.raises(ValueError, match="rows"):
        top_k(s, [np.array([0])], 1)
    with pytest.raises(ValueError, match="outside"):
        top_k(s, [np.array([4]), np.array([0])], 1)


def test_empty_inputs() -> None:
    assert top_k(np.zeros((0, 5)), None, 3).indices.shape == (0, 3)
    got = top_k(np.zeros((2, 0)), None, 3)
    assert (got.indices == -1).all() and np.isneginf(got.scores).all()
