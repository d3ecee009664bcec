"""Batch prediction stage: top-K recommendations for every user of a model's dataset version.

Run with ``python -m jobs.batch_predict --config jobs/configs/<cfg>.yaml model=<version|alias>``.

Ray Data streams user indices through a pool of actors; each actor loads the registered model and
the users' known items (train + validation, the test protocol's exclusions) once, scores a batch,
keeps the top K with ``app.evaluate.top_k`` and maps internal indices to raw ids. The result is
published atomically as ``<lake>/predictions/<model version>/``:

- ``part-*.parquet``: ``user_id`` (string), ``items`` (list<string>, best first), ``scores``
  (list<float32>)
- ``manifest.json``: model name and version, dataset version, k, users, created_at (written last)
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from app.config import AppConfig
from app.lake import MANIFEST, Lake, LakeError, utc_now

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
USER_ID = "user_id"
ITEMS = "items"
SCORES = "scores"
DEFAULT_REF = "production"

PREDICTION_SCHEMA = pa.schema(
    [
        (USER_ID, pa.string()),
        (ITEMS, pa.list_(pa.string())),
        (SCORES, pa.list_(pa.float32())),
    ]
)


def predictions_rel(version: str) -> str:
    """Lake-relative folder of a model version's predictions."""
    return posixpath.join(PREDICTIONS, version)


def resolve_model_ref(lake: Lake, name: str, ref: str | None) -> str:
    """The model version to predict with: ``ref``, or ``production``, else ``latest``.

    Only the default (``ref`` unset) falls back to ``latest`` when no ``production`` alias is set;
    an explicit ref that does not resolve raises ``RegistryError``.
    """
    from app.registry import aliases, resolve

    if ref:
        return resolve(lake, name, ref)
    if DEFAULT_REF in aliases(lake, name):
        return resolve(lake, name, DEFAULT_REF)
    version = resolve(lake, name, "latest")
    log.info("model %s has no %r alias: predicting with latest (%s)", name, DEFAULT_REF, version)
    return version


def predict_table(
    model: Any,
    users: np.ndarray,
    history: Any,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    k: int,
) -> pa.Table:
    """Top-``k`` raw item ids and scores for ``users`` (internal indices), excluding ``history``.

    Args:
        model: A ``Recommender``.
        users: Internal user indices.
        history: ``(len(users), n_items)`` CSR of the items to exclude per user.
        user_ids: Raw user id of every user index.
        item_ids: Raw item id of every item index.
        k: List length (shorter when a user has fewer than ``k`` candidates).
    """
    from app.evaluate import top_k

    scores = np.asarray(model.score(users, history), dtype=np.float32)
    top = top_k(scores, history, k)
    valid = top >= 0
    lengths = valid.sum(axis=1)
    flat_idx = top[valid]
    flat_scores = scores[np.repeat(np.arange(len(users)), lengths), flat_idx]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    return pa.table(
        {
            USER_ID: pa.array(user_ids[users], type=pa.string()),
            ITEMS: pa.ListArray.from_arrays(offsets, pa.array(item_ids[flat_idx], pa.string())),
            SCORES: pa.ListArray.from_arrays(offsets, pa.array(flat_scores, pa.float32())),
        },
        schema=PREDICTION_SCHEMA,
    )


class _PredictBatch:
    """Ray Data actor: loads the model and the history once, predicts a batch of users."""

    def __init__(
        self, lake_uri: str, model_name: str, model_version: str, dataset: list[str], k: int
    ) -> None:
        from app.dataset import ITEM_ID, USER_ID, load_dataset
        from app.registry import load_model

        lake = Lake(lake_uri)
        self.model, _ = load_model(lake, model_name, model_version)
        ds = load_dataset(lake, dataset[0], dataset[1])
        self.history = self.model.history(ds, "train", "valid")
        self.user_ids = np.asarray(ds.users().column(USER_ID).to_pylist(), dtype=object)
        self.item_ids = np.asarray(ds.items().column(ITEM_ID).to_pylist(), dtype=object)
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        users = np.asarray(batch["id"], dtype=np.int64)
        return predict_table(
            self.model, users, self.history[users], self.user_ids, self.item_ids, self.k
        )


