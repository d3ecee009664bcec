"""Published batch predictions: ``<lake>/predictions/<model version>/``.

- ``part-*.parquet``: ``user_id`` (string), ``items`` (list<string>, best first), ``scores``
  (list<float32>)
- ``manifest.json``: model name and version, dataset version, k, users, created_at (written last)

A folder is immutable: predicting again with the same k returns it, with another k is an error.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from app.store.datasets import USER_ID
from app.store.lake import Lake, LakeError, as_lake

log = logging.getLogger(__name__)

PREDICTIONS = "predictions"
ITEMS = "items"
SCORES = "scores"

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


def write_predictions(
    lake: Lake,
    model_version: str,
    write: Callable[[str], None],
    manifest: Mapping[str, Any],
    n_users: int,
) -> dict[str, Any]:
    """Publish a model version's predictions with ``Lake.publish`` (or return the existing ones).

    Args:
        lake: The lake.
        model_version: The model version predicted with (the folder name).
        write: Writes Parquet files of ``PREDICTION_SCHEMA`` into the scheme-less staging folder
            it is given (e.g. ``ray.data.Dataset.write_parquet(path, filesystem=lake.arrow_fs)``).
        manifest: Manifest entries; must hold ``k``. ``users`` and ``columns`` are added.
        n_users: Rows ``write`` must produce (one per user).

    Returns:
        The published manifest.

    Raises:
        LakeError: ``write`` produced another number of rows (nothing is published), or the
            folder already holds predictions of another ``k``.
    """
    rel = predictions_rel(model_version)
    k = int(manifest["k"])

    def write_and_count(stage: str) -> dict[str, Any]:
        write(stage)
        written = _parquet(lake, stage).count_rows()
        if written != n_users:
            raise LakeError(f"batch prediction wrote {written} rows for {n_users} users")
        return {"users": int(written), "columns": [USER_ID, ITEMS, SCORES]}

    already = lake.is_published(rel)
    published = lake.publish(rel, write_and_count, manifest)
    if int(published.get("k", -1)) != k:
        raise LakeError(
            f"{lake.full_uri(rel)} holds k={published.get('k')} predictions (immutable); "
            f"remove it to predict with k={k}"
        )
    if already:
        log.info("predictions of %s (k=%d) already published: %s", model_version, k, rel)
    return published


def read_predictions(lake: Lake | str, version: str = "latest") -> pa.Table:
    """The predictions table of a published model version (``latest`` or an id or prefix)."""
    lake = as_lake(lake)
    resolved = lake.resolve_version(PREDICTIONS, version)
    table = _parquet(lake, lake.path(predictions_rel(resolved))).to_table()
    return table.select([USER_ID, ITEMS, SCORES]).cast(PREDICTION_SCHEMA)


def load_predictions(
    lake: Lake | str, version: str = "latest"
) -> dict[str, tuple[list[str], list[float]]]:
    """Published predictions of a model version: ``{user_id: (items best first, scores)}``.

    ``version`` is a model version id (or unique prefix) or ``latest`` (the newest predictions).
    """
    table = read_predictions(lake, version)
    return {
        u: (items, scores)
        for u, items, scores in zip(
            table.column(USER_ID).to_pylist(),
            table.column(ITEMS).to_pylist(),
            table.column(SCORES).to_pylist(),
            strict=True,
        )
    }


def _parquet(lake: Lake, path: str) -> pads.Dataset:
    """The Parquet files directly under a scheme-less folder (the manifest is not one)."""
    lake.fs.invalidate_cache(path)
    files = sorted(f for f in lake.fs.ls(path, detail=False) if str(f).endswith(".parquet"))
    return pads.dataset(files, filesystem=lake.arrow_fs, format="parquet", schema=PREDICTION_SCHEMA)
