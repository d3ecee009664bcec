"""HTTP ingress of the serving stage: the FastAPI routes of the ``Ingress`` deployment.

The ingress checks each request's input, answers from ``Answers`` (cache, else ``Scoring``),
appends events to the shared log and follows the serving pointer, so that a reload on one
replica switches every replica without failing a request. The pointer is keyed by the Serve
application name, so a reload outlives rebuilds and replica restarts; each replica also keeps
a heartbeat naming the version it serves, so registry deletion (``app.store.delete_version``)
refuses versions a live app uses.
"""

# No ``from __future__ import annotations`` here: FastAPI and Serve read these annotations at
# run time.

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from fastapi import Header, HTTPException, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from app.events import open_store
from app.serve import http as guard
from app.serve.answers import Answers
from app.serve.args import ServeAppArgs
from app.serve.auth import ApiKey, AuthError, KeyRing, RateLimiter, enforce_limits
from app.serve.http import (
    READER,
    WRITER,
    BodyLimitAndMetrics,
    FastPathAPI,
    admin_token_sha256,
    auth_error,
    authorize,
    is_admin_key,
)
from app.serve.metrics import ServeMetrics
from app.serve.schema import (
    EventsRequest,
    EventsResponse,
    HealthResponse,
    RecommendRequest,
    RecommendResponse,
    ReloadRequest,
    ReloadResponse,
    SimilarResponse,
    entry_errors,
    error_responses,
    event_rows,
    invalid,
    validation_error,
)
from app.serve.scoring import Scoring
from app.serve.store import Catalogue, Catalogues, ServedVersion, ServingPointer
from app.store import Heartbeat, Lake, RegistryError, resolve

log = logging.getLogger(__name__)

SWITCH_RETRY_S = 30.0
"""How long a replica waits before it tries again to switch to a version that failed to load."""

api = FastPathAPI(
    title="ScaleRec",
    description="Recommendations from the ScaleRec model registry, served by Ray Serve.",
    version="1.0",
)


api.add_middleware(BodyLimitAndMetrics)
api.add_exception_handler(RequestValidationError, validation_error)  # type: ignore[arg-type]
api.add_exception_handler(AuthError, auth_error)  # type: ignore[arg-type]


@api.exception_handler(RegistryError)
async def _registry_error(_: Any, exc: RegistryError) -> JSONResponse:
    # The registry's message names the lake and every version: fine for a log, not for a
    # client (it would map the storage and the model history to anyone who can reach /admin).
    log.info("registry lookup failed: %s", exc)
    return JSONResponse(
        {"detail": "unknown model version or alias; see the serving logs or the registry"},
        status_code=404,
    )


def _body(answer: BaseModel) -> bytes:
    """The answer as JSON bytes, serialised once by pydantic.

    The endpoints' ``response_model`` stays in the OpenAPI schema; answering with bytes skips
    FastAPI's re-validation of a model this code has just built.
    """
    return answer.__pydantic_serializer__.to_json(answer)


