"""Reading published dataset versions: splits, id maps, item features, interaction matrices.

Layout of ``<lake>/datasets/<name>/<version>/`` (written by ``app.data.run``):

- ``train/``, ``valid/``, ``test/``: Parquet with ``user_idx`` (int32), ``item_idx`` (int32),
  ``timestamp`` (int64, Unix seconds) and ``weight`` (float32)
- ``users.parquet``: ``user_idx``, ``user_id`` (raw id as a string)
- ``items.parquet``: ``item_idx``, ``item_id`` (raw id as a string), ``genres`` (list of strings)
- ``manifest.json``: counts, schema, splits, source, config; written last (publishes the version)
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import scipy.sparse as sp

from app.lake import MANIFEST, Lake

if TYPE_CHECKING:
    import ray.data

USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
TIMESTAMP = "timestamp"
WEIGHT = "weight"
USER_ID = "user_id"
ITEM_ID = "item_id"
GENRES = "genres"
SPLITS = ("train", "valid", "test")

INTERACTION_SCHEMA = pa.schema(
    [
        (USER_IDX, pa.int32()),
        (ITEM_IDX, pa.int32()),
        (TIMESTAMP, pa.int64()),
        (WEIGHT, pa.float32()),
    ]
)


def datasets_root(name: str) -> str:
    """Lake-relative folder holding every version of dataset ``name``."""
    return posixpath.join("datasets", name)


@dataclass
class DatasetVersion:
    """One published, immutable dataset version."""

    lake: Lake
    name: str
    version: str
    manifest: dict[str, Any]
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def rel(self) -> str:
        """Lake-relative folder of this version."""
        return posixpath.join(datasets_root(self.name), self.version)

    @property
    def n_users(self) -> int:
        """Number of indexed users."""
        return int(self.manifest["n_users"])

    @property
    def n_items(self) -> int:
        """Number of indexed items."""
        return int(self.manifest["n_items"])

    def split_path(self, split: str) -> str:
        """Scheme-less path of a split's Parquet folder."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.lake.path(self.rel, split)

    def read_ds(self, *splits: str) -> ray.data.Dataset:
        """Ray Dataset over one or more splits (streamed, never collected in the driver)."""
        import ray.data

        paths = [self.split_path(s) for s in splits]
        return ray.data.read_parquet(
            paths, filesystem=self.lake.arrow_fs, schema=INTERACTION_SCHEMA
        )

    def read_table(self, *splits: str) -> pa.Table:
        """Load splits into one Arrow table (fine for catalogues that fit in memory)."""
        tables = [
            pads.dataset(self.split_path(s), filesystem=self.lake.arrow_fs, format="parquet")
            .to_table()
            .cast(INTERACTION_SCHEMA)
            for s in splits
        ]
        return pa.concat_tables(tables)

    def users(self) -> pa.Table:
        """The user id map (``user_idx``, ``user_id``)."""
        return self._read_small("users.parquet")

    def items(self) -> pa.Table:
        """The item id map with side features (``item_idx``, ``item_id``, ``genres``)."""
        return self._read_small("items.parquet")

    def _read_small(self, fname: str) -> pa.Table:
        if fname not in self._cache:
            path = self.lake.path(self.rel, fname)
            self._cache[fname] = pq.read_table(path, filesystem=self.lake.arrow_fs)
        table: pa.Table = self._cache[fname]
        return table

    def csr(self, *splits: str) -> sp.csr_matrix:
        """Binary user × item matrix of the given splits."""
        key = "csr:" + ",".join(splits)
        if key not in self._cache:
            t = self.read_table(*splits)
            u = t.column(USER_IDX).to_numpy()
            i = t.column(ITEM_IDX).to_numpy()
            m = sp.csr_matrix(
                (np.ones(len(u), dtype=np.float32), (u, i)), shape=(self.n_users, self.n_items)
            )
            m.sum_duplicates()
            m.data[:] = 1.0
            self._cache[key] = m
        matrix: sp.csr_matrix = self._cache[key]
        return matrix


def load_dataset(lake: Lake | str, name: str, version: str = "latest") -> DatasetVersion:
    """Open a published dataset version (``latest``, a version id, or a unique prefix)."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    root = datasets_root(name)
    resolved = lake.resolve_version(root, version)
    manifest = lake.read_json(posixpath.join(root, resolved, MANIFEST))
    return DatasetVersion(lake=lake, name=name, version=resolved, manifest=manifest)


def list_datasets(lake: Lake | str, name: str) -> list[str]:
    """Published versions of a dataset, oldest first."""
    lake = Lake(lake) if isinstance(lake, str) else lake
    return lake.versions(datasets_root(name))
