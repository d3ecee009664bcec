"""Retriever scoring: exact top-K over fp32 embeddings and the compressed variants it serves."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from app.config import ModelArgs
from app.model import build_model
from app.serve.retriever import LoadedModel, Query, ScoringOptions, top_k_dot


def _record(version: str = "v1") -> Any:
    return SimpleNamespace(version=version)


def test_top_k_dot_matches_brute_force_and_excludes() -> None:
    rng = np.random.default_rng(0)
    users = rng.normal(size=(3, 8)).astype(np.float32)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    exclude = [np.array([0, 1, 2]), np.zeros(0, np.int64), np.arange(48)]
    idx, vals = top_k_dot(users, items, exclude, k=5)
    scores = users @ items.T
    for row, ex in enumerate(exclude):
        s = scores[row].copy()
        s[ex] = -np.inf
        want = np.argsort(-s, kind="stable")[:5]
        want = want[np.isfinite(s[want])]
        assert idx[row, : len(want)].tolist() == want.tolist()
        np.testing.assert_allclose(vals[row, : len(want)], s[want], rtol=1e-5)
    # Only 2 candidates are left for the last user: the rest of the list is padding.
    assert idx[2, 2:].tolist() == [-1, -1, -1] and np.isneginf(vals[2, 2:]).all()


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_compressed_variant_serves_nearly_the_same_lists(mode: str) -> None:
    model = build_model(ModelArgs(name="mf", embed_dim=32), n_users=40, n_items=2000, seed=0)
    full = LoadedModel(model, _record())
    small = LoadedModel(model, _record(), ScoringOptions(quantize=mode))
    assert small.table is not None and small.family == "mf"
    rng = np.random.default_rng(1)
    queries = [
        Query(
            "v1",
            u,
            np.sort(rng.choice(2000, 5, replace=False)),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            10,
        )
        for u in range(40)
    ]
    for q in queries:
        q.exclude = q.history
    a = full.score(queries)
    b = small.score(queries)
    overlap = np.mean([len(set(x.items) & set(y.items)) / 10 for x, y in zip(a, b, strict=True)])
    assert overlap >= 0.9, overlap
    for q, cand in zip(queries, b, strict=True):
        assert not set(cand.items.tolist()) & set(q.exclude.tolist())


def test_unknown_quantize_mode_is_an_error() -> None:
    model = build_model(ModelArgs(name="mf", embed_dim=8), n_users=4, n_items=20, seed=0)
    with pytest.raises(Exception, match="quantize mode"):
        LoadedModel(model, _record(), ScoringOptions(quantize="int4"))


@pytest.mark.parametrize(("rows", "n", "k"), [(8, 100_000, 10), (3, 20_000, 50), (2, 5_000, 3)])
def test_chunked_top_k_equals_torch_topk(rows: int, n: int, k: int) -> None:
    import torch

    from app.serve.retriever import TOPK_CHUNK, top_k_rows

    gen = torch.Generator().manual_seed(n)
    scores = torch.randn(rows, n, generator=gen)
    # Worst cases for the chunk bound: all of a row's best scores in one chunk, in the ragged
    # tail, or excluded (-inf) chunk after chunk.
    scores[0, 3 * TOPK_CHUNK : 3 * TOPK_CHUNK + 2 * k] += 10.0
    scores[1, -3:] += 10.0
    scores[-1, : n // 2] = float("-inf")
    vals, idx = top_k_rows(scores, k)
    want_vals, want_idx = torch.topk(scores, k, dim=1, sorted=True)
    assert torch.equal(vals, want_vals)
    assert torch.equal(idx, want_idx)


def test_chunked_top_k_keeps_the_padding_of_mostly_excluded_rows() -> None:
    import torch

    from app.serve.retriever import top_k_rows

    scores = torch.full((2, 50_000), float("-inf"))
    scores[0, [7, 40_000]] = torch.tensor([1.0, 2.0])
    vals, idx = top_k_rows(scores, 5)
    assert idx[0, :2].tolist() == [40_000, 7] and vals[0, :2].tolist() == [2.0, 1.0]
    assert torch.isneginf(vals[0, 2:]).all() and torch.isneginf(vals[1]).all()


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_compressed_variant_holds_no_fp32_item_copy_and_finds_similar_items(mode: str) -> None:
    model = build_model(ModelArgs(name="mf", embed_dim=32), n_users=40, n_items=2000, seed=0)
    full = LoadedModel(model, _record())
    small = LoadedModel(model, _record(), ScoringOptions(quantize=mode))
    assert full.items is not None and full.items.nbytes == 2000 * 32 * 4
    assert small.items is None and small.table is not None  # the table is the only item copy
    assert small.table.nbytes() < full.items.nbytes
    overlaps = []
    for item in (0, 17, 1999):
        a, b = full.similar(item, 10), small.similar(item, 10)
        assert item not in a.items.tolist() and item not in b.items.tolist()
        assert np.all(np.diff(b.scores) <= 0) and np.all(np.abs(b.scores) <= 1.0 + 1e-5)
        overlaps.append(len(set(a.items.tolist()) & set(b.items.tolist())) / 10)
    assert np.mean(overlaps) >= 0.8, overlaps
    # The cosine of fp32 vectors, computed directly.
    v = model.item_embeddings()
    cos = v @ v[17] / (np.linalg.norm(v, axis=1) * np.linalg.norm(v[17]))
    cos[17] = -np.inf
    np.testing.assert_array_equal(full.similar(17, 10).items, np.argsort(-cos)[:10])
