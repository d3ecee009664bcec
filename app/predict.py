"""Batch prediction stage: top-K recommendations for every user of a model's dataset version.

Run with ``python -m jobs.batch_predict --config jobs/configs/<cfg>.yaml model=<version|alias>``.

The driver builds one ``Ranker`` (the model's user and item vectors, or the model itself; the
users' known items, train + validation as the test protocol excludes them, as CSR; the raw id
arrays) and puts it in Ray's object store once. A pool of Ray Data actors, one thread per CPU it
holds, maps it without copying and ranks batches of user indices chunk by chunk: one matrix
product into a reused buffer, the chunk's known items masked from the CSR, ``app.models.top_k``,
raw ids taken from Arrow arrays. ``write_parquet`` streams the lists into the staging folder that
``app.store.write_predictions`` publishes as ``<lake>/predictions/<model version>/``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from app.models import Recommender, TopK, item_matrix, top_k, top_k_dot
from app.store import (
    ITEM_ID,
    ITEM_IDX,
    PREDICTION_SCHEMA,
    USER_ID,
    USER_IDX,
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

log = logging.getLogger(__name__)

DEFAULT_REF = "production"
USERS = "user"
"""Column of user indices in the blocks the actors receive."""
CHUNK_SCORES = 1 << 24
"""Scores per matrix product (64 MiB of float32): the buffer one chunk of users fills."""
VECTOR_ROWS = 1 << 16
"""Users per step when the driver computes every user's vector (bounds its temporaries)."""
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


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


def string_array(ids: Any) -> pa.Array:
    """Raw ids as one Arrow string array, so ``take`` maps indices to ids without Python objects."""
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    arr = ids if isinstance(ids, pa.Array) else pa.array(ids)
    return arr if arr.type == pa.string() else arr.cast(pa.string())


def id_array(table: pa.Table, idx: str, name: str) -> pa.Array:
    """Column ``name`` of an id map (``users()``, ``items()``), in the order of column ``idx``."""
    order = table.column(idx).to_numpy()
    ids = string_array(table.column(name))
    if not np.array_equal(order, np.arange(len(order))):
        ids = ids.take(pa.array(np.argsort(order, kind="stable")))
    return ids


def user_vectors(model: Recommender, history: sp.csr_matrix) -> np.ndarray | None:
    """Every user's ``model.user_embeddings`` (row ``u`` of ``history`` is user ``u``), or None."""
    n = history.shape[0]
    out: np.ndarray | None = None
    for start in range(0, n, VECTOR_ROWS):
        stop = min(n, start + VECTOR_ROWS)
        u = model.user_embeddings(np.arange(start, stop), history[start:stop])
        if u is None:
            return None
        if out is None:
            out = np.empty((n, u.shape[1]), dtype=np.float32)
        out[start:stop] = u
    return out


