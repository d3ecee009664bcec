"""Shared fixtures: one local Ray cluster per session, a tiny planted dataset version, and a
serving lake (a planted dataset where user group g likes item group g, plus two MF versions:
``production`` and ``staging``)."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from app.config import AppConfig, ModelArgs
from app.models import build_model
from app.store import (
    ITEM_IDX,
    SPLITS,
    TIMESTAMP,
    USER_IDX,
    DatasetVersion,
    Lake,
    load_dataset,
    promote,
    register,
    write_dataset,
)

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
        include_dashboard=True,  # Train V2's cleanup logs errors without it
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


def planted_splits(
    users: np.ndarray, items: np.ndarray, stamps: np.ndarray
) -> dict[str, dict[str, np.ndarray]]:
    """docs/design.md's split: each user's last 20 % is test, the last 10 % of the rest valid."""
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
    return {
        s: {USER_IDX: users[split == s], ITEM_IDX: items[split == s], TIMESTAMP: stamps[split == s]}
        for s in SPLITS
    }


@pytest.fixture
def tiny_dataset(tmp_lake: Lake) -> DatasetVersion:
    """A planted 80-user x 48-item dataset version (4 groups; genre ``g<k>`` = group k)."""
    users, items, stamps, n_users, n_items = planted_interactions(seed=0)
    return write_dataset(
        tmp_lake,
        "tiny",
        "v-tiny",
        planted_splits(users, items, stamps),
        user_ids=[f"u{u}" for u in range(n_users)],
        item_ids=[f"i{i}" for i in range(n_items)],
        genres=[[f"g{i // TINY_ITEMS_PER_GROUP}"] for i in range(n_items)],
        source={"kind": "synthetic-planted"},
    )


N_GROUPS, USERS_PER_GROUP, ITEMS_PER_GROUP, PER_USER = 4, 20, 12, 8
N_USERS, N_ITEMS = N_GROUPS * USERS_PER_GROUP, N_GROUPS * ITEMS_PER_GROUP
NAME = "tiny-mf"


@dataclass
class ServeLake:
    """The lake and what it holds."""

    lake: Lake
    versions: list[str]
    """Model versions: ``production`` first, ``staging`` second."""
    name: str = NAME
    """Registry name of the model."""
    n_users: int = N_USERS
    n_items: int = N_ITEMS
    items_per_group: int = ITEMS_PER_GROUP

    def seen(self, user: int) -> set[str]:
        """External ids of the items user ``u<user>`` interacted with (all splits)."""
        h = load_dataset(self.lake, "tiny").csr("train", "valid", "test")
        return {f"i{i}" for i in h[user].indices}


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


@pytest.fixture(scope="module")
def serve_lake(tmp_path_factory: pytest.TempPathFactory) -> ServeLake:
    """Dataset ``tiny`` (version ``v-tiny``, genre ``g<k>`` = item group k) and ``tiny-mf``."""
    lake = Lake(str(tmp_path_factory.mktemp("serve") / "lake"))
    rng = np.random.default_rng(0)
    users, items = [], []
    for u in range(N_USERS):
        g = u % N_GROUPS
        chosen = g * ITEMS_PER_GROUP + rng.choice(ITEMS_PER_GROUP, PER_USER, replace=False)
        users += [u] * PER_USER
        items += chosen.tolist()
    train = {
        USER_IDX: np.array(users, np.int32),
        ITEM_IDX: np.array(items, np.int32),
        TIMESTAMP: np.arange(len(users), dtype=np.int64),
    }
    genres = [[f"g{i // ITEMS_PER_GROUP}"] for i in range(N_ITEMS)]
    ds = write_dataset(
        lake, "tiny", "v-tiny", {"train": train}, _ids("u", N_USERS), _ids("i", N_ITEMS), genres
    )
    cfg = AppConfig.model_validate({"lake": lake.uri, "model": {"name": "mf", "embed_dim": 8}})
    versions = []
    for seed in (0, 1):
        model = build_model(ModelArgs(name="mf", embed_dim=8), N_USERS, N_ITEMS, seed=seed)
        rec = register(lake, NAME, model, cfg, ds, {"valid_ndcg@10": 0.1, "seed": seed})
        versions.append(rec.version)
    promote(lake, NAME, versions[0], "production")
    promote(lake, NAME, versions[1], "staging")
    return ServeLake(lake, versions)
