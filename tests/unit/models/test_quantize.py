"""Quantisation: sizes, reconstruction error, retrieval agreement and registry round trips."""

from __future__ import annotations

import io

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from app.config import AppConfig, ModelArgs
from app.evaluate import evaluate
from app.models import (
    EASE,
    QUANTIZE_MODES,
    CompressError,
    EmbeddingTable,
    MatrixFactorization,
    Popularity,
    QuantizedRecommender,
    build_model,
    dequantize_rows,
    quantize,
    quantize_rows,
    quantized_builder,
    top_k,
)
from app.store import load_model, register


def _random(n: int = 5000, d: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d), dtype=np.float32)


def _trained_like(n: int = 5000, d: int = 64, seed: int = 1) -> np.ndarray:
    """Clustered, low-rank-ish vectors with popularity-skewed norms, like a trained item table."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((20, d)).astype(np.float32)
    x = centres[rng.integers(20, size=n)] + 0.3 * rng.standard_normal((n, d)).astype(np.float32)
    norms = (1.0 / np.arange(1, n + 1) ** 0.3).astype(np.float32)
    return x * rng.permutation(norms)[:, None]


def _overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b, strict=True)]))


def test_size_ratios() -> None:
    x = _random(4096, 64)
    sizes = {m: EmbeddingTable.from_float(x, m).nbytes() for m in QUANTIZE_MODES}
    assert sizes["none"] == x.nbytes
    assert sizes["none"] / sizes["fp16"] == pytest.approx(2.0)
    # int8 values + one fp16 scale per row: 4 * 64 / (64 + 2) = 3.88x.
    assert sizes["none"] / sizes["int8"] >= 3.85


def test_int8_reconstruction_error_bound() -> None:
    x = _trained_like()
    x[3] = 0.0  # an all-zero row must survive
    parts = quantize_rows(x, "int8")
    assert parts["q"].dtype == torch.int8 and parts["scale"].shape == (len(x),)
    back = dequantize_rows(parts["q"], parts["scale"]).numpy()
    scale = parts["scale"].numpy()
    # Rounding to the nearest step: each element is within half a step of its row's scale.
    assert np.all(np.abs(back - x) <= scale[:, None] / 2 + 1e-7)
    assert np.all(back[3] == 0.0)
    rel = np.linalg.norm(back - x) / np.linalg.norm(x)
    assert rel < 0.01
    fp16 = dequantize_rows(quantize_rows(x, "fp16")["q"]).numpy()
    assert np.abs(fp16 - x).max() <= 1e-3 * np.abs(x).max()


@pytest.mark.parametrize("table", ["random", "trained_like"])
@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_top10_overlap_with_full_precision(table: str, mode: str) -> None:
    x = _random() if table == "random" else _trained_like()
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((64, x.shape[1]), dtype=np.float32)
    if table == "trained_like":
        queries = x[rng.integers(len(x), size=64)] + 0.1 * queries
    exact = top_k(queries @ x.T, None, 10).indices
    idx, scores = EmbeddingTable.from_float(x, mode, block_rows=1500).search(queries, 10)
    overlap = _overlap(idx, exact)
    assert overlap >= (0.99 if mode == "fp16" else 0.95), overlap
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_search_matches_top_k_with_exclusions() -> None:
    x = _trained_like(1500, 32)
    rng = np.random.default_rng(3)
    queries = rng.standard_normal((20, 32), dtype=np.float32)
    exclude = sp.random(20, 1500, density=0.05, format="csr", random_state=3)
    for mode in QUANTIZE_MODES:
        table = EmbeddingTable.from_float(x, mode, block_rows=600)
        idx, scores = table.search(queries, 10, exclude)
        full = table.scores(queries)
        expected = top_k(full, exclude, 10).indices
        # Same lists up to float rounding between kernels (near-ties may swap).
        assert _overlap(idx, expected) >= 0.99
        expected_scores = np.take_along_axis(full, expected, axis=1)
        np.testing.assert_allclose(scores, expected_scores, rtol=1e-4, atol=1e-5)
        assert not exclude[np.repeat(np.arange(20), 10), idx.ravel()].any()
    # Fewer candidates than k: the tail is -1 / -inf.
    idx, scores = EmbeddingTable.from_float(x[:5], "int8").search(queries[:2], 10)
    assert (idx[:, 5:] == -1).all() and np.isneginf(scores[:, 5:]).all()


def _mf(n_users: int = 300, n_items: int = 1000, use_bias: bool = True) -> MatrixFactorization:
    model = MatrixFactorization(n_users, n_items, embed_dim=32, use_bias=use_bias, seed=0)
    with torch.no_grad():  # trained-like tables: clustered item vectors, skewed bias
        model.module.item_emb.weight.copy_(torch.from_numpy(_trained_like(n_items, 32)))
        if model.module.bias is not None:
            model.module.bias.copy_(torch.linspace(1.0, -1.0, n_items))
    return model


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_quantized_model_state_dict_round_trip(mode: str) -> None:
    base = _mf()
    q = quantize(base, mode)
    assert isinstance(q, QuantizedRecommender)
    state = q.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["item_emb.weight.q"].dtype == (torch.int8 if mode == "int8" else torch.float16)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    fresh = QuantizedRecommender(MatrixFactorization(300, 1000, embed_dim=32, use_bias=True), mode)
    fresh.load_state_dict(loaded)
    users = np.arange(50)
    hist = sp.csr_matrix((50, 1000), dtype=np.float32)
    np.testing.assert_array_equal(fresh.score(users, hist), q.score(users, hist))
    full = base.state_dict()
    ratio = sum(t.numel() * t.element_size() for t in full.values()) / q.nbytes()
    assert ratio >= (1.9 if mode == "fp16" else 3.5), ratio
    # Retrieval through the model agrees with exact full-precision ranking.
    idx, _ = q.search(users, hist, 10)
    assert _overlap(idx, top_k(base.score(users, hist), hist, 10).indices) >= 0.95
    with pytest.raises(CompressError, match="quantised as"):
        other = "fp16" if mode == "int8" else "int8"
        QuantizedRecommender(_mf(), other).load_state_dict(loaded)


def test_quantize_passthrough_and_errors() -> None:
    pop = Popularity(4, 5)
    assert quantize(pop, "none") is pop
    with pytest.raises(CompressError, match="no embedding tables"):
        quantize(pop, "int8")
    with pytest.raises(CompressError, match="no embedding tables"):
        quantize(EASE(4, 5), "fp16")
    with pytest.raises(CompressError, match="unknown quantize mode"):
        quantize(_mf(), "int4")


def test_quantized_ndcg_close_and_registry_round_trip(tiny_dataset, tmp_lake) -> None:
    ds = tiny_dataset
    train, target = ds.csr("train", "valid"), ds.csr("test")
    # A "trained" MF: user and item factors from a truncated SVD of the training matrix.
    u, s, vt = np.linalg.svd(train.toarray(), full_matrices=False)
    base = build_model(ModelArgs(name="mf", embed_dim=8), ds.n_users, ds.n_items)
    with torch.no_grad():
        base.module.user_emb.weight.copy_(torch.from_numpy((u[:, :8] * s[:8]).astype(np.float32)))
        base.module.item_emb.weight.copy_(torch.from_numpy(vt[:8].T.astype(np.float32)))
    all_users = np.arange(ds.n_users)

    def ndcg(model) -> float:
        return evaluate(lambda b: model.score(b, train[b]), train, target)["ndcg@10"]

    full = ndcg(base)
    assert full > 0.2
    cfg = AppConfig(lake=tmp_lake.uri, model=ModelArgs(name="mf", embed_dim=8))
    for mode in ("fp16", "int8"):
        q = quantize(base, mode)
        assert abs(ndcg(q) - full) / full <= 0.01
        record = register(tmp_lake, f"tiny-mf-{mode}", q, cfg, ds, {})
        assert record.lineage["family"] == "quantized"
        loaded, _ = load_model(tmp_lake, f"tiny-mf-{mode}", "latest", quantized_builder(mode))
        np.testing.assert_array_equal(loaded.score(all_users, train), q.score(all_users, train))


def test_fit_trains_the_fp32_model_and_compresses_it_again(tiny_dataset) -> None:
    train = tiny_dataset.csr("train")
    base = MatrixFactorization(tiny_dataset.n_users, tiny_dataset.n_items, embed_dim=8, seed=0)
    q = QuantizedRecommender(base, "int8")
    before = q.state_dict()["item_emb.weight.q"].clone()
    assert q.fit(train, epochs=2, batch_size=64, lr=0.05) is q
    after = q.state_dict()
    assert after["item_emb.weight.q"].dtype == torch.int8
    assert not torch.equal(after["item_emb.weight.q"], before)
    users = np.arange(5)
    np.testing.assert_allclose(
        q.score(users, train[users]),
        q.base.score(users, train[users]),
        rtol=0.05,
        atol=0.05,
    )
