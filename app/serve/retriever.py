"""Retriever deployment of the serving stage: exact top-K over every item, batched.

Models with embeddings (MF, two-tower) score a batch of users with one ``U @ Vᵀ`` matrix-matrix
product (``@serve.batch`` turns many matrix-vector products into one); models without them
(popularity, EASE) score through ``Recommender.score``. Every list is ranked by
``app.models.top_k`` (equal scores: lower item index first). The replica keeps the two most recent
model versions in memory and loads a version the first time a query names it, so a reload never
fails a request (the first queries of a new version wait for its load instead).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from ray import serve

from app.config import ServeArgs
from app.models import (
    EmbeddingTable,
    QuantizedRecommender,
    Recommender,
    item_matrix,
    quantize,
    top_k,
    top_k_dot,
)
from app.serve.ann import AnnIndex
from app.store import Lake, ModelRecord, as_lake, load_model

log = logging.getLogger(__name__)

KEEP_VERSIONS = 2
"""Model versions a replica keeps loaded (the served one and the previous one)."""

DEFAULT_ANN_MIN_ITEMS: int | None = None
"""Catalogue size from which retrieval is approximate (HNSW); None: always exact."""


@dataclass(frozen=True)
class ScoringOptions:
    """How a process scores a registry version (one object from the Serve args down).

    Attributes:
        quantize: ``none`` scores with the fp32 item table (``top_k_dot``); ``fp16`` / ``int8``
            serve the compressed variant (``app.models.quantize``): its table's ``search``.
        ann_min_items: fp32 item tables with at least this many rows are searched with a faiss
            HNSW index (``app.serve.ann``) instead of exactly; None: always exact.
        ann_ef_search: HNSW search effort per query (recall against speed).
    """

    quantize: str = "none"
    ann_min_items: int | None = DEFAULT_ANN_MIN_ITEMS
    ann_ef_search: int = 256

    @classmethod
    def of(cls, args: ServeArgs) -> ScoringOptions:
        """The scoring options of a Serve application's arguments."""
        return cls(args.quantize, args.ann_min_items, args.ann_ef_search)


@dataclass
class Query:
    """One user to score: everything the retriever needs, in internal indices."""

    version: str
    user_idx: int
    """Index in the model's user table, or -1 for users unknown to the model."""
    history: np.ndarray
    """Known items in time order, oldest first (stored, then live events): the model's input."""
    recent: np.ndarray
    """Items from live events not in the stored history (MF folds them into the user vector)."""
    exclude: np.ndarray
    """Items never returned (seen items, request exclusions)."""
    k: int


@dataclass
class Candidates:
    """Top items of one query, best first."""

    version: str
    items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))


def _csr(rows: list[np.ndarray], n_items: int) -> sp.csr_matrix:
    lens = np.array([len(r) for r in rows], dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(lens)])
    indices = np.concatenate(rows).astype(np.int64) if len(rows) else np.zeros(0, np.int64)
    data = np.ones(len(indices), dtype=np.float32)
    return sp.csr_matrix((data, indices, indptr), shape=(len(rows), n_items))


