"""Published dataset versions: splits, id maps, item features, interaction matrices.

Layout of ``<lake>/datasets/<name>/<version>/`` (written by the ingest pipeline):

- ``train/``, ``valid/``, ``test/``: Parquet with ``user_idx`` (int32), ``item_idx`` (int32),
  ``timestamp`` (int64, Unix seconds) and ``weight`` (float32)
- ``users.parquet``: ``user_idx``, ``user_id`` (raw id as a string)
- ``items.parquet``: ``item_idx``, ``item_id`` (raw id as a string), ``genres`` (list of strings)
- ``manifest.json``: counts, schema, splits, source, config; written last (publishes the version);
  ``events_cursor`` when live events were ingested into it (``DatasetVersion.events_cursor``);
  ``split_files``: the exact files of each split, relative to the version folder. Readers read
  only those (``DatasetVersion.split_paths``): on S3 a crashed ingest attempt may have left other
  files in the folder. A manifest without the list (older versions, ``write_dataset``) means
  every file of the split's folder.

``write_dataset`` publishes a version in this layout from in-memory splits (synthetic data for
tests and benchmarks).
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import scipy.sparse as sp

from app.store.lake import MANIFEST, Lake, as_lake

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
    """One published, immutable dataset version.

    Tables read from it are cached on the instance; a pickled copy carries only the lake, name,
    version and manifest (so it is cheap to send to Ray tasks) and reads again where it lands.
    """

    lake: Lake
    name: str
    version: str
    manifest: dict[str, Any]
    _cache: dict[str, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __reduce__(self) -> tuple[type[DatasetVersion], tuple[Any, ...]]:
        return (DatasetVersion, (self.lake, self.name, self.version, self.manifest))

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

    @property
    def events_cursor(self) -> dict[str, Any] | None:
        """Where the live events this version holds end (``data.source: events``).

        None when it holds none (ingested from a raw source): a reader of the event log, the
        next events ingest or a replica serving this version, starts at the log's beginning.
        """
        cursor = self.manifest.get("events_cursor")
        return dict(cursor) if cursor else None

    def split_path(self, split: str) -> str:
        """Scheme-less path of a split's Parquet folder."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.lake.path(self.rel, split)

    def split_paths(self, split: str) -> list[str]:
        """Scheme-less paths of a split's files as the manifest lists them (else its folder)."""
        listed = self.manifest.get("split_files")
        if listed is None:
            return [self.split_path(split)]
        self.split_path(split)  # checks the name
        return [self.lake.path(self.rel, f) for f in listed.get(split, [])]

    def arrow_dataset(self, split: str) -> pads.Dataset:
        """A split as a pyarrow dataset: its listed files, or every file of its folder."""
        fs = self.lake.arrow_fs
        if "split_files" not in self.manifest:
            return pads.dataset(self.split_path(split), filesystem=fs, format="parquet")
        # Listed files are the pipeline's own, all of the interaction schema.
        paths = self.split_paths(split)
        return pads.dataset(paths, filesystem=fs, format="parquet", schema=INTERACTION_SCHEMA)

    def read_ds(self, *splits: str) -> ray.data.Dataset:
        """Ray Dataset over one or more splits (streamed, never collected in the driver)."""
        import ray.data

        paths = [p for s in splits for p in self.split_paths(s)]
        return ray.data.read_parquet(
            paths, filesystem=self.lake.arrow_fs, schema=INTERACTION_SCHEMA
        )

    def read_table(self, *splits: str) -> pa.Table:
        """Load splits into one Arrow table (fine for catalogues that fit in memory)."""
        tables = [self.arrow_dataset(s).to_table().cast(INTERACTION_SCHEMA) for s in splits]
        return pa.concat_tables(tables)

    def users(self) -> pa.Table:
        """The user id map (``user_idx``, ``user_id``)."""
        return self._read_small("users.parquet")

    def items(self) -> pa.Table:
        """The item id map with side features (``item_idx``, ``item_id``, ``genres``)."""
        return self._read_small("items.parquet")

    def item_genres(self) -> list[list[str]] | None:
        """Genres of every item, indexed by ``item_idx``; None when the items carry no genres."""
        items = self.items()
        if GENRES not in items.column_names:
            return None
        by_idx: list[list[str]] = [[] for _ in range(self.n_items)]
        for idx, genres in zip(
            items.column(ITEM_IDX).to_pylist(), items.column(GENRES).to_pylist(), strict=True
        ):
            by_idx[int(idx)] = list(genres or [])
        return by_idx

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
    lake = as_lake(lake)
    root = datasets_root(name)
    resolved = lake.resolve_version(root, version)
    manifest = lake.read_json(posixpath.join(root, resolved, MANIFEST))
    return DatasetVersion(lake=lake, name=name, version=resolved, manifest=manifest)


