"""A lake for serving tests: a planted dataset (user group g likes item group g) + two MF versions.

``production`` and ``staging`` name the two versions; no Ray, no server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from app.config import AppConfig, ModelArgs
from app.models import build_model
from app.store import (
    ITEM_IDX,
    TIMESTAMP,
    USER_IDX,
    Lake,
    load_dataset,
    promote,
    register,
    write_dataset,
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
