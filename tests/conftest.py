"""Shared fixtures: one local Ray cluster per session and a tiny planted dataset version."""

from __future__ import annotations

import math
import os
import posixpath
import tempfile
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.dataset import (
    GENRES,
    INTERACTION_SCHEMA,
    ITEM_ID,
    ITEM_IDX,
    TIMESTAMP,
    USER_ID,
    USER_IDX,
    WEIGHT,
    DatasetVersion,
    datasets_root,
    load_dataset,
)
from app.lake import MANIFEST, Lake, utc_now

TINY_GROUPS = 4
TINY_USERS_PER_GROUP = 20
TINY_ITEMS_PER_GROUP = 12
TINY_ITEMS_PER_USER = 9


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """A local Ray cluster of 4 logical CPUs in its own temp dir, for the whole session."""
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Never join another engineer's cluster on the same host.
    os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray.init(
        num_cpus=4,
        object_store_memory=512 * 1024**2,
        _temp_dir=temp_dir,
        include_dashboard=True,  # Train V2's cleanup logs errors without it (RAY_NOTES)
        log_to_driver=False,
    )
    yield
    ray.shutdown()


@pytest.fixture
def tmp_lake(tmp_path) -> Lake:
    """An empty local lake in the test's tmp folder."""
    return Lake(str(tmp_path / "lake"))


def planted_interactions(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """Users of group g interact (almost) only with items of group g: a block "checkerboard".

    Within a group item popularity is skewed, so popularity is a fair but beatable baseline.

    Returns:
        users, items, timestamps (one row per interaction), n_users, n_items.
    """
    rng = np.random.default_rng(seed)
    n_users = TINY_GROUPS * TINY_USERS_PER_GROUP
    n_items = TINY_GROUPS * TINY_ITEMS_PER_GROUP
    weights = 1.0 / np.arange(1, TINY_ITEMS_PER_GROUP + 1) ** 0.5
    weights /= weights.sum()
    users, items, stamps = [], [], []
    for u in range(n_users):
        group = u % TINY_GROUPS
        own = rng.choice(TINY_ITEMS_PER_GROUP, TINY_ITEMS_PER_USER, replace=False, p=weights)
        chosen = list(group * TINY_ITEMS_PER_GROUP + own)
        if rng.random() < 0.3:  # a little noise outside the user's group
            other = int(rng.integers(n_items))
            if other not in chosen:
                chosen.insert(int(rng.integers(len(chosen))), other)
        t0 = 1_600_000_000 + int(rng.integers(1000))
        for j, item in enumerate(chosen):
            users.append(u)
            items.append(int(item))
            stamps.append(t0 + 60 * j)
    return np.array(users), np.array(items), np.array(stamps), n_users, n_items


def write_dataset(
    lake: Lake,
    name: str,
    users: np.ndarray,
    items: np.ndarray,
    stamps: np.ndarray,
    n_users: int,
    n_items: int,
    item_genres: list[list[str]],
    version: str = "v-tiny",
) -> DatasetVersion:
    """Write a dataset version in the layout of ``app.dataset`` with the DESIGN.md split."""
    order = np.lexsort((items, stamps, users))
    users, items, stamps = users[order], items[order], stamps[order]
    split = np.empty(len(users), dtype=object)
    for u in np.unique(users):
        rows = np.flatnonzero(users == u)
        n = len(rows)
        n_test = math.ceil(0.2 * n)
        rest = n - n_test
        n_valid = math.ceil(0.1 * rest)
        split[rows[: rest - n_valid]] = "train"
        split[rows[rest - n_valid : rest]] = "valid"
        split[rows[rest:]] = "test"
    rel = posixpath.join(datasets_root(name), version)
    counts = {}
    with lake.staging(rel) as stage:
        for s in ("train", "valid", "test"):
            m = split == s
            counts[s] = int(m.sum())
            table = pa.table(
                {
                    USER_IDX: users[m].astype(np.int32),
                    ITEM_IDX: items[m].astype(np.int32),
                    TIMESTAMP: stamps[m].astype(np.int64),
                    WEIGHT: np.ones(int(m.sum()), dtype=np.float32),
                },
                schema=INTERACTION_SCHEMA,
            )
            os.makedirs(posixpath.join(stage, s), exist_ok=True)
            pq.write_table(table, posixpath.join(stage, s, "part-0.parquet"))
        pq.write_table(
            pa.table(
                {
                    USER_IDX: np.arange(n_users, dtype=np.int32),
                    USER_ID: [f"u{u}" for u in range(n_users)],
                }
            ),
            posixpath.join(stage, "users.parquet"),
        )
        pq.write_table(
            pa.table(
                {
                    ITEM_IDX: np.arange(n_items, dtype=np.int32),
                    ITEM_ID: [f"i{i}" for i in range(n_items)],
                    GENRES: pa.array(item_genres, type=pa.list_(pa.string())),
                }
            ),
            posixpath.join(stage, "items.parquet"),
        )
        manifest = {
            "name": name,
            "version": version,
            "created_at": utc_now(),
            "n_users": n_users,
            "n_items": n_items,
            "n_interactions": int(len(users)),
            "splits": counts,
            "source": {"kind": "synthetic-planted"},
        }
        lake.fs.pipe_file(posixpath.join(stage, MANIFEST), _json_bytes(manifest))
    return load_dataset(lake, name, version)


def _json_bytes(obj: object) -> bytes:
    import json

    return json.dumps(obj, indent=2, sort_keys=True).encode()


@pytest.fixture
def tiny_dataset(tmp_lake: Lake) -> DatasetVersion:
    """A planted 80-user x 48-item dataset version (4 groups; genre ``g<k>`` = group k)."""
    users, items, stamps, n_users, n_items = planted_interactions(seed=0)
    genres = [[f"g{i // TINY_ITEMS_PER_GROUP}"] for i in range(n_items)]
    return write_dataset(tmp_lake, "tiny", users, items, stamps, n_users, n_items, genres)