class LoadedModel:
    """A registry version ready to score: the model plus its item vectors.

    Args:
        model: The fitted model from the registry.
        record: Its registry record.
        options: Embedding variant and approximate search (``ScoringOptions``).
    """

    def __init__(
        self, model: Recommender, record: ModelRecord, options: ScoringOptions | None = None
    ) -> None:
        opts = options or ScoringOptions()
        emb = model.item_embeddings()
        if opts.quantize != "none" and emb is not None:
            model = quantize(model, opts.quantize)
        self.model = model
        self.record = record
        self.version = record.version
        self.family: str = model.family
        self.table: EmbeddingTable | None = None
        if isinstance(model, QuantizedRecommender):
            self.family, self.table = model.base_family, model.table
        # A compressed table scores by itself: no fp32 copy of the items next to it.
        emb = None if self.table is not None else model.item_embeddings()
        self.items: np.ndarray | None = None if emb is None else item_matrix(emb)
        self.embedded = self.table is not None or self.items is not None
        """Scored as user vector x item vectors (else by the model's own ``score``)."""
        self._norms: np.ndarray | None = None
        self.ann: AnnIndex | None = None
        if (
            self.items is not None
            and self.table is None
            and opts.ann_min_items is not None
            and len(self.items) >= opts.ann_min_items
        ):
            self.ann = AnnIndex(self.items, ef_search=opts.ann_ef_search)
            log.info("%s: HNSW index over %d items", self.version, len(self.items))

    def score(self, queries: list[Query]) -> list[Candidates]:
        """Top-k of every query (one matrix product for the whole batch)."""
        m = self.model
        users = np.array([q.user_idx for q in queries], dtype=np.int64)
        history = m.sequence_history([q.history for q in queries])  # time-ordered rows
        k = max(q.k for q in queries)
        if not self.embedded:
            scores = np.asarray(m.score(users, history), dtype=np.float32)
            idx, vals = top_k(scores, [q.exclude for q in queries], k)
        else:
            u = np.array(m.user_embeddings(users, history), dtype=np.float32)
            if self.family == "mf":
                u = self._fold_in_recent(u, users, queries)
            exclude = [q.exclude for q in queries]
            if self.table is not None:
                idx, vals = self.table.search(u, k, _csr(exclude, m.n_items))
            elif self.ann is not None:
                assert self.items is not None
                idx, vals, short = self.ann.search(u, exclude, k)
                if short.any():  # histories too long for the fetched neighbours: exact
                    rows = np.flatnonzero(short)
                    exact = top_k_dot(u[rows], self.items, [exclude[r] for r in rows], k)
                    idx[rows], vals[rows] = exact
            else:
                assert self.items is not None
                idx, vals = top_k_dot(u, self.items, exclude, k)
        out = []
        for row, q in enumerate(queries):
            keep = idx[row, : q.k] >= 0
            out.append(Candidates(self.version, idx[row, : q.k][keep], vals[row, : q.k][keep]))
        return out

    def _fold_in_recent(self, u: np.ndarray, users: np.ndarray, queries: list[Query]) -> np.ndarray:
        # MF keeps a trained vector per known user, which ignores live events: blend in the
        # fold-in (mean item vector) of the recent items, weighted by their share of the history.
        rows = [
            r
            for r, q in enumerate(queries)
            if len(q.recent) and 0 <= q.user_idx < self.model.n_users
        ]
        if not rows:
            return u
        recent = _csr([queries[r].recent for r in rows], self.model.n_items)
        folded = self.model.user_embeddings(np.full(len(rows), -1, dtype=np.int64), recent)
        assert folded is not None
        for j, r in enumerate(rows):
            n_new, n_all = len(queries[r].recent), max(len(queries[r].history), 1)
            w = n_new / n_all
            u[r] = (1.0 - w) * u[r] + w * folded[j]
        return u

    def similar(self, item_idx: int, k: int) -> Candidates:
        """Items closest to ``item_idx``: cosine over item vectors, else the model's scores."""
        if not self.embedded:
            hist = _csr([np.array([item_idx])], self.model.n_items)
            scores = np.asarray(self.model.score(np.array([-1]), hist), dtype=np.float32)
        else:
            scores = self._cosine(item_idx)[None, :]
        idx, vals = top_k(scores, [np.array([item_idx])], k)
        keep = idx[0] >= 0
        return Candidates(self.version, idx[0][keep], vals[0][keep])

    def _cosine(self, item_idx: int) -> np.ndarray:
        """Cosine of every item vector with ``item_idx``'s (item norms computed once)."""
        if self.items is not None:
            v = self.items[item_idx]
            dots = self.items @ v
        else:
            assert self.table is not None
            v = self.table.rows(np.array([item_idx]))[0]
            dots = self.table.scores(v[None, :])[0]
        if self._norms is None:
            vecs = self.items if self.items is not None else self.table.dequantize()
            self._norms = np.maximum(np.linalg.norm(vecs, axis=1), 1e-12).astype(np.float32)
        return (dots / (self._norms * self._norms[item_idx])).astype(np.float32)


