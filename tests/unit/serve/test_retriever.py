"""Retriever scoring: exact top-K over fp32 embeddings and the compressed variants it serves."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import ModelArgs
from app.models import Popularity, build_model
from app.serve.retriever import LoadedModel, Query, ScoringOptions


def _record(version: str = "v1") -> Any:
    return SimpleNamespace(version=version)


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


def _tied_mf(n_items: int = 3000):
    """MF whose users and items hold small integers: exact scores with many ties.

    Column 0 is 127 on every item, so an int8 table stores the same integers (row scale 1).
    """
    rng = np.random.default_rng(4)
    model = build_model(ModelArgs(name="mf", embed_dim=4), n_users=6, n_items=n_items, seed=0)
    items = rng.integers(-2, 3, size=(n_items, 4)).astype(np.float32)
    items[:, 0] = 127.0
    users = rng.integers(-1, 2, size=(6, 4)).astype(np.float32)
    users[:, 0] = 1.0
    with torch.no_grad():
        model.module.item_emb.weight.copy_(torch.from_numpy(items))
        model.module.user_emb.weight.copy_(torch.from_numpy(users))
    return model, users @ items.T


def _expected(scores: np.ndarray, exclude: np.ndarray, k: int) -> list[int]:
    s = scores.astype(np.float64).copy()
    s[exclude] = -np.inf
    order = np.lexsort((np.arange(len(s)), -s))[:k]
    return [int(i) for i in order if np.isfinite(s[i])]


@pytest.mark.parametrize("quantize", ["none", "fp16", "int8"])
def test_served_lists_break_ties_by_the_lower_item_index(quantize: str) -> None:
    model, scores = _tied_mf()
    loaded = LoadedModel(model, _record(), ScoringOptions(quantize=quantize))
    rng = np.random.default_rng(2)
    queries = []
    for u in range(6):
        seen = np.sort(rng.choice(3000, 40, replace=False))
        queries.append(Query("v1", u, seen, np.zeros(0, np.int64), seen, 25))
    for q, cand in zip(queries, loaded.score(queries), strict=True):
        assert cand.items.tolist() == _expected(scores[q.user_idx], q.exclude, 25)


def test_models_without_embeddings_break_ties_by_the_lower_item_index() -> None:
    counts = np.array([3, 5, 5, 2, 5, 5, 0, 2])
    x = sp.csr_matrix((np.arange(6)[:, None] < counts[None, :]).astype(np.float32))
    loaded = LoadedModel(Popularity(6, 8).fit(x), _record())
    assert not loaded.embedded
    q = Query("v1", 0, np.array([1]), np.zeros(0, np.int64), np.array([1]), 5)
    (cand,) = loaded.score([q])
    assert cand.items.tolist() == [2, 4, 5, 0, 3]  # the 5s, then 3, then the first of the 2s
