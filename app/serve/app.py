"""Serving stage: FastAPI ingress over Retriever → Ranker, with cache, online store and reload.

Run with ``python -m jobs.serve --config serve_configs/local.yaml`` or
``serve run serve_configs/local.yaml`` (``import_path: app.serve:build_app``).
"""

# No ``from __future__ import annotations`` here: Serve validates ``args`` against the builder's
# annotation only when it is a class, not a string.

import asyncio
import gc
import hashlib
import hmac
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from fastapi import Header, HTTPException, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from app.lake import MANIFEST, Lake
from app.registry import ModelRecord, RegistryError, get_record, resolve
from app.serve import args as _replica
from app.serve.args import ServeAppArgs
from app.serve.cache import TTLCache
from app.serve.coalesce import Coalescer
from app.serve.http import (
    BodyLimitAndMetrics,
    EventsRequest,
    EventsResponse,
    FastPathAPI,
    HealthResponse,
    ItemScore,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    ReloadResponse,
    SimilarResponse,
)
from app.serve.metrics import ServeMetrics
from app.serve.ranker import Ranker, RankRules
from app.serve.retriever import Candidates, ModelVersions, Retriever, ScoringOptions
from app.serve.retriever import Query as RetrievalQuery
from app.serve.store import Catalogue, EventLog, ServingPointer, load_catalogue

log = logging.getLogger(__name__)

api = FastPathAPI(
    title="ScaleRec",
    description="Recommendations from the ScaleRec model registry, served by Ray Serve.",
    version="1.0",
)


api.add_middleware(BodyLimitAndMetrics)


@api.exception_handler(RegistryError)
async def _registry_error(_: Any, exc: RegistryError) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=404)


@dataclass
class _State:
    """One servable model version as the ingress sees it."""

    version: str
    record: ModelRecord
    catalogue: Catalogue


def _freeze_heap() -> None:
    """Exempt what is loaded now (catalogue dicts, id lists, models) from garbage collection.

    A full collection walks every tracked object, and a loaded catalogue holds hundreds of
    thousands of them: the pause lands on whichever requests are in flight. Frozen objects are
    still freed by reference counting when a reload drops them; only reference cycles among
    them would stay. On a reload that loads a new dataset version only the new objects are
    walked. Measured pauses: docs/performance.md.
    """
    gc.collect()
    gc.freeze()


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _body(answer: BaseModel) -> bytes:
    """The answer as JSON bytes, serialised once by pydantic.

    The endpoints' ``response_model`` stays in the OpenAPI schema; answering with bytes skips
    FastAPI's re-validation of a model this code has just built.
    """
    return answer.__pydantic_serializer__.to_json(answer)


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


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