class ModelVersions:
    """The registry versions one process scores with: loaded on first use, the last two kept.

    Shared by the ``Retriever`` deployment and an ingress that scores in its own replica
    (``colocate_scoring``), so both load, keep and switch versions the same way.

    Args:
        lake: Lake holding the registry.
        name: Registry name.
        options: How to score (see ``ScoringOptions``).
    """

    def __init__(self, lake: Lake, name: str, options: ScoringOptions | None = None) -> None:
        self.lake = lake
        self.name = name
        self.options = options or ScoringOptions()
        self.models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    def load_sync(self, version: str) -> LoadedModel:
        """Load ``version`` now (blocking); evict all but the ``KEEP_VERSIONS`` newest."""
        model, record = load_model(self.lake, self.name, version)
        loaded = LoadedModel(model, record, self.options)
        self.models[record.version] = loaded
        while len(self.models) > KEEP_VERSIONS:
            self.models.popitem(last=False)
        log.info("loaded %s %s for scoring", self.name, record.version)
        return loaded

    async def get(self, version: str) -> LoadedModel:
        """``version``, loaded in a thread the first time it is asked for (once per version)."""
        if version in self.models:
            return self.models[version]
        lock = self._locks.setdefault(version, asyncio.Lock())
        async with lock:
            if version not in self.models:
                await asyncio.to_thread(self.load_sync, version)
        return self.models[version]

    async def score(self, queries: list[Query], offload: bool = False) -> list[Candidates]:
        """Candidates of every query, one scoring pass per model version named.

        Args:
            queries: Queries, possibly of different versions (during a switch).
            offload: Score in a worker thread, so the caller's event loop keeps accepting
                requests meanwhile (BLAS and torch's ``topk`` release the GIL).
        """
        results: dict[int, Candidates] = {}
        for version in dict.fromkeys(q.version for q in queries):
            loaded = await self.get(version)
            pos = [i for i, q in enumerate(queries) if q.version == version]
            batch = [queries[i] for i in pos]
            cands = await asyncio.to_thread(loaded.score, batch) if offload else loaded.score(batch)
            for i, cand in zip(pos, cands, strict=True):
                results[i] = cand
        return [results[i] for i in range(len(queries))]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=64)
class Retriever:
    """Exact top-K retrieval over the whole catalogue for a batch of users."""

    def __init__(
        self,
        lake: Lake | str,
        name: str,
        version: str,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        options: ScoringOptions | None = None,
    ) -> None:
        self.versions = ModelVersions(as_lake(lake), name, options)
        self.versions.load_sync(version)
        self.retrieve.set_max_batch_size(max_batch_size)
        self.retrieve.set_batch_wait_timeout_s(batch_wait_timeout_s)
        from app.serve.metrics import ServeMetrics

        self.metrics = ServeMetrics("retriever")

    async def warm(self, version: str) -> str:
        """Load ``version`` ahead of the switch to it; returns the loaded version id."""
        return (await self.versions.get(version)).version

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def retrieve(self, calls: list[list[Query]]) -> list[list[Candidates]]:
        """Score every query of every call in one pass per model version."""
        flat = [q for call in calls for q in call]
        self.metrics.batch_size.observe(len(flat))
        results = await self.versions.score(flat)
        out, start = [], 0
        for call in calls:
            out.append(results[start : start + len(call)])
            start += len(call)
        return out

    async def similar(self, version: str, item_idx: int, k: int) -> Candidates:
        """Items most similar to one item."""
        model = await self.versions.get(version)
        # a full pass over the catalogue: off the event loop, so batched retrieval goes on
        return await asyncio.to_thread(model.similar, item_idx, k)
