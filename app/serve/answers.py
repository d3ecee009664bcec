"""Answers of the serving stage: from the replica's cache, else scored and then cached.

A cache key holds everything an answer depends on (``rec_key``), so a new model version, a new
event of the user or other request filters never hit a stale entry. The cache can be filled
ahead of traffic from published batch predictions (``warm_answers``). The cache is local to one
ingress replica: an LRU whose entries also expire after ``ttl_s`` (popularity and catalogue
changes between versions).
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import pyarrow as pa

from app.serve.http import ItemScore, RecommendResponse, SimilarResponse
from app.store import MANIFEST, Lake, predictions_rel, read_predictions

if TYPE_CHECKING:
    from app.serve.args import ServeAppArgs
    from app.serve.metrics import ServeMetrics
    from app.serve.retriever import Candidates
    from app.serve.scoring import Scoring
    from app.serve.store import Catalogue, EventLog, ServedVersion

log = logging.getLogger(__name__)

V = TypeVar("V")


class TTLCache(Generic[V]):
    """A bounded LRU cache whose entries expire ``ttl_s`` seconds after they were stored."""

    def __init__(
        self, max_size: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_size = int(max_size)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._data: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        """False when ``max_size`` is 0 (every lookup misses, nothing is stored)."""
        return self.max_size > 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Hashable) -> V | None:
        """The fresh value under ``key`` (and mark it recently used), or None."""
        if not self.enabled:
            self.misses += 1
            return None
        entry = self._data.get(key)
        if entry is None or entry[0] < self._clock():
            if entry is not None:
                del self._data[key]
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return entry[1]

    def put(self, key: Hashable, value: V) -> None:
        """Store ``value``; evicts the least recently used entries beyond ``max_size``."""
        if not self.enabled:
            return
        self._data[key] = (self._clock() + self.ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_size:
            self._data.popitem(last=False)

    def clear(self) -> None:
        """Drop every entry."""
        self._data.clear()


def rec_key(
    version: str,
    user_id: str | None,
    history_version: int,
    k: int,
    context: list[str] | tuple[str, ...] = (),
    exclude: list[str] | tuple[str, ...] = (),
    include_seen: bool = False,
) -> tuple[Any, ...]:
    """Cache key of a recommendation: everything the answer depends on."""
    return (
        "rec",
        version,
        user_id,
        history_version,
        k,
        tuple(context),
        tuple(exclude),
        include_seen,
    )


def similar_key(version: str, item_id: str, k: int) -> tuple[Any, ...]:
    """Cache key of a list of similar items."""
    return ("sim", version, item_id, k)


def response_items(cat: Catalogue, cand: Candidates) -> list[ItemScore]:
    """The answer's items: external ids and scores of the candidates, best first."""
    # Built from the catalogue and the scorer's arrays: nothing to validate.
    ids = cat.item_ids
    return [
        ItemScore.model_construct(item_id=ids[i], score=s)
        for i, s in zip(cand.items.tolist(), cand.scores.tolist(), strict=True)
    ]


def warm_answers(
    predictions: pa.Table, cat: Catalogue, version: str, k: int, limit: int
) -> list[RecommendResponse]:
    """Cacheable answers from published batch predictions (``app.predict``) of ``version``.

    Batch prediction excludes train + validation items (the test protocol); serving excludes
    everything the user interacted with, so each list is filtered again by the catalogue's
    history and kept only when ``k`` items remain. At most ``limit`` answers.
    """
    out: list[RecommendResponse] = []
    users = predictions.column("user_id").to_pylist()
    items = predictions.column("items").to_pylist()
    scores = predictions.column("scores").to_pylist()
    for user_id, its, scs in zip(users, items, scores, strict=True):
        if len(out) >= limit:
            break
        u = cat.user_index.get(user_id, -1)
        if u < 0:
            continue
        seen = set(cat.known_items(u).tolist())
        keep = [
            ItemScore(item_id=i, score=float(sc))
            for i, sc in zip(its, scs, strict=True)
            if cat.item_index.get(i, -1) >= 0 and cat.item_index[i] not in seen
        ][:k]
        if len(keep) == k:
            out.append(
                RecommendResponse(
                    user_id=user_id,
                    items=keep,
                    model_version=version,
                    cached=False,
                    strategy="personal",
                    history_version=0,
                )
            )
    return out


class Answers:
    """The recommend and similar answers of one ingress replica, cached.

    Args:
        args: The application's arguments (cache size and lifetime, ``default_k``, warm-up).
        scoring: Where cache misses are scored.
        events: The live event log (history versions and live items of users).
        metrics: The replica's metrics (cache hits and misses).
    """

    def __init__(
        self, args: ServeAppArgs, scoring: Scoring, events: EventLog, metrics: ServeMetrics
    ) -> None:
        self.args = args
        self.scoring = scoring
        self.events = events
        self.metrics = metrics
        self.cache: TTLCache[Any] = TTLCache(args.cache_size, args.cache_ttl_s)

    async def recommend(
        self,
        state: ServedVersion,
        user_id: str | None,
        k: int,
        context: list[str],
        exclude: list[str],
        include_seen: bool,
    ) -> RecommendResponse:
        """Top ``k`` items for a user or an anonymous context (inputs already validated)."""
        hv = self.events.version(user_id) if user_id else 0
        key = rec_key(state.version, user_id, hv, k, context, exclude, include_seen)
        hit = self.cache.get(key)
        self.metrics.count("cache", result="hit" if hit is not None else "miss")
        if hit is not None:
            return hit.model_copy(update={"cached": True})
        live = self.events.items(user_id) if user_id else []
        strategy, cand = await self.scoring.recommend(
            state, user_id, live, context, exclude, include_seen, k
        )
        answer = RecommendResponse.model_construct(
            user_id=user_id,
            items=response_items(state.catalogue, cand),
            model_version=cand.version,
            cached=False,
            strategy=strategy,
            history_version=hv,
        )
        self.cache.put(key, answer)
        return answer

    async def similar(self, state: ServedVersion, item_id: str, k: int) -> SimilarResponse:
        """Items most similar to a known item."""
        key = similar_key(state.version, item_id, k)
        hit = self.cache.get(key)
        if hit is not None:
            return hit.model_copy(update={"cached": True})
        idx = state.catalogue.item_index[item_id]
        cand = await self.scoring.similar(state.catalogue, state.version, idx, k)
        answer = SimilarResponse(
            item_id=item_id,
            items=response_items(state.catalogue, cand),
            model_version=cand.version,
            cached=False,
        )
        self.cache.put(key, answer)
        return answer

    def warm(self, lake: Lake, state: ServedVersion) -> int:
        """Fill the cache from ``state``'s published batch predictions (``args.warm_cache``).

        Returns:
            How many answers were cached.
        """
        if not (self.args.warm_cache and self.cache.enabled):
            return 0
        if self.args.ranker_active:
            log.info("warm_cache skipped: batch predictions do not apply the ranker's rules")
            return 0
        if not lake.exists(posixpath.join(predictions_rel(state.version), MANIFEST)):
            log.info("warm_cache: no batch predictions for %s", state.version)
            return 0
        table = read_predictions(lake, state.version)
        k = self.args.default_k
        answers = warm_answers(table, state.catalogue, state.version, k, self.cache.max_size)
        for answer in answers:
            if self.events.version(str(answer.user_id)) == 0:
                self.cache.put(rec_key(state.version, answer.user_id, 0, k), answer)
        log.info("warm_cache: %d answers of %s cached", len(answers), state.version)
        return len(answers)
