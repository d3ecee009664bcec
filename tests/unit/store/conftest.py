"""Fixtures for the storage tests: a lake on a local moto S3 server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from app.store import Lake


@pytest.fixture
def s3_lake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Lake]:
    """A lake at ``s3://scalerec-test/lake`` on a local moto server."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket="scalerec-test"
    )
    try:
        yield Lake("s3://scalerec-test/lake")
    finally:
        server.stop()