def rows_of(history: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
    """``history``'s rows of ``users``: a slice when they are consecutive, as batches are."""
    if len(users) and bool(np.all(np.diff(users) == 1)):
        return history[int(users[0]) : int(users[-1]) + 1]
    return history[users]


def predictions_table(
    user_ids: pa.Array, item_ids: pa.Array, users: np.ndarray, top: TopK
) -> pa.Table:
    """``PREDICTION_SCHEMA`` rows of ``users`` (internal indices) from their top-k lists.

    Empty slots (index -1) are dropped: a user with fewer candidates gets a shorter list.
    """
    valid = top.indices >= 0
    offsets = pa.array(np.concatenate([[0], np.cumsum(valid.sum(axis=1))]).astype(np.int32))
    return pa.Table.from_arrays(
        [
            user_ids.take(pa.array(np.asarray(users, dtype=np.int64))),
            pa.ListArray.from_arrays(offsets, item_ids.take(pa.array(top.indices[valid]))),
            pa.ListArray.from_arrays(offsets, pa.array(top.scores[valid].astype(np.float32))),
        ],
        schema=PREDICTION_SCHEMA,
    )


class Ranker:
    """Top-``k`` lists for any batch of a dataset's users, from state built once.

    A model with vectors (``item_embeddings`` and ``user_embeddings``) is kept as every user's
    vector and ``item_matrix(items)``, ranked with ``top_k_dot``; any other model is kept and
    ranked from ``score``. All state is numpy, scipy or Arrow arrays (plus that model), so a
    copy taken from Ray's object store maps the arrays read-only instead of copying them.

    Args:
        model: The recommender.
        history: ``(n_users, n_items)`` CSR of every user's known items: the model scores from
            it and its entries are never recommended. None: ``rank`` takes each batch's rows and
            user vectors are computed per chunk.
        user_ids: Raw id of every user index.
        item_ids: Raw id of every item index.
        k: List length (shorter when a user has fewer than ``k`` candidates).
        chunk_rows: Users per matrix product (default ``default_chunk_rows``).
    """

    def __init__(
        self,
        model: Recommender,
        history: sp.spmatrix | sp.sparray | None,
        user_ids: Sequence[str] | pa.Array | np.ndarray,
        item_ids: Sequence[str] | pa.Array | np.ndarray,
        k: int,
        *,
        chunk_rows: int | None = None,
    ) -> None:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        self.k = int(k)
        self.history = None if history is None else sp.csr_matrix(history)
        self.user_ids = string_array(user_ids)
        self.item_ids = string_array(item_ids)
        self.model: Recommender | None = model
        self.queries: np.ndarray | None = None
        vectors = model.item_embeddings()
        self.items = None if vectors is None else item_matrix(vectors)
        if self.items is not None and self.history is not None:
            self.queries = user_vectors(model, self.history)
            if self.queries is None:
                self.items = None  # no user vectors: rank from score
            else:
                self.model = None  # the vectors are all that ranking needs
        width = model.n_items if self.items is None else len(self.items)
        self.chunk_rows = int(chunk_rows or default_chunk_rows(width))
        self._scratch: np.ndarray | None = None

    @classmethod
    def load(
        cls,
        lake: Lake,
        name: str,
        version: str,
        dataset: DatasetVersion,
        k: int,
        *,
        chunk_rows: int | None = None,
    ) -> Ranker:
        """The ranker of registry model ``name`` at ``version`` on its dataset version."""
        model, _ = load_model(lake, name, version)
        return cls(
            model,
            model.history(dataset, "train", "valid"),
            id_array(dataset.users(), USER_IDX, USER_ID),
            id_array(dataset.items(), ITEM_IDX, ITEM_ID),
            k,
            chunk_rows=chunk_rows,
        )

    def __getstate__(self) -> dict[str, Any]:
        # The buffer is per process: each actor pages in its own on first use.
        state = self.__dict__.copy()
        state["_scratch"] = None
        return state

    def predict(self, users: np.ndarray) -> pa.Table:
        """Top-``k`` raw item ids and scores of ``users`` (internal indices), one row each."""
        if self.history is None:
            raise ValueError("a Ranker built without history ranks with rank(users, history)")
        users = np.asarray(users, dtype=np.int64)
        return self.table(users, self.rank(users, rows_of(self.history, users)))

    def rank(self, users: np.ndarray, history: sp.csr_matrix) -> TopK:
        """``TopK`` of ``users``, whose known items are the rows of ``history``, in order."""
        users = np.asarray(users, dtype=np.int64)
        parts = [
            self._rank_chunk(users[s : s + self.chunk_rows], history[s : s + self.chunk_rows])
            for s in range(0, len(users), self.chunk_rows)
        ]
        if not parts:
            return TopK(np.zeros((0, self.k), np.int64), np.zeros((0, self.k), np.float32))
        if len(parts) == 1:
            return parts[0]
        return TopK(
            np.concatenate([p.indices for p in parts]), np.concatenate([p.scores for p in parts])
        )

    def table(self, users: np.ndarray, top: TopK) -> pa.Table:
        """``predictions_table`` with this ranker's raw ids."""
        return predictions_table(self.user_ids, self.item_ids, users, top)

    def _rank_chunk(self, users: np.ndarray, history: sp.csr_matrix) -> TopK:
        if self.items is not None:
            if self.queries is not None:
                q: np.ndarray | None = self.queries[users]
            else:
                assert self.model is not None
                q = self.model.user_embeddings(users, history)
            if q is not None:
                return top_k_dot(q, self.items, history, self.k, out=self._buffer(len(q)))
        assert self.model is not None
        scores = np.asarray(self.model.score(users, history), dtype=np.float32)
        return top_k(scores, history, self.k)  # copies: score may return the model's own arrays

    def _buffer(self, rows: int) -> np.ndarray:
        assert self.items is not None
        if self._scratch is None or len(self._scratch) < rows:
            shape = (max(rows, self.chunk_rows), len(self.items))
            self._scratch = np.empty(shape, dtype=self.items.dtype)
        return self._scratch


def default_chunk_rows(n_items: int) -> int:
    """Users per matrix product: ``CHUNK_SCORES`` scores, at least one user."""
    return max(1, CHUNK_SCORES // max(1, n_items))


def predict_table(
    model: Recommender,
    users: np.ndarray,
    history: Any,
    user_ids: Sequence[str] | pa.Array | np.ndarray,
    item_ids: Sequence[str] | pa.Array | np.ndarray,
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
    ranker = Ranker(model, None, user_ids, item_ids, k)
    users = np.asarray(users, dtype=np.int64)
    return ranker.table(users, ranker.rank(users, sp.csr_matrix(history)))


class PredictBatch:
    """Ray Data actor: maps the driver's ``Ranker`` once, predicts batches of user indices."""

    def __init__(self, ranker: list[Any], threads: int) -> None:
        import ray
        import torch

        # As many threads as CPUs held: the pool then fills the cores without oversubscribing.
        torch.set_num_threads(threads)
        ref = ranker[0]  # in a list, so no layer resolves the reference on the way here
        self.ranker: Ranker = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        """The batch's users' lists (``PREDICTION_SCHEMA``)."""
        return self.ranker.predict(batch[USERS])


def pool_size(num_cpus: float, n_batches: int, num_actors: int | None = None) -> int:
    """Actors in the pool: ``num_actors``, else as many as the free CPUs hold; at most a batch each.

    Call with Ray initialised.
    """
    if num_actors is None:
        import ray

        free = float(ray.available_resources().get("CPU", num_cpus))
        num_actors = int(free // num_cpus) if num_cpus > 0 else 1
    return max(1, min(num_actors, n_batches))


def run(
    lake: Lake,
    name: str,
    model_ref: str | None,
    k: int,
    *,
    num_actors: int | None = None,
    num_cpus: float = 1.0,
    batch_size: int = 4096,
    chunk_rows: int | None = None,
) -> str:
    """Predict the top K for every user with a registered model; return the published folder.

    The model is ``model_ref`` (a version, prefix or alias; default ``production``, else
    ``latest``) of registry model ``name``, predicted on the dataset version it was trained on.

    Args:
        lake: The lake holding the registry; the predictions are published there.
        name: Registry name of the model.
        model_ref: Version, prefix or alias (None: the default above).
        k: List length.
        num_actors: Actors in the pool (default: as many as the free CPUs hold).
        num_cpus: Logical CPUs per actor; each runs ``floor(num_cpus)`` threads (at least 1).
        batch_size: Users per batch (one block, one Parquet file).
        chunk_rows: Users per matrix product (default ``default_chunk_rows``).

    Returns:
        The full URI of ``<lake>/predictions/<model version>/``.
    """
    import ray
    import ray.data

    version = resolve_model_ref(lake, name, model_ref)
    ds_info = get_record(lake, name, version).lineage["dataset"]
    dataset = load_dataset(lake, ds_info["name"], ds_info["version"])
    n_users = dataset.n_users
    threads = max(1, math.floor(num_cpus))

    def write(stage: str) -> None:
        starts = range(0, n_users, batch_size)
        if not starts:
            return
        actors = pool_size(num_cpus, len(starts), num_actors)
        log.info(
            "predicting top-%d for %d users with %s/%s: %d actors x %g CPUs, batches of %d",
            k,
            n_users,
            name,
            version,
            actors,
            num_cpus,
            batch_size,
        )
        ranker = ray.put(Ranker.load(lake, name, version, dataset, k, chunk_rows=chunk_rows))
        blocks = [pa.table({USERS: np.arange(s, min(s + batch_size, n_users))}) for s in starts]
        ray.data.from_arrow(blocks).map_batches(
            PredictBatch,
            batch_size=batch_size,
            batch_format="numpy",
            fn_constructor_kwargs={"ranker": [ranker], "threads": threads},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=num_cpus,
            # In the worker's environment from its start: BLAS reads these once, when loaded.
            runtime_env={"env_vars": dict.fromkeys(THREAD_ENV, str(threads))},
        ).write_parquet(
            stage,
            filesystem=lake.arrow_fs,
            # Writing is light next to ranking: one zero-CPU task at a time streams the files
            # while the actors hold every CPU.
            ray_remote_args={"num_cpus": 0},
            concurrency=1,
        )

    manifest = {
        "model": name,
        "model_version": version,
        "dataset": {"name": dataset.name, "version": dataset.version},
        "k": int(k),
    }
    write_predictions(lake, version, write, manifest, n_users)
    return lake.full_uri(predictions_rel(version))