def events_cursor(lake: Lake | str, name: str, version: str = "latest") -> dict[str, Any] | None:
    """The ``events_cursor`` of a dataset version (None: it holds no live events)."""
    return load_dataset(lake, name, version).events_cursor


def list_datasets(lake: Lake | str, name: str) -> list[str]:
    """Published versions of a dataset, oldest first."""
    return as_lake(lake).versions(datasets_root(name))


Interactions: TypeAlias = pa.Table | Mapping[str, Any] | sp.spmatrix | sp.sparray
"""One split's interactions: a table or column mapping with ``user_idx`` and ``item_idx`` (and
optionally ``timestamp``, default 0, and ``weight``, default 1), or a user × item sparse matrix
(its values are the weights)."""


def _interaction_table(rows: Interactions, n_users: int, n_items: int, split: str) -> pa.Table:
    """``rows`` as a table of ``INTERACTION_SCHEMA``; indices checked against the id maps."""
    if isinstance(rows, sp.spmatrix | sp.sparray):
        coo = rows.tocoo()
        rows = {USER_IDX: coo.row, ITEM_IDX: coo.col, WEIGHT: coo.data}
    elif isinstance(rows, pa.Table):
        rows = {col: rows.column(col) for col in rows.column_names}
    columns = {name: rows[name] for name in INTERACTION_SCHEMA.names if name in rows}
    n = len(columns[USER_IDX])
    columns.setdefault(TIMESTAMP, np.zeros(n, np.int64))
    columns.setdefault(WEIGHT, np.ones(n, np.float32))
    table = pa.table(columns).select(INTERACTION_SCHEMA.names).cast(INTERACTION_SCHEMA)
    for col, bound in ((USER_IDX, n_users), (ITEM_IDX, n_items)):
        idx = table.column(col).to_numpy()
        if len(idx) and (idx.min() < 0 or idx.max() >= bound):
            raise ValueError(f"split {split!r}: {col} outside [0, {bound})")
    return table


def write_dataset(
    lake: Lake | str,
    name: str,
    version: str,
    splits: Mapping[str, Interactions],
    user_ids: Sequence[str],
    item_ids: Sequence[str],
    genres: Sequence[Sequence[str]] | None = None,
    **manifest_extra: Any,
) -> DatasetVersion:
    """Publish a dataset version from in-memory splits (synthetic data for tests and benchmarks).

    Writes the layout the ingest pipeline produces and publishes it with ``Lake.publish``.

    Args:
        lake: The lake (or its URI) to write to.
        name: Dataset name.
        version: Version id (a folder under ``datasets/<name>/``).
        splits: Interactions per split name (``train``, ``valid``, ``test``); a missing split is
            written empty.
        user_ids: Raw id of each ``user_idx``, in index order (their number is ``n_users``).
        item_ids: Raw id of each ``item_idx``, in index order (their number is ``n_items``).
        genres: Genres of each ``item_idx`` (default: none for every item).
        **manifest_extra: Extra manifest keys, e.g. ``source={"kind": "synthetic"}``.

    Returns:
        The published version, as ``load_dataset`` opens it.
    """
    lake = as_lake(lake)
    unknown = set(splits) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
    n_users, n_items = len(user_ids), len(item_ids)
    if genres is not None and len(genres) != n_items:
        raise ValueError(f"genres: {len(genres)} entries for {n_items} items")
    tables = {
        s: _interaction_table(splits[s], n_users, n_items, s)
        if s in splits
        else INTERACTION_SCHEMA.empty_table()
        for s in SPLITS
    }
    users = pa.table({USER_IDX: np.arange(n_users, dtype=np.int32), USER_ID: list(user_ids)})
    items = pa.table(
        {
            ITEM_IDX: np.arange(n_items, dtype=np.int32),
            ITEM_ID: list(item_ids),
            GENRES: pa.array(
                [list(g) for g in genres] if genres is not None else [[]] * n_items,
                type=pa.list_(pa.string()),
            ),
        }
    )
    counts = {s: t.num_rows for s, t in tables.items()}
    manifest = {
        "name": name,
        "version": version,
        "n_users": n_users,
        "n_items": n_items,
        "n_interactions": sum(counts.values()),
        "splits": counts,
        **manifest_extra,
    }

    def write(out: str) -> None:
        arrow_fs = lake.arrow_fs
        for split, table in tables.items():
            lake.fs.makedirs(posixpath.join(out, split), exist_ok=True)
            pq.write_table(table, posixpath.join(out, split, "part-0.parquet"), filesystem=arrow_fs)
        pq.write_table(users, posixpath.join(out, "users.parquet"), filesystem=arrow_fs)
        pq.write_table(items, posixpath.join(out, "items.parquet"), filesystem=arrow_fs)

    lake.publish(posixpath.join(datasets_root(name), version), write, manifest)
    return load_dataset(lake, name, version)