def _json(body: bytes) -> Response:
    return Response(body, media_type="application/json")


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=128)
@serve.ingress(api)
class Ingress:
    """HTTP front: input checks, answers, events, health and reload.

    Args:
        args: ``ServeAppArgs`` as a JSON-able dict.
        version: Model version to serve until the serving pointer names another (the
            pointer and the heartbeat are named after the replica's Serve application).
        token_sha256: Hash of the admin token the builder found; the replica's own
            environment wins.
        retriever: Handle of the Retriever deployment; None scores in this replica.
        ranker: Handle of the Ranker deployment (with ``retriever``).
        keys: The API keys accepted (hashes), when ``args.auth.required``.
    """

    def __init__(
        self,
        args: dict[str, Any],
        version: str,
        token_sha256: str | None,
        retriever: DeploymentHandle | None = None,
        ranker: DeploymentHandle | None = None,
        keys: list[ApiKey] | None = None,
    ) -> None:
        self.args = ServeAppArgs.model_validate(args)
        self.keys = KeyRing(keys or [], enabled=self.args.auth.required)
        self.limiter = RateLimiter()
        self.lake = Lake(self.args.lake)
        self.metrics = ServeMetrics("ingress")
        self.scoring = Scoring(self.lake, self.args, version, self.metrics, retriever, ranker)
        self.token_sha256 = admin_token_sha256(self.args.admin_token_env, token_sha256)
        # Through the module object: Serve pickles this class by value, so a global of this
        # module would be a copy here, not what the ASGI guard reads.
        guard.RUNTIME.update(
            max_body_bytes=self.args.max_body_bytes,
            metrics=self.metrics,
            recommend=self._recommend_fast,
            keys=self.keys,
        )
        self.catalogues = Catalogues(self.lake, self.args.name)
        ctx = serve.get_replica_context()
        app_name = ctx.app_name
        self.pointer = ServingPointer(self.lake, self.args.name, app_name, self.args.pointer_poll_s)
        self.configured = version
        self.state = self.catalogues.load_at_start(self.pointer.follow(version), version)
        cat = self.state.catalogue
        self.events = open_store(self.lake, cat.dataset, self.args.events, cat.events_cursor)
        self.events.refresh(force=True)
        self.answers = Answers(self.args, self.scoring, self.events, self.metrics)
        self._switching: asyncio.Task[None] | None = None
        self._polling: asyncio.Task[None] | None = None
        self._next_poll = 0.0
        self._failed: tuple[str | None, float] = (None, 0.0)  # a version that failed, until
        self.metrics.set_version(self.state.version)
        self.answers.warm(self.lake, self.state)
        # Written now and then from its own thread: an idle replica stays live too.
        self.heartbeat = Heartbeat(
            self.lake,
            self.args.name,
            app_name,
            ctx.replica_id.unique_id,
            lambda: self.state.version,
        )
        self.heartbeat.start()

    def __del__(self) -> None:
        """On a graceful stop (Serve calls this), drop the heartbeat: the version is unused here."""
        heartbeat = getattr(self, "heartbeat", None)  # None when __init__ failed before it
        if heartbeat is not None:
            heartbeat.stop()

    # -- served version -------------------------------------------------------------------

    def _sync(self) -> ServedVersion:
        """Follow the serving pointer (switch in the background) and tail the event log.

        On a local lake that is a few ``stat`` calls, done inline. On a remote one (S3) it is
        network I/O, so it runs in a worker thread at most every ``pointer_poll_s``, one poll
        at a time, while requests go on with what the last poll saw.
        """
        if self.lake.is_local:
            self._follow(self.pointer.read())
            self.events.refresh()
        elif self._polling is None and time.monotonic() >= self._next_poll:
            self._next_poll = time.monotonic() + self.args.pointer_poll_s
            self._polling = asyncio.get_running_loop().create_task(self._poll_remote())
        return self.state

    async def _poll_remote(self) -> None:
        def poll() -> str | None:  # paced here, so neither skips a poll by its own clock
            wanted = self.pointer.read(force=True)
            self.events.refresh(force=True)
            return wanted

        try:
            self._follow(await asyncio.to_thread(poll))
        except Exception:  # a lake hiccup: serve what is loaded, poll again later
            log.warning("could not poll the serving pointer or the event log", exc_info=True)
        finally:
            self._polling = None

    def _follow(self, wanted: str | None) -> None:
        if (
            wanted
            and wanted != self.state.version
            and self._switching is None
            and not (wanted == self._failed[0] and time.monotonic() < self._failed[1])
        ):
            self._switching = asyncio.get_running_loop().create_task(self._switch(wanted))

    async def _switch(self, version: str) -> None:
        try:
            state = await asyncio.to_thread(self.catalogues.load, version, self.state)
            await self.scoring.warm(state.version)
            await asyncio.to_thread(self.answers.warm, self.lake, state)
            self.state = state
            self.metrics.set_version(state.version)
            self.heartbeat.beat()
        except Exception:  # keep serving the old version; retry a while later, not per request
            log.exception("could not switch to %s; next try in %.0f s", version, SWITCH_RETRY_S)
            self._failed = (version, time.monotonic() + SWITCH_RETRY_S)
        finally:
            self._switching = None

    # -- input checks ---------------------------------------------------------------------

    def _check_k(self, k: int | None, where: str = "query") -> int:
        k = self.args.default_k if k is None else k
        if not 1 <= k <= self.args.max_k:
            raise invalid((where, "k"), f"k must be between 1 and {self.args.max_k}", k)
        return k

    def _check_items(self, cat: Catalogue, ids: list[str], what: str) -> None:
        if len(ids) > self.args.max_context_items:
            limit = self.args.max_context_items
            raise invalid(("body", what), f"at most {limit} items, got {len(ids)}", len(ids))
        unknown = cat.unknown_items(ids)
        if unknown:
            raise invalid(("body", what), "unknown item ids", unknown[:10])

    async def _recommend(
        self,
        user_id: str | None,
        k: int | None,
        context: list[str],
        exclude: list[str],
        include_seen: bool,
        where: str = "query",
    ) -> RecommendResponse:
        state = self._sync()
        k = self._check_k(k, where)
        self._check_items(state.catalogue, context, "context")
        self._check_items(state.catalogue, exclude, "exclude")
        return await self.answers.recommend(state, user_id, k, context, exclude, include_seen)

    # -- endpoints ------------------------------------------------------------------------

    def _limit(self, key: ApiKey, users: dict[str, int] | None = None) -> None:
        enforce_limits(self.limiter, self.args.auth, key, users)

    @staticmethod
    def _visible(answer: RecommendResponse, key: ApiKey) -> RecommendResponse:
        # how many live events a user has is part of their history
        if key.allows("history:read"):
            return answer
        return answer.model_copy(update={"history_version": None})

    async def _recommend_json(self, user_id: str, k: int | None, key: ApiKey) -> bytes:
        """JSON body of ``GET /recommend/{user_id}`` for a caller whose scope was checked."""
        self._limit(key)
        return _body(self._visible(await self._recommend(user_id, k, [], [], False), key))

    async def _recommend_fast(
        self, user_id: str, k: int | None, authorization: str | None, x_api_key: str | None
    ) -> bytes:
        """``_recommend_json`` for the ASGI guard, which hands over the raw credentials."""
        key = self.keys.authenticate(authorization, x_api_key)
        self.keys.require(key, "recommend:read")
        return await self._recommend_json(user_id, k, key)

    @api.get(
        "/recommend/{user_id}",
        response_model=RecommendResponse,
        responses=error_responses(401, 403, 404, 429, 503),
    )
    async def recommend_get(
        self,
        user_id: str,
        k: int | None = Query(None, description="List length."),
        key: ApiKey = READER,
    ) -> Response:
        """Top-k items for a user; unknown users get popular items."""
        return _json(await self._recommend_json(user_id, k, key))

    @api.post(
        "/recommend",
        response_model=RecommendResponse,
        responses=error_responses(400, 401, 403, 413, 429, 503),
    )
    async def recommend_post(self, body: RecommendRequest, key: ApiKey = READER) -> Response:
        """Top-k items for a user or an anonymous context, with optional exclusions.

        ``include_seen`` shows what the user interacted with: it needs ``history:read``.
        """
        if body.include_seen:
            self.keys.require(key, "history:read")
        self._limit(key)
        answer = await self._recommend(
            body.user_id, body.k, body.context, body.exclude, body.include_seen, where="body"
        )
        return _json(_body(self._visible(answer, key)))

    @api.get(
        "/similar/{item_id}",
        response_model=SimilarResponse,
        responses=error_responses(401, 403, 404, 429, 503),
    )
    async def similar(
        self, item_id: str, k: int | None = Query(None), key: ApiKey = READER
    ) -> Response:
        """Items most similar to ``item_id``."""
        self._limit(key)
        state = self._sync()
        k = self._check_k(k)
        if item_id not in state.catalogue.item_index:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        return _json(_body(await self.answers.similar(state, item_id, k)))

    @api.post(
        "/events",
        status_code=202,
        response_model=EventsResponse,
        responses=error_responses(400, 401, 403, 413, 429, 503),
    )
    async def post_events(self, body: EventsRequest, key: ApiKey = WRITER) -> EventsResponse:
        """Append user actions durably; the next recommendation for those users reflects them.

        Limited per key (one request) and per user (each of their events); history versions
        only for keys with ``history:read``.
        """
        if len(body.events) > self.args.max_events:
            raise HTTPException(
                413, f"at most {self.args.max_events} events per request, got {len(body.events)}"
            )
        self._limit(key, dict(Counter(e.user_id for e in body.events)))
        cat = self._sync().catalogue
        unknown = set(cat.unknown_items([e.item_id for e in body.events]))
        failed = entry_errors(body.events, unknown, self.args.events.types)
        if failed:
            raise RequestValidationError(failed[:50])
        rows = event_rows(body.events, time.time())
        try:
            new = await asyncio.to_thread(self.events.append, rows)
        except OSError as exc:  # not durable, so not acknowledged: the client retries
            log.error("could not log %d events: %s", len(rows), exc)
            raise HTTPException(
                503, "the event store is unavailable; retry", headers={"Retry-After": "1"}
            ) from None
        self.metrics.count("events", new)
        users = dict.fromkeys(e.user_id for e in body.events) if key.allows("history:read") else {}
        return EventsResponse(
            accepted=len(rows),
            duplicates=len(rows) - new,
            history_versions={u: self.events.version(u) for u in users},
        )

    @api.get("/healthz", response_model=HealthResponse, responses=error_responses(503))
    async def healthz(self) -> HealthResponse:
        """Liveness and the served model version."""
        state = self._sync()
        return HealthResponse(
            status="ok",
            model=self.args.name,
            model_version=state.version,
            dataset_version=state.catalogue.version,
        )

    @api.post(
        "/admin/reload",
        response_model=ReloadResponse,
        responses=error_responses(400, 401, 403, 404, 413, 503),
    )
    async def reload(
        self, body: ReloadRequest, authorization: str | None = Header(None)
    ) -> ReloadResponse:
        """Switch every replica to a registry version or alias without failing a request.

        Takes the admin token or an API key with the ``admin`` scope, as a bearer token.
        """
        if not is_admin_key(self.keys, authorization):
            authorize(authorization, self.token_sha256, self.args.admin_token_env)
        previous = self._sync().version
        # registry and pointer I/O (an S3 listing on a remote lake) stay off the event loop
        version = await asyncio.to_thread(resolve, self.lake, self.args.name, body.model)
        state = await asyncio.to_thread(self.catalogues.load, version, self.state)
        # Load the model before anyone asks for it (each retriever call lands on some replica;
        # the others load on first use, which delays but never fails).
        await self.scoring.warm(version, calls=4)
        await asyncio.to_thread(
            self.pointer.write,
            version,
            previous=previous,
            ref=body.model,
            configured=self.configured,
        )
        await asyncio.to_thread(self.answers.warm, self.lake, state)
        self.state = state
        self.metrics.set_version(version)
        self.heartbeat.beat()
        log.info("reloaded %s: %s -> %s", self.args.name, previous, version)
        return ReloadResponse(previous=previous, version=version)
