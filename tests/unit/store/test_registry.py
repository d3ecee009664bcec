"""Tests for app.store.registry: round trip, stable ids, aliases, promotion gate, S3 lakes."""

from __future__ import annotations

import io
import json
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
import torch

from app.config import AppConfig, load_config
from app.models import Recommender, build_model
from app.store import (
    DatasetVersion,
    Lake,
    PromotionRefused,
    RegistryError,
    aliases,
    datasets_root,
    get_record,
    list_versions,
    load_model,
    load_weights,
    promote,
    promotions,
    register,
    registry_name,
    resolve,
    update_metrics,
)

N_USERS, N_ITEMS = 30, 20


class _DotModel(Recommender):
    """Tiny matrix factorisation used instead of the real models (keeps this test independent)."""

    family = "mf"

    def __init__(self, n_users: int, n_items: int, dim: int = 4, seed: int = 0) -> None:
        super().__init__(n_users, n_items)
        g = torch.Generator().manual_seed(seed)
        self.user = torch.randn(n_users, dim, generator=g)
        self.item = torch.randn(n_items, dim, generator=g)
        self.dim = dim

    def score(self, users: np.ndarray, history: sp.csr_matrix) -> np.ndarray:
        return (self.user[torch.as_tensor(users)] @ self.item.T).numpy()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"user": self.user, "item": self.item}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.user, self.item = state["user"], state["item"]

    def hparams(self) -> dict[str, int]:
        return {"dim": self.dim}


