"""Property-based HTTP fuzzing of the live app against its own ``/openapi.json`` (schemathesis).

Every operation the live schema documents gets ``MAX_EXAMPLES`` generated requests, valid and
invalid (schemathesis's positive and negative strategies; derandomized, so CI sends the same
cases every run), over real HTTP to a Serve app of its own. Each response must:

- not be a server error (no 5xx),
- have a status code, content type and body that the schema documents for that operation,
- never name the lake (its path or URI), a temporary path, an S3 URI or a traceback, and, when
  it is an error, never a model version of the registry (``names_no_internals``).

The admin operation gets the admin token, so the fuzzer reaches its handler instead of stopping
at 401. Each operation runs to its end and the failures of all of them are reported together,
each with schemathesis's report and a curl command to reproduce it. About 6 operations x 30
cases, a few seconds of requests after the deployment: kept in the fast tier.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from serving import small_app_args, start_fast_serve, wait_healthy

from app.serve import build_application

APP = "scalerec-fuzz"
TOKEN_ENV = "SCALEREC_FUZZ_ADMIN_TOKEN"
TOKEN = "fuzz-admin-token"
MAX_EXAMPLES = 30
LOCAL_YAML = Path(__file__).parents[2] / "serve_configs" / "local.yaml"


@dataclass(frozen=True)
class Target:
    """The fuzzed app and what its answers must never reveal."""

    url: str
    needles: tuple[str, ...]
    """Never in any answer: the lake's path and URI, temporary paths, S3 URIs, tracebacks."""
    versions: tuple[str, ...]
    """Never in an error answer: the registry's model versions."""


@pytest.fixture(scope="module")
def target(ray_cluster: None, serve_lake) -> Iterator[Target]:
    from ray import serve

    os.environ[TOKEN_ENV] = TOKEN
    url = start_fast_serve()  # the fast path of serve_configs/local.yaml
    args = small_app_args(serve_lake.lake.uri, serve_lake.name, TOKEN_ENV)
    small = {"ray_actor_options": {"num_cpus": 0.25}}
    app = build_application(args, {"Ingress": small, "Retriever": small, "Ranker": small})
    serve.run(app, name=APP, route_prefix="/", blocking=False)
    try:
        wait_healthy(url)
        lake = serve_lake.lake
        needles = {lake.uri, str(lake.path()), "/tmp", "s3://", "Traceback"}
        yield Target(url, tuple(sorted(needles)), tuple(serve_lake.versions))
    finally:
        serve.delete(APP)
        serve.shutdown()


@pytest.fixture(scope="module")
def live_schema(target: Target) -> BaseSchema:
    # a default config, so that no schemathesis.toml found on the way up changes the run
    config = schemathesis.Config.from_dict({})
    return schemathesis.openapi.from_url(f"{target.url}/openapi.json", config=config, timeout=30)


def _sent(case: Case) -> str:
    """Everything the request carried, as text: what an answer may echo back."""
    return repr((case.path_parameters, case.query, case.headers, case.body))


def names_no_internals(target: Target) -> Callable[..., None]:
    """A check: the answer names no lake path or URI (nor, when an error, a model version)."""

    def check(ctx: Any, response: Any, case: Case) -> None:
        text = response.text
        sent = _sent(case)
        # an answer may repeat what the request sent (a 422 echoes the rejected input)
        leaks = [n for n in target.needles if n in text and n not in sent]
        if response.status_code >= 400:
            leaks += [v for v in target.versions if v in text and v not in sent]
        assert not leaks, f"answer names {leaks}: {text[:300]}"

    check.__name__ = "names_no_internals"
    return check


FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    # no shrinking: each shrink step is another live request; the report names the case
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def _fuzz(operation: APIOperation, call: Callable[[Case], None]) -> str | None:
    """Run ``MAX_EXAMPLES`` valid and invalid cases of one operation; the failure, if any."""
    auth = {"Authorization": f"Bearer {TOKEN}"} if operation.path.startswith("/admin") else None
    modes = (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    strategy = st.one_of(*(operation.as_strategy(mode, headers=auth) for mode in modes))

    @FUZZ_SETTINGS
    @given(case=strategy)
    def run(case: Case) -> None:
        call(case)

    try:
        run()
    except (FailureGroup, Exception) as exc:  # collected: every operation runs, then reported
        return f"{operation.label}: {exc}"
    return None


def fuzz_all(schema: BaseSchema, call: Callable[[Case], None]) -> list[str]:
    """Fuzz every operation of ``schema``; what failed, one entry per operation."""
    failures: list[str] = []
    labels: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()  # raises on an operation the fuzzer cannot read
        labels.append(operation.label)
        failure = _fuzz(operation, call)
        if failure:
            failures.append(failure)
    assert len(labels) >= 6, labels  # every route the app documents (see test_serve.py)
    return failures


def test_every_operation_fuzzed(target: Target, live_schema: BaseSchema) -> None:
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
        names_no_internals(target),
    ]
    with requests.Session() as http:

        def call(case: Case) -> None:
            case.call_and_validate(session=http, timeout=30, checks=checks)

        failures = fuzz_all(live_schema, call)
    assert not failures, "\n\n".join(failures)


def test_error_bodies_name_no_internals(target: Target) -> None:
    """The errors most likely to leak: an unknown version on reload, an unknown item, a 413."""
    auth = {"Authorization": f"Bearer {TOKEN}"}
    answers = [
        requests.post(
            f"{target.url}/admin/reload", json={"model": "nope"}, headers=auth, timeout=30
        ),
        requests.post(f"{target.url}/admin/reload", json={"model": "2"}, headers=auth, timeout=30),
        requests.get(f"{target.url}/similar/no-such-item", timeout=30),
        requests.post(f"{target.url}/events", data=b"x" * 20_000, timeout=30),
        requests.get(f"{target.url}/no/such/route", timeout=30),
    ]
    assert [r.status_code for r in answers] == [404, 404, 404, 413, 404]
    for r in answers:
        assert not [n for n in (*target.needles, *target.versions) if n in r.text], r.text
