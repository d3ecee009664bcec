"""Batch prediction: every user, raw ids, protocol exclusions, atomic publish, job output."""

from __future__ import annotations

import posixpath

import numpy as np
import pytest

from app import predict
from app.config import AppConfig, DataArgs, ModelArgs
from app.models import EASE
from app.store import (
    MANIFEST,
    LakeError,
    RegistryError,
    load_predictions,
    promote,
    register,
    registry_name,
)

NAME = registry_name("tiny", "ease")


def _cfg(lake_uri: str) -> AppConfig:
    return AppConfig(
        lake=lake_uri,
        data=DataArgs(name="tiny", source="synthetic"),
        model=ModelArgs(name="ease", ease_lambda=10.0),
    )


@pytest.fixture
def registered(tiny_dataset, tmp_lake):
    cfg = _cfg(tmp_lake.uri)
    history = tiny_dataset.csr("train", "valid")
    model = EASE(tiny_dataset.n_users, tiny_dataset.n_items, ease_lambda=10.0).fit(history)
    record = register(tmp_lake, NAME, model, cfg, tiny_dataset, {})
    return cfg, model, record, history


def test_batch_predict_job_matches_in_process(
    ray_cluster, registered, tiny_dataset, tmp_lake, tmp_path, capsys
):
    from jobs import batch_predict

    cfg, model, record, history = registered
    config = tmp_path / "cfg.yaml"
    config.write_text(
        f"lake: {tmp_lake.uri}\n"
        "data: {name: tiny, source: synthetic}\n"
        "model: {name: ease, ease_lambda: 10.0}\n"
        "cluster: {progress_bars: false}\n"
    )
    path = batch_predict.main(["--config", str(config)])
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1] == path
    # The job's logging.basicConfig(force=True) logs to (captured) stderr.
    assert "no 'production' alias" in out.err
    assert path == tmp_lake.full_uri("predictions", record.version)
    manifest = tmp_lake.read_json(posixpath.join("predictions", record.version, MANIFEST))
    assert manifest["model_version"] == record.version
    assert manifest["dataset"]["version"] == tiny_dataset.version
    assert manifest["k"] == 10 and manifest["users"] == tiny_dataset.n_users
    assert not [n for n in tmp_lake.listdir("predictions") if n.startswith(".")]

    preds = load_predictions(tmp_lake, "latest")
    assert len(preds) == tiny_dataset.n_users
    item_idx = {f"i{i}": i for i in range(tiny_dataset.n_items)}
    users = np.arange(tiny_dataset.n_users)
    expected = predict.predict_table(
        model,
        users,
        history,
        np.array([f"u{u}" for u in users], dtype=object),
        np.array([f"i{i}" for i in range(tiny_dataset.n_items)], dtype=object),
        10,
    )
    cols = [expected.column(c).to_pylist() for c in ("user_id", "items", "scores")]
    direct = {u: (i, s) for u, i, s in zip(*cols, strict=True)}
    for u in users:
        items, scores = preds[f"u{u}"]
        assert (items, scores) == tuple(direct[f"u{u}"])
        assert len(items) == 10 and all(s.startswith("i") for s in items)
        seen = set(history[u].indices)
        assert not seen & {item_idx[i] for i in items}
        assert all(a >= b for a, b in zip(scores, scores[1:], strict=False))
    # Same model, same k: already published, returned without recomputing (no Ray work).
    assert predict.run(tmp_lake, NAME, None, k=10) == path
    with pytest.raises(LakeError, match="immutable"):
        predict.run(tmp_lake, NAME, None, k=5)


def test_model_ref_resolution(registered, tmp_lake) -> None:
    _, _, record, _ = registered
    assert predict.resolve_model_ref(tmp_lake, NAME, None) == record.version
    promote(tmp_lake, NAME, record.version, "production", force=True)
    assert predict.resolve_model_ref(tmp_lake, NAME, "production") == record.version
    assert predict.resolve_model_ref(tmp_lake, NAME, None) == record.version


def test_explicit_missing_alias_is_an_error(registered, tmp_lake) -> None:
    with pytest.raises(RegistryError, match="production"):
        predict.resolve_model_ref(tmp_lake, NAME, "production")
