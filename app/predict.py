"""Batch prediction stage: top-K recommendations for every user of a model's dataset version.

Run with ``python -m jobs.batch_predict --config jobs/configs/<cfg>.yaml model=<version|alias>``.

Ray Data streams user indices through a pool of actors; each actor loads the registered model and
the users' known items (train + validation, the test protocol's exclusions) once, scores a batch,
keeps the top K with ``app.models.top_k`` and maps internal indices to raw ids. The result is
published by ``app.store.write_predictions`` as ``<lake>/predictions/<model version>/``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from app.models import Recommender, top_k
from app.store import (
    ITEM_ID,
    PREDICTION_SCHEMA,
    USER_ID,
    DatasetVersion,
    Lake,
    aliases,
    get_record,
    load_dataset,
    load_model,
    predictions_rel,
    resolve,
    write_predictions,
)
from app.store import read_predictions as read_predictions  # app.serve's import, until integration
from app.store.predictions import ITEMS, SCORES

log = logging.getLogger(__name__)

DEFAULT_REF = "production"


def resolve_model_ref(lake: Lake, name: str, ref: str | None) -> str:
    """The model version to predict with: ``ref``, or ``production``, else ``latest``.

    Only the default (``ref`` unset) falls back to ``latest`` when no ``production`` alias is set;
    an explicit ref that does not resolve raises ``RegistryError``.
    """
    if ref:
        return resolve(lake, name, ref)
    if DEFAULT_REF in aliases(lake, name):
        return resolve(lake, name, DEFAULT_REF)
    version = resolve(lake, name, "latest")
    log.info("model %s has no %r alias: predicting with latest (%s)", name, DEFAULT_REF, version)
    return version


def predict_table(
    model: Recommender,
    users: np.ndarray,
    history: Any,
    user_ids: np.ndarray,
    item_ids: np.ndarray,
    k: int,
) -> pa.Table:
    """Top-``k`` raw item ids and scores for ``users`` (internal indices), excluding ``history``.

    Args:
        model: The recommender.
        users: Internal user indices.
        history: ``(len(users), n_items)`` CSR of the items to exclude per user.
        user_ids: Raw user id of every user index.
        item_ids: Raw item id of every item index.
        k: List length (shorter when a user has fewer than ``k`` candidates).
    """
    scores = np.asarray(model.score(users, history), dtype=np.float32)
    top = top_k(scores, history, k).indices
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
        self, lake: Lake, model_name: str, model_version: str, dataset: DatasetVersion, k: int
    ) -> None:
        self.model, _ = load_model(lake, model_name, model_version)
        self.history = self.model.history(dataset, "train", "valid")
        self.user_ids = np.asarray(dataset.users().column(USER_ID).to_pylist(), dtype=object)
        self.item_ids = np.asarray(dataset.items().column(ITEM_ID).to_pylist(), dtype=object)
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        users = np.asarray(batch["id"], dtype=np.int64)
        return predict_table(
            self.model, users, self.history[users], self.user_ids, self.item_ids, self.k
        )


def run(
    lake: Lake,
    name: str,
    model_ref: str | None,
    k: int,
    *,
    num_actors: int = 2,
    num_cpus: float = 0.5,
    batch_size: int = 1024,
) -> str:
    """Predict the top K for every user with a registered model; return the published folder.

    The model is ``model_ref`` (a version, prefix or alias; default ``production``, else
    ``latest``) of registry model ``name``, predicted on the dataset version it was trained on.

    Args:
        lake: The lake holding the registry; the predictions are published there.
        name: Registry name of the model.
        model_ref: Version, prefix or alias (None: the default above).
        k: List length.
        num_actors: Actors in the pool (each holds the model and the history).
        num_cpus: Logical CPUs per actor (fractional so it fits a small machine).
        batch_size: Users per batch.

    Returns:
        The full URI of ``<lake>/predictions/<model version>/``.
    """
    import ray.data

    version = resolve_model_ref(lake, name, model_ref)
    ds_info = get_record(lake, name, version).lineage["dataset"]
    dataset = load_dataset(lake, ds_info["name"], ds_info["version"])
    n_users = dataset.n_users
    n_batches = max(1, -(-n_users // batch_size))

    def write(stage: str) -> None:
        log.info("predicting top-%d for %d users with %s/%s", k, n_users, name, version)
        ray.data.range(n_users, override_num_blocks=min(n_batches, 200)).map_batches(
            _PredictBatch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={
                "lake": lake,
                "model_name": name,
                "model_version": version,
                "dataset": dataset,
                "k": k,
            },
            compute=ray.data.ActorPoolStrategy(size=max(1, min(num_actors, n_batches))),
            num_cpus=num_cpus,
        ).write_parquet(stage, filesystem=lake.arrow_fs)

    manifest = {
        "model": name,
        "model_version": version,
        "dataset": {"name": dataset.name, "version": dataset.version},
        "k": int(k),
    }
    write_predictions(lake, version, write, manifest, n_users)
    return lake.full_uri(predictions_rel(version))