def run(
    cfg: AppConfig,
    *,
    k: int | None = None,
    num_actors: int = 2,
    num_cpus: float = 0.5,
    batch_size: int = 1024,
) -> str:
    """Predict the top K for every user with a registered model; return the published folder.

    The model is ``cfg.model.version`` (a version, prefix or alias; default ``production``, else
    ``latest``) of ``registry_name(cfg)``, predicted on the dataset version it was trained on.

    Args:
        cfg: The app config (``lake``, ``data.name``, ``model``).
        k: List length; default ``cfg.serve.default_k``.
        num_actors: Actors in the pool (each holds the model and the history).
        num_cpus: Logical CPUs per actor (fractional so it fits a small machine).
        batch_size: Users per batch.

    Returns:
        The full URI of ``<lake>/predictions/<model version>/``.
    """
    import ray.data

    from app.dataset import load_dataset
    from app.registry import get_record, registry_name

    k = int(k or cfg.serve.default_k)
    lake = Lake(cfg.lake)
    name = registry_name(cfg)
    version = resolve_model_ref(lake, name, cfg.model.version)
    record = get_record(lake, name, version)
    ds_info = record.lineage["dataset"]
    dataset = load_dataset(lake, ds_info["name"], ds_info["version"])
    rel = predictions_rel(version)
    if lake.exists(posixpath.join(rel, MANIFEST)):
        existing = lake.read_json(posixpath.join(rel, MANIFEST))
        if int(existing.get("k", -1)) == k:
            log.info("predictions of %s (k=%d) already published: %s", version, k, rel)
            return lake.full_uri(rel)
        raise LakeError(
            f"{lake.full_uri(rel)} holds k={existing.get('k')} predictions (immutable); "
            f"remove it to predict with k={k}"
        )
    n_users = dataset.n_users
    n_batches = max(1, -(-n_users // batch_size))
    log.info("predicting top-%d for %d users with %s/%s", k, n_users, name, version)
    with lake.staging(rel) as stage:
        ds = ray.data.range(n_users, override_num_blocks=min(n_batches, 200)).map_batches(
            _PredictBatch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "lake_uri": cfg.lake,
                "model_name": name,
                "model_version": version,
                "dataset": [dataset.name, dataset.version],
                "k": k,
            },
            compute=ray.data.ActorPoolStrategy(size=max(1, min(num_actors, n_batches))),
            num_cpus=num_cpus,
        )
        ds.write_parquet(stage, filesystem=lake.arrow_fs)
        written = _parquet(lake, stage).count_rows()
        if written != n_users:
            raise LakeError(f"batch prediction wrote {written} rows for {n_users} users")
        manifest = {
            "model": name,
            "model_version": version,
            "dataset": {"name": dataset.name, "version": dataset.version},
            "k": k,
            "users": int(written),
            "columns": [USER_ID, ITEMS, SCORES],
            "created_at": utc_now(),
        }
        # Written last: on S3 this single PUT publishes the folder.
        lake.fs.pipe_file(posixpath.join(stage, MANIFEST), _json_bytes(manifest))
    return lake.full_uri(rel)


def _json_bytes(obj: Any) -> bytes:
    import json

    return json.dumps(obj, indent=2, sort_keys=True).encode()


def load_predictions(
    lake: Lake | str, version: str = "latest"
) -> dict[str, tuple[list[str], list[float]]]:
    """Published predictions of a model version: ``{user_id: (items best first, scores)}``.

    ``version`` is a model version id (or unique prefix) or ``latest`` (the newest predictions).
    """
    lake = Lake(lake) if isinstance(lake, str) else lake
    resolved = lake.resolve_version(PREDICTIONS, version)
    table = read_predictions(lake, resolved)
    return {
        u: (items, scores)
        for u, items, scores in zip(
            table.column(USER_ID).to_pylist(),
            table.column(ITEMS).to_pylist(),
            table.column(SCORES).to_pylist(),
            strict=True,
        )
    }


def read_predictions(lake: Lake, version: str) -> pa.Table:
    """The predictions table of a published model version (``latest`` or an id)."""
    resolved = lake.resolve_version(PREDICTIONS, version)
    table = _parquet(lake, lake.path(predictions_rel(resolved))).to_table()
    return table.select([USER_ID, ITEMS, SCORES]).cast(PREDICTION_SCHEMA)


def _parquet(lake: Lake, path: str) -> pads.Dataset:
    """The Parquet files directly under a scheme-less folder (the manifest is not one)."""
    lake.fs.invalidate_cache(path)
    files = sorted(f for f in lake.fs.ls(path, detail=False) if str(f).endswith(".parquet"))
    return pads.dataset(files, filesystem=lake.arrow_fs, format="parquet", schema=PREDICTION_SCHEMA)