def _items(cat: Catalogue, cand: Candidates) -> list[ItemScore]:
    # Built from the catalogue and the scorer's arrays: nothing to validate.
    ids = cat.item_ids
    return [
        ItemScore.model_construct(item_id=ids[i], score=s)
        for i, s in zip(cand.items.tolist(), cand.scores.tolist(), strict=True)
    ]


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    """HTTP front: id mapping, seen-item filtering, cache, events, health and reload."""

    def __init__(
        self,
        args: dict[str, Any],
        version: str,
        app_id: str,
        token_sha256: str | None,
        retriever: DeploymentHandle | None = None,
        ranker: DeploymentHandle | None = None,
    ) -> None:
        self.args = ServeAppArgs.model_validate(args)
        self.lake = Lake(self.args.lake)
        self.retriever = retriever
        self.ranker = ranker
        # Scoring in this replica (``colocate_scoring``) replaces both handles.
        self.local: ModelVersions | None = None
        self.rules: RankRules | None = None
        if retriever is None:
            self.local = ModelVersions(self.lake, self.args.name, ScoringOptions.of(self.args))
            self.local.load_sync(version)
            self.rules = RankRules(
                self.lake, self.args.name, self.args.max_per_genre, list(self.args.blocked_items)
            )
        env_token = os.environ.get(self.args.admin_token_env)
        self.token_sha256 = _hash(env_token) if env_token else token_sha256
        self.metrics = ServeMetrics("ingress")
        # Through the module object: Serve pickles this class by value, so a global of this
        # module would be a copy here, not what the ASGI guard reads.
        _replica.RUNTIME.update(
            max_body_bytes=self.args.max_body_bytes,
            metrics=self.metrics,
            recommend=self._recommend_json,
        )
        self.cache: TTLCache[Any] = TTLCache(self.args.cache_size, self.args.cache_ttl_s)
        self._catalogues: dict[tuple[str, str], Catalogue] = {}
        self.pointer = ServingPointer(self.lake, self.args.name, app_id, self.args.pointer_poll_s)
        self.state = self._load_state(self.pointer.read() or version)
        self.events = EventLog(self.lake, self.state.catalogue.dataset, self.args.pointer_poll_s)
        self.events.refresh(force=True)
        self._switching: asyncio.Task[None] | None = None
        self._batched: Coalescer[tuple[RetrievalQuery, int], Candidates] = Coalescer(
            self._retrieve,
            self.args.max_batch_size,
            self.args.max_in_flight,
            self.args.batch_wait_timeout_s,
        )
        self.metrics.set_version(self.state.version)
        self._warm(self.state)

    def _warm(self, state: _State) -> int:
        """Fill the cache from ``state``'s published batch predictions (``args.warm_cache``)."""
        if not (self.args.warm_cache and self.cache.enabled):
            return 0
        if self.args.ranker_active:
            log.info("warm_cache skipped: batch predictions do not apply the ranker's rules")
            return 0
        from app.predict import predictions_rel, read_predictions

        if not self.lake.exists(posixpath.join(predictions_rel(state.version), MANIFEST)):
            log.info("warm_cache: no batch predictions for %s", state.version)
            return 0
        table = read_predictions(self.lake, state.version)
        answers = warm_answers(
            table, state.catalogue, state.version, self.args.default_k, self.cache.max_size
        )
        for answer in answers:
            if self.events.version(str(answer.user_id)) == 0:
                self.cache.put(
                    rec_key(state.version, answer.user_id, 0, self.args.default_k), answer
                )
        log.info("warm_cache: %d answers of %s cached", len(answers), state.version)
        return len(answers)

    # -- state ----------------------------------------------------------------------------

    def _load_state(self, version: str) -> _State:
        record = get_record(self.lake, self.args.name, version)
        ds = record.lineage["dataset"]
        key = (str(ds["name"]), str(ds["version"]))
        if key not in self._catalogues:
            self._catalogues = {
                k: v for k, v in self._catalogues.items() if k == self._current_dataset()
            }
            self._catalogues[key] = load_catalogue(self.lake, *key)
            _freeze_heap()
        return _State(record.version, record, self._catalogues[key])

    def _current_dataset(self) -> tuple[str, str] | None:
        state = getattr(self, "state", None)
        return None if state is None else (state.catalogue.dataset, state.catalogue.version)

    def _sync(self) -> _State:
        """Follow the serving pointer (switch in the background) and tail the event log."""
        wanted = self.pointer.read()
        if wanted and wanted != self.state.version and self._switching is None:
            self._switching = asyncio.get_running_loop().create_task(self._switch(wanted))
        self.events.refresh()
        return self.state

    async def _switch(self, version: str) -> None:
        try:
            state = await asyncio.to_thread(self._load_state, version)
            await self._warm_models(state.version)
            await asyncio.to_thread(self._warm, state)
            self.state = state
            self.metrics.set_version(state.version)
        except Exception:  # keep serving the old version; retry on a later request
            log.exception("could not switch to %s", version)
        finally:
            self._switching = None

    # -- retrieval ------------------------------------------------------------------------

    async def _warm_models(self, version: str, calls: int = 1) -> None:
        """Load ``version`` for scoring: here, or on retriever replicas (``calls`` tries)."""
        if self.local is not None:
            await self.local.get(version)
        else:
            assert self.retriever is not None
            await asyncio.gather(*(self.retriever.warm.remote(version) for _ in range(calls)))

    async def _retrieve(self, calls: list[tuple[RetrievalQuery, int]]) -> list[Candidates]:
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

    def _check_k(self, k: int | None) -> int:
        k = self.args.default_k if k is None else k
        if not 1 <= k <= self.args.max_k:
            raise HTTPException(422, f"k must be between 1 and {self.args.max_k}, got {k}")
        return k

    def _check_items(self, cat: Catalogue, ids: list[str], what: str) -> None:
        if len(ids) > self.args.max_context_items:
            raise HTTPException(
                422, f"{what}: at most {self.args.max_context_items} items, got {len(ids)}"
            )
        unknown = cat.unknown_items(ids)
        if unknown:
            raise HTTPException(422, f"{what}: unknown item ids {unknown[:10]}")

    async def _recommend(
        self,
        user_id: str | None,
        k: int | None,
        context: list[str],
        exclude: list[str],
        include_seen: bool,
    ) -> RecommendResponse:
        state = self._sync()
        cat = state.catalogue
        k = self._check_k(k)
        self._check_items(cat, context, "context")
        self._check_items(cat, exclude, "exclude")
        hv = self.events.version(user_id) if user_id else 0
        key = rec_key(state.version, user_id, hv, k, context, exclude, include_seen)
        hit = self.cache.get(key)
        self.metrics.count("cache", result="hit" if hit is not None else "miss")
        if hit is not None:
            return hit.model_copy(update={"cached": True})

        user_idx = cat.user_index.get(user_id, -1) if user_id else -1
        stored = cat.known_items(user_idx)
        live_ids = self.events.items(user_id) if user_id else []
        if not live_ids and not context and not exclude:  # the common case: no set algebra
            recent, history = stored[:0], stored
            excluded = stored[:0] if include_seen else stored
        else:
            recent = np.setdiff1d(cat.to_index(live_ids), stored)
            history = np.union1d(np.union1d(stored, recent), cat.to_index(context))
            excluded = np.union1d(cat.to_index(exclude), stored[:0] if include_seen else history)
        if not len(history):
            strategy = "popularity"
            cand = self._popular(state, excluded, k)
        else:
            strategy = "personal" if user_idx >= 0 else "context"
            n_fetch = k
            if self.args.ranker_active:
                n_fetch = min(cat.n_items, 3 * k + len(self.args.blocked_items))
            query = RetrievalQuery(state.version, user_idx, history, recent, excluded, n_fetch)
            cand = await self._batched((query, k))
        answer = RecommendResponse.model_construct(
            user_id=user_id,
            items=_items(cat, cand),
            model_version=cand.version,
            cached=False,
            strategy=strategy,
            history_version=hv,
        )
        self.cache.put(key, answer)
        return answer

    def _popular(self, state: _State, excluded: np.ndarray, k: int) -> Candidates:
        cat = state.catalogue
        head = cat.popular[: k + len(excluded)]
        head = head[~np.isin(head, excluded)][:k]
        return Candidates(state.version, head, cat.popularity[head])

    # -- endpoints ------------------------------------------------------------------------

    async def _recommend_json(self, user_id: str, k: int | None) -> bytes:
        """JSON body of ``GET /recommend/{user_id}`` (also answered by the ASGI guard directly)."""
        answer = await self._recommend(user_id, k, [], [], False)
        return _body(answer)

    @api.get("/recommend/{user_id}", response_model=RecommendResponse)
    async def recommend_get(
        self, user_id: str, k: int | None = Query(None, description="List length.")
    ) -> Response:
        """Top-k items for a user; unknown users get popular items."""
        return _json(await self._recommend_json(user_id, k))

    @api.post("/recommend", response_model=RecommendResponse)
    async def recommend_post(self, body: RecommendRequest) -> Response:
        """Top-k items for a user or an anonymous context, with optional exclusions."""
        answer = await self._recommend(
            body.user_id, body.k, body.context, body.exclude, body.include_seen
        )
        return _json(_body(answer))

    @api.get("/similar/{item_id}", response_model=SimilarResponse)
    async def similar(self, item_id: str, k: int | None = Query(None)) -> Response:
        """Items most similar to ``item_id``."""
        state = self._sync()
        k = self._check_k(k)
        idx = state.catalogue.item_index.get(item_id)
        if idx is None:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        key = ("sim", state.version, item_id, k)
        hit = self.cache.get(key)
        if hit is not None:
            return _json(_body(hit.model_copy(update={"cached": True})))
        if self.local is not None:
            cand = (await self.local.get(state.version)).similar(idx, k)
        else:
            assert self.retriever is not None
            cand = await self.retriever.similar.remote(state.version, idx, k)
        answer = SimilarResponse(
            item_id=item_id,
            items=_items(state.catalogue, cand),
            model_version=cand.version,
            cached=False,
        )
        self.cache.put(key, answer)
        return _json(_body(answer))

    @api.post("/events", status_code=202, response_model=EventsResponse)
    async def post_events(self, body: EventsRequest) -> EventsResponse:
        """Append user actions durably; the next recommendation for those users reflects them."""
        if len(body.events) > self.args.max_events:
            raise HTTPException(
                413, f"at most {self.args.max_events} events per request, got {len(body.events)}"
            )
        cat = self._sync().catalogue
        unknown = cat.unknown_items([e.item_id for e in body.events])
        if unknown:
            raise HTTPException(422, f"unknown item ids {sorted(set(unknown))[:10]}")
        now = time.time()
        rows = [
            {
                "user_id": e.user_id,
                "item_id": e.item_id,
                "event": e.event,
                "timestamp": e.timestamp if e.timestamp is not None else now,
                "received_at": now,
            }
            for e in body.events
        ]
        await asyncio.to_thread(self.events.append, rows)
        self.metrics.count("events", len(rows))
        users = dict.fromkeys(e.user_id for e in body.events)
        return EventsResponse(
            accepted=len(rows), history_versions={u: self.events.version(u) for u in users}
        )

    @api.get("/healthz", response_model=HealthResponse)
    async def healthz(self) -> HealthResponse:
        """Liveness and the served model version."""
        state = self._sync()
        return HealthResponse(
            status="ok",
            model=self.args.name,
            model_version=state.version,
            dataset_version=state.catalogue.version,
        )

    @api.post("/admin/reload", response_model=ReloadResponse)
    async def reload(
        self, body: ReloadRequest, authorization: str | None = Header(None)
    ) -> ReloadResponse:
        """Switch every replica to a registry version or alias without failing a request."""
        self._authorize(authorization)
        previous = self._sync().version
        version = resolve(self.lake, self.args.name, body.model)
        state = await asyncio.to_thread(self._load_state, version)
        # Load the model before anyone asks for it (each retriever call lands on some replica;
        # the others load on first use, which delays but never fails).
        await self._warm_models(version, calls=4)
        self.pointer.write(version, previous=previous, ref=body.model)
        await asyncio.to_thread(self._warm, state)
        self.state = state
        self.metrics.set_version(version)
        log.info("reloaded %s: %s -> %s", self.args.name, previous, version)
        return ReloadResponse(previous=previous, version=version)

    def _authorize(self, authorization: str | None) -> None:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token", headers={"WWW-Authenticate": "Bearer"})
        if self.token_sha256 is None:
            raise HTTPException(403, f"admin disabled: {self.args.admin_token_env} is not set")
        if not hmac.compare_digest(_hash(token.strip()), self.token_sha256):
            raise HTTPException(403, "wrong admin token")


