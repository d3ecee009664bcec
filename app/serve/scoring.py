"""Scoring for the ingress: which items to score for a request, and where they are scored.

A request's history is its user's stored interactions plus their live events plus the request's
context items; everything in the history is excluded unless ``include_seen``, and the request's
``exclude`` items always are. An empty history gets the most popular items; any other is scored
by the served model, in this replica (``colocate_scoring``) or on the ``Retriever`` (and
``Ranker``) deployments, one call per batch of concurrent requests (``Coalescer``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import numpy as np

from app.serve.coalesce import Coalescer
from app.serve.ranker import RankRules, rerank
from app.serve.retriever import Candidates, ModelVersions, Query, ScoringOptions

if TYPE_CHECKING:
    from ray.serve.handle import DeploymentHandle

    from app.serve.args import ServeAppArgs
    from app.serve.metrics import ServeMetrics
    from app.serve.store import Catalogue, ServedVersion
    from app.store import Lake


def new_in_order(items: np.ndarray, known: np.ndarray) -> np.ndarray:
    """``items`` not in ``known`` (sorted), each once at its first place, order kept."""
    _, first = np.unique(items, return_index=True)
    items = items[np.sort(first)]
    return items[~np.isin(items, known)]


def popular(cat: Catalogue, version: str, excluded: np.ndarray, k: int) -> Candidates:
    """The ``k`` most popular items of the catalogue that are not ``excluded``."""
    head = cat.popular[: k + len(excluded)]
    head = head[~np.isin(head, excluded)][:k]
    return Candidates(version, head, cat.popularity[head])


class Scoring:
    """Scores the ingress's requests: here or on the Retriever and Ranker replicas.

    Args:
        lake: Lake holding the registry.
        args: The application's arguments.
        version: Model version to load at once when scoring here.
        metrics: The replica's metrics (batch sizes when scoring here).
        retriever: Handle of the Retriever deployment; None scores in this replica.
        ranker: Handle of the Ranker deployment (with ``retriever``).
    """

    def __init__(
        self,
        lake: Lake,
        args: ServeAppArgs,
        version: str,
        metrics: ServeMetrics,
        retriever: DeploymentHandle | None = None,
        ranker: DeploymentHandle | None = None,
    ) -> None:
        self.args = args
        self.metrics = metrics
        self.retriever = retriever
        self.ranker = ranker
        # Scoring in this replica (``colocate_scoring``) replaces both handles.
        self.local: ModelVersions | None = None
        self.rules: RankRules | None = None
        self._blocked: dict[tuple[str, str], set[int]] = {}  # blocked item indices, by catalogue
        if retriever is None:
            self.local = ModelVersions(lake, args.name, ScoringOptions.of(args))
            self.local.load_sync(version)
            self.rules = RankRules(lake, args.name, args.max_per_genre, list(args.blocked_items))
        self.batched: Coalescer[tuple[Query, int], Candidates] = Coalescer(
            self._retrieve, args.max_batch_size, args.max_in_flight, args.batch_wait_timeout_s
        )

    async def warm(self, version: str, calls: int = 1) -> None:
        """Load ``version`` for scoring: here, or on retriever replicas (``calls`` tries)."""
        if self.local is not None:
            await self.local.get(version)
        else:
            assert self.retriever is not None
            await asyncio.gather(*(self.retriever.warm.remote(version) for _ in range(calls)))

    async def recommend(
        self,
        state: ServedVersion,
        user_id: str | None,
        live_items: list[str],
        context: list[str],
        exclude: list[str],
        include_seen: bool,
        k: int,
    ) -> tuple[str, Candidates]:
        """The strategy (personal, context or popularity) and the top ``k`` of one request.

        Args:
            state: The served version.
            user_id: External user id; None for an anonymous request.
            live_items: External ids of the user's logged events, oldest first.
            context: Item ids the request adds to the history.
            exclude: Item ids never to return.
            include_seen: Whether items of the history may be returned.
            k: List length.
        """
        cat = state.catalogue
        user_idx = cat.user_index.get(user_id, -1) if user_id else -1
        stored = cat.known_items(user_idx)
        # The history in time order (stored sequence, then live events, then the context):
        # recency-weighted models weigh its latest items most.
        sequence = cat.sequence(user_idx)
        if not live_items and not context and not exclude:  # the common case: no set algebra
            recent, history = stored[:0], sequence
            excluded = stored[:0] if include_seen else stored
        else:
            recent = new_in_order(cat.to_index(live_items), stored)
            later = new_in_order(cat.to_index(context), np.union1d(stored, recent))
            history = np.concatenate([sequence, recent, later])
            excluded = np.union1d(cat.to_index(exclude), stored[:0] if include_seen else history)
        if not len(history):
            cand = popular(cat, state.version, excluded, self._n_fetch(cat, k))
            return "popularity", self.apply_rules(cat, cand, k)
        query = Query(state.version, user_idx, history, recent, excluded, self._n_fetch(cat, k))
        cand = await self.batched((query, k))
        return ("personal" if user_idx >= 0 else "context"), cand

    async def similar(self, cat: Catalogue, version: str, item_idx: int, k: int) -> Candidates:
        """Items most similar to ``item_idx`` under ``version``, under the ranker's rules."""
        n = self._n_fetch(cat, k)
        if self.local is not None:
            model = await self.local.get(version)
            cand = await asyncio.to_thread(model.similar, item_idx, n)  # a catalogue pass
        else:
            assert self.retriever is not None
            cand = await self.retriever.similar.remote(version, item_idx, n)
        return self.apply_rules(cat, cand, k)

    def _n_fetch(self, cat: Catalogue, k: int) -> int:
        # room for what the ranker's rules remove or defer
        if not self.args.ranker_active:
            return k
        return min(cat.n_items, 3 * k + len(self.args.blocked_items))

    def apply_rules(self, cat: Catalogue, cand: Candidates, k: int) -> Candidates:
        """The ranker's rules (blocked items, genre cap) on a list the ingress made itself.

        Personal answers go through the Ranker (or ``RankRules`` here); popularity and
        similar-item answers come from this replica's catalogue, and the same rules apply.
        """
        if not self.args.ranker_active:
            return cand
        key = (cat.dataset, cat.version)
        if key not in self._blocked:  # once per catalogue, not per request
            self._blocked = {key: set(cat.to_index(list(self.args.blocked_items)).tolist())}
        return rerank(cand, k, cat.genres, self._blocked[key], self.args.max_per_genre)

    async def _retrieve(self, calls: list[tuple[Query, int]]) -> list[Candidates]:
        # One scoring pass per batch of HTTP requests (see ``Coalescer``): the proxy→ingress
        # hop is per request, but ingress→retriever(→ranker) is per batch.
        if self.local is not None:
            assert self.rules is not None
            self.metrics.batch_size.observe(len(calls))
            cands = await self.local.score([q for q, _ in calls], offload=True)
            if self.args.ranker_active:
                cands = self.rules.rank(cands, [k for _, k in calls])
            return cands
        assert self.retriever is not None and self.ranker is not None
        response = self.retriever.retrieve.remote([q for q, _ in calls])
        if self.args.ranker_active:
            response = self.ranker.rank.remote(response, [k for _, k in calls])
        result: list[Candidates] = await response
        return result