class _Builder:
    """``build_model``-compatible factory that records what it was given."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, args, n_users, n_items, item_genres=None, seed=0) -> _DotModel:
        self.calls.append({"args": args, "item_genres": item_genres, "seed": seed})
        return _DotModel(n_users, n_items, dim=4, seed=12345)  # random until weights load


def _dataset(lake: Lake, name: str = "tiny", version: str = "v1") -> DatasetVersion:
    """Publish a minimal dataset version (manifest + items with genres) and return it."""
    rel = posixpath.join(datasets_root(name), version)
    items = pa.table(
        {
            "item_idx": np.arange(N_ITEMS, dtype=np.int32),
            "item_id": [f"m{i}" for i in range(N_ITEMS)],
            "genres": [["Drama"] if i % 2 else ["Comedy", "Drama"] for i in range(N_ITEMS)],
        }
    )
    buf = io.BytesIO()
    pq.write_table(items, buf)
    lake.write_bytes(posixpath.join(rel, "items.parquet"), buf.getvalue())
    manifest = {"n_users": N_USERS, "n_items": N_ITEMS, "created_at": "2026-01-01T00:00:00+00:00"}
    lake.write_json(posixpath.join(rel, "manifest.json"), manifest)
    return DatasetVersion(lake=lake, name=name, version=version, manifest=manifest)


def _cfg(lake: Lake, **overrides: object) -> AppConfig:
    items = [f"lake={lake.uri}", "data.source=synthetic", "data.name=tiny", "model.name=mf"]
    return load_config(overrides=items + [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake"))


def _roundtrip(lake: Lake) -> None:
    ds = _dataset(lake)
    cfg = _cfg(lake)
    name = registry_name(cfg.data.name, cfg.model.name)
    assert name == "tiny-mf"
    model = _DotModel(N_USERS, N_ITEMS, seed=1)
    rec = register(
        lake,
        name,
        model,
        cfg,
        ds,
        {"valid_ndcg@10": 0.25},
        lineage_extra={"parent_run": "run-1", "checkpoint": "/ckpt/epoch_3"},
    )
    assert list_versions(lake, name) == [rec.version]
    builder = _Builder()
    loaded, rec2 = load_model(lake, name, rec.version, builder=builder)
    users = np.arange(N_USERS)
    hist = sp.csr_matrix((N_USERS, N_ITEMS), dtype=np.float32)
    np.testing.assert_array_equal(loaded.score(users, hist), model.score(users, hist))
    assert rec2.version == rec.version
    assert rec2.metrics == {"valid_ndcg@10": 0.25}
    assert rec2.config["model"]["name"] == "mf"
    lin = rec2.lineage
    assert lin["dataset"] == {
        "name": "tiny",
        "version": "v1",
        "uri": ds.lake.full_uri(ds.rel),
        "n_users": N_USERS,
        "n_items": N_ITEMS,
    }
    assert lin["parent_run"] == "run-1" and lin["checkpoint"] == "/ckpt/epoch_3"
    assert lin["hparams"] == {"dim": 4}
    assert len(lin["code"]["sources_sha256"]) == 64 and "git_commit" in lin["code"]
    assert lin["created_at"]
    # the builder got the stored model section, the seed and the dataset's item genres
    call = builder.calls[0]
    assert call["args"].name == "mf" and call["seed"] == cfg.seed
    assert call["item_genres"][0] == ["Comedy", "Drama"] and len(call["item_genres"]) == N_ITEMS


def test_register_load_round_trip(lake: Lake) -> None:
    _roundtrip(lake)
    name = "tiny-mf"
    version = list_versions(lake, name)[0]
    files = lake.listdir(posixpath.join("models", name, version))
    assert files == ["config.yaml", "lineage.json", "manifest.json", "metrics.json", "weights.pt"]
    assert not [f for f in lake.listdir(posixpath.join("models", name)) if f.startswith(".")]


def test_version_id_is_stable_and_sortable(lake: Lake) -> None:
    ds = _dataset(lake)
    cfg = _cfg(lake)
    a = register(lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=1), cfg, ds, {})
    again = register(lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=1), cfg, ds, {"x": 1})
    assert again.version == a.version  # identical weights + config + dataset: same version
    assert list_versions(lake, "tiny-mf") == [a.version]
    stamp, digest = a.version.split("-")
    assert len(stamp) == len("20261128T154500") and stamp[8] == "T" and len(digest) == 8
    other = register(lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=2), cfg, ds, {})
    other_cfg = register(
        lake,
        "tiny-mf",
        _DotModel(N_USERS, N_ITEMS, seed=1),
        _cfg(lake, **{"train.lr": 0.5}),
        ds,
        {},
    )
    assert len({a.version, other.version, other_cfg.version}) == 3
    assert list_versions(lake, "tiny-mf")[0] == a.version  # oldest first
    assert resolve(lake, "tiny-mf", "latest") == list_versions(lake, "tiny-mf")[-1]


def test_weights_load_with_weights_only(lake: Lake) -> None:
    rec = register(
        lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=1), _cfg(lake), _dataset(lake), {}
    )
    raw = lake.read_bytes(posixpath.join("models", "tiny-mf", rec.version, "weights.pt"))
    state = torch.load(io.BytesIO(raw), weights_only=True)
    assert set(state) == {"user", "item"} and state["user"].shape == (N_USERS, 4)
    torch.testing.assert_close(load_weights(lake, "tiny-mf", rec.version)["item"], state["item"])
    manifest = rec.manifest
    assert manifest["version"] == rec.version and "weights.pt" in manifest["files"]


def test_refs_and_unknown_ref_error(lake: Lake) -> None:
    ds = _dataset(lake)
    cfg = _cfg(lake)
    v1 = register(lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=1), cfg, ds, {}).version
    assert resolve(lake, "tiny-mf", v1[:17]) == v1  # unique prefix
    with pytest.raises(RegistryError) as err:
        resolve(lake, "tiny-mf", "nope")
    assert "not found" in str(err.value) and v1 in str(err.value)
    with pytest.raises(RegistryError, match="alias 'production' .* is not set"):
        load_model(lake, "tiny-mf", "production", builder=_Builder())
    with pytest.raises(RegistryError, match="no published versions"):
        resolve(lake, "other-mf", "latest")


def test_resolve_builds_on_lake_version_resolution(lake: Lake) -> None:
    ds = _dataset(lake)
    cfg = _cfg(lake)
    v1 = register(lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=1), cfg, ds, {}).version
    v2 = register(lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=2), cfg, ds, {}).version
    root = "models/tiny-mf"
    for ref in ("latest", "", None, v1, v2, v2[:-2]):
        assert resolve(lake, "tiny-mf", ref) == lake.resolve_version(root, ref)
    shared = os.path.commonprefix([v1, v2])  # timestamps: at least the century
    with pytest.raises(RegistryError, match=f"ambiguous .*{v1}.*aliases: none"):
        resolve(lake, "tiny-mf", shared)
    promote(lake, "tiny-mf", v1, "staging")
    assert resolve(lake, "tiny-mf", " staging ") == v1
    # An alias whose version disappeared is reported, not silently followed.
    lake.remove(posixpath.join(root, v1))
    with pytest.raises(RegistryError, match="not published"):
        resolve(lake, "tiny-mf", "staging")


def test_aliases_promotions_and_gate(lake: Lake) -> None:
    ds = _dataset(lake)
    cfg = _cfg(lake)
    good = register(
        lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=1), cfg, ds, {"valid_ndcg@10": 0.30}
    ).version
    worse = register(
        lake, "tiny-mf", _DotModel(N_USERS, N_ITEMS, seed=2), cfg, ds, {"valid_ndcg@10": 0.20}
    ).version

    promote(lake, "tiny-mf", good, "production", reason="first")
    promote(lake, "tiny-mf", worse, "staging")  # no gate on staging
    assert aliases(lake, "tiny-mf") == {"production": good, "staging": worse}

    with pytest.raises(PromotionRefused) as err:
        promote(lake, "tiny-mf", worse, "production")
    msg = str(err.value)
    assert "0.200000" in msg and "0.300000" in msg and "force" in msg
    assert aliases(lake, "tiny-mf")["production"] == good

    entry = promote(lake, "tiny-mf", worse, "production", force=True, reason="hotfix")
    assert entry["forced"] is True and entry["previous"] == good
    model, rec = load_model(lake, "tiny-mf", "production", builder=_Builder())
    assert rec.version == worse

    # a better model passes the gate without force; metrics updated after publishing count
    update_metrics(lake, "tiny-mf", good, {"valid_ndcg@10": 0.31, "test_ndcg@10": 0.29})
    assert get_record(lake, "tiny-mf", good).metrics == {
        "valid_ndcg@10": 0.31,
        "test_ndcg@10": 0.29,
    }
    promote(lake, "tiny-mf", good, "production")

    log = promotions(lake, "tiny-mf")
    assert [(e["alias"], e["version"], e["previous"], e["forced"]) for e in log] == [
        ("production", good, None, False),
        ("staging", worse, None, False),
        ("production", worse, good, True),
        ("production", good, worse, False),
    ]
    assert log[0]["reason"] == "first" and log[2]["reason"] == "hotfix" and log[0]["time"]
    raw = lake.read_bytes("models/tiny-mf/promotions.jsonl").decode().splitlines()
    assert len(raw) == 4 and json.loads(raw[-1])["version"] == good
    with pytest.raises(RegistryError, match="unknown alias"):
        promote(lake, "tiny-mf", good, "canary")


@pytest.mark.parametrize("family", ["popularity", "ease", "mf", "two_tower"])
def test_real_models_round_trip(lake: Lake, family: str) -> None:
    """The default builder (``app.models.build_model``) rebuilds every family from the registry."""
    cfg = _cfg(lake, **{"model.name": family, "model.embed_dim": 8})
    ds = _dataset(lake)
    genres = [list(g) for g in ds.items().column("genres").to_pylist()]
    model = build_model(cfg.model, N_USERS, N_ITEMS, item_genres=genres, seed=7)
    train = sp.random(N_USERS, N_ITEMS, density=0.2, random_state=0, format="csr", dtype=np.float32)
    train.data[:] = 1.0
    if family in ("popularity", "ease"):
        model.fit(train)
    else:  # move the weights away from any seed's initialisation
        state = model.state_dict()
        model.load_state_dict(
            {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
        )
    name = registry_name(cfg.data.name, cfg.model.name)
    rec = register(lake, name, model, cfg, ds, {})
    loaded, _ = load_model(lake, name, rec.version)
    users = np.arange(N_USERS)
    np.testing.assert_array_equal(loaded.score(users, train), model.score(users, train))


# --- S3 lake through moto (fixture in conftest.py) ---
def test_s3_lake_register_load_promote(s3_lake: Lake) -> None:
    assert not s3_lake.is_local
    _roundtrip(s3_lake)
    v = list_versions(s3_lake, "tiny-mf")[0]
    promote(s3_lake, "tiny-mf", v, "production")
    _, rec = load_model(s3_lake, "tiny-mf", "production", builder=_Builder())
    assert rec.version == v and rec.path == f"s3://scalerec-test/lake/models/tiny-mf/{v}"
    update_metrics(s3_lake, "tiny-mf", v, {"test_ndcg@10": 0.5})
    assert get_record(s3_lake, "tiny-mf", "production").metrics["test_ndcg@10"] == 0.5