def build_application(
    args: ServeAppArgs | dict[str, Any], deployments: dict[str, dict[str, Any]] | None = None
) -> Application:
    """The ScaleRec application graph, with optional per-deployment option overrides.

    Args:
        args: Application arguments.
        deployments: ``{"Retriever": {"autoscaling_config": ...}, ...}`` as in a Serve config's
            ``deployments:`` list (``jobs.serve`` passes the YAML's).
    """
    if not isinstance(args, ServeAppArgs):
        args = ServeAppArgs.model_validate(args)
    lake = Lake(args.lake)
    version = resolve(lake, args.name, args.model)
    token = os.environ.get(args.admin_token_env)
    opts = deployments or {}
    ingress_args = (
        args.model_dump(mode="json"),
        version,
        uuid.uuid4().hex[:12],
        _hash(token) if token else None,
    )
    if args.colocate_scoring:  # one deployment: the ingress scores and ranks itself
        return Ingress.options(**opts.get("Ingress", {})).bind(*ingress_args)
    retriever = Retriever.options(**opts.get("Retriever", {})).bind(
        args.lake,
        args.name,
        version,
        args.max_batch_size,
        args.batch_wait_timeout_s,
        ScoringOptions.of(args),
    )
    ranker = Ranker.options(**opts.get("Ranker", {})).bind(
        args.lake, args.name, args.max_per_genre, list(args.blocked_items)
    )
    return Ingress.options(**opts.get("Ingress", {})).bind(*ingress_args, retriever, ranker)


def build_app(args: ServeAppArgs) -> Application:
    """Serve's typed application builder (``import_path: app.serve:build_app``)."""
    return build_application(args)
