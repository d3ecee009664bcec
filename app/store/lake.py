"""The lake: local folders or ``s3://`` URIs, atomic writes and immutable versioned folders.

Every stage reads and writes through ``Lake``. A versioned folder (a dataset version, a model
version, a model's predictions) becomes visible only when its ``manifest.json`` exists, and
``Lake.publish`` writes that manifest last with a single atomic put (S3) or rename (local disk),
so a crash never leaves a half-written version that readers can see.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import posixpath
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import fsspec
import pyarrow.fs as pafs

MANIFEST = "manifest.json"

WriteFiles = Callable[[str], Mapping[str, Any] | None]
"""Writes a version's files into a scheme-less staging folder; may return manifest entries."""


class LakeError(RuntimeError):
    """A lake path is missing or unusable; the message says which and what to do."""


def s3_storage_options() -> dict[str, Any]:
    """s3fs options from this process's environment (credentials never come from YAML).

    They are resolved in the driver and travel with the filesystem object to Ray workers, whose
    environment may not hold them (an embedded cluster started earlier, a job's own env vars).
    """
    env = os.environ
    opts: dict[str, Any] = {}
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["client_kwargs"] = {"endpoint_url": endpoint}
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        opts["key"] = env["AWS_ACCESS_KEY_ID"]
        opts["secret"] = env["AWS_SECRET_ACCESS_KEY"]
        if env.get("AWS_SESSION_TOKEN"):
            opts["token"] = env["AWS_SESSION_TOKEN"]
    return opts


def filesystem_for(
    uri: str, storage_options: dict[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return the fsspec filesystem and scheme-less root path for a local path or URI."""
    if uri.startswith("s3://") or uri.startswith("s3a://"):
        opts = s3_storage_options() if storage_options is None else storage_options
        fs = fsspec.filesystem("s3", **opts)
        return fs, uri.split("://", 1)[1].rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        path = os.path.abspath(path)
    return fs, path


def utc_now() -> str:
    """ISO-8601 UTC timestamp used in manifests."""
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def content_id(payload: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable payload (used for version ids)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def sha256_file(path: str) -> str:
    """Hex SHA-256 of a local file, read in blocks so large files never sit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _json_bytes(obj: Any) -> bytes:
    """Pretty JSON with sorted keys, so stored files diff stably."""
    return json.dumps(obj, indent=2, sort_keys=True, default=str).encode()


class Lake:
    """A lake rooted at a local folder or an ``s3://bucket/prefix`` URI.

    Relative paths use ``/``. ``lake.path(rel)`` is a scheme-less path for the filesystem objects
    (``lake.fs`` for fsspec, ``lake.arrow_fs`` for pyarrow / Ray Data). A ``Lake`` pickles as its
    URI, so it crosses Ray boundaries as itself and rebuilds its filesystem where it lands.
    """

    uri: str
    """The lake's URI or local path, without a trailing ``/``."""

    def __init__(self, uri: str | os.PathLike[str] | Lake) -> None:
        raw = uri.uri if isinstance(uri, Lake) else os.fspath(uri)
        self.uri = raw.rstrip("/") or "/"
        self.fs, self.root = filesystem_for(self.uri)
        self.is_local = "file" in (
            self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        )

    def __repr__(self) -> str:
        return f"Lake({self.uri!r})"

    def __reduce__(self) -> tuple[type[Lake], tuple[str]]:
        return (Lake, (self.uri,))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Lake) and other.uri == self.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        """A pyarrow filesystem over the same storage (what Ray Data and pyarrow want)."""
        if self.is_local:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def path(self, *parts: str) -> str:
        """Scheme-less absolute path of ``parts`` inside the lake."""
        return posixpath.join(self.root, *parts) if parts else self.root

    def full_uri(self, *parts: str) -> str:
        """Path with the scheme (``s3://...``) where the lake is remote."""
        p = self.path(*parts)
        return p if self.is_local else f"s3://{p}"

    def exists(self, rel: str) -> bool:
        """Whether a file or folder exists."""
        return bool(self.fs.exists(self.path(rel)))

    def listdir(self, rel: str) -> list[str]:
        """Names (not paths) directly under ``rel``; empty when it does not exist."""
        p = self.path(rel)
        if not self.fs.exists(p):
            return []
        self.fs.invalidate_cache(p)
        return sorted(posixpath.basename(e.rstrip("/")) for e in self.fs.ls(p, detail=False))

    def read_bytes(self, rel: str) -> bytes:
        """Read a whole file."""
        try:
            with self.fs.open(self.path(rel), "rb") as f:
                return bytes(f.read())
        except FileNotFoundError:
            raise LakeError(f"not found in lake {self.uri}: {rel}") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write a whole file atomically: temp name + rename locally, one PUT on S3."""
        p = self.path(rel)
        if self.is_local:
            os.makedirs(posixpath.dirname(p), exist_ok=True)
            tmp = f"{p}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)
        else:
            self.fs.pipe_file(p, data)

    def read_json(self, rel: str) -> Any:
        """Read a JSON file."""
        return json.loads(self.read_bytes(rel))

    def write_json(self, rel: str, obj: Any) -> None:
        """Write a JSON file atomically (pretty, sorted keys for stable diffs)."""
        self.write_bytes(rel, _json_bytes(obj))

    def append_line(self, rel: str, line: str) -> None:
        """Append one line to a log file (read-modify-write on S3; callers serialise writers)."""
        old = self.read_bytes(rel) if self.exists(rel) else b""
        self.write_bytes(rel, old + line.rstrip("\n").encode() + b"\n")

    def remove(self, rel: str) -> None:
        """Remove a file or folder if present."""
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    @contextmanager
    def staging(self, rel: str) -> Iterator[str]:
        """Build a versioned folder and publish it atomically (``publish`` is the usual entry).

        Yields a scheme-less staging path to write into; on success the folder is moved to
        ``rel`` (one rename on local disk) and its ``manifest.json`` must exist by then. On S3 the
        files are written in place and the manifest, written last by the caller, publishes them.
        On error the staging folder is removed and nothing becomes visible.
        """
        final = self.path(rel)
        if self.is_local:
            parent = posixpath.dirname(final)
            os.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(
                parent, f".staging-{posixpath.basename(final)}-{uuid.uuid4().hex[:8]}"
            )
            os.makedirs(tmp)
            try:
                yield tmp
                if not os.path.exists(posixpath.join(tmp, MANIFEST)):
                    raise LakeError(f"staging for {rel} finished without {MANIFEST}")
                if os.path.exists(final):
                    # Same content id: another run published identical content first.
                    self.fs.rm(tmp, recursive=True)
                else:
                    os.rename(tmp, final)
            except BaseException:
                if os.path.exists(tmp):
                    self.fs.rm(tmp, recursive=True)
                raise
        else:
            try:
                yield final
            except BaseException:
                if not self.fs.exists(posixpath.join(final, MANIFEST)):
                    self.remove(rel)
                raise

    def is_published(self, rel: str) -> bool:
        """Whether the versioned folder ``rel`` is published (its manifest exists)."""
        return self.exists(posixpath.join(rel, MANIFEST))

    def publish(self, rel: str, write: WriteFiles, manifest: Mapping[str, Any]) -> dict[str, Any]:
        """Publish the versioned folder ``rel``: files first, ``manifest.json`` last.

        A version id is a content id, so when ``rel`` is already published the same content is
        there: nothing is written and the stored manifest is returned.

        Args:
            rel: Lake-relative folder of the version, e.g. ``datasets/<name>/<version>``.
            write: Called with a scheme-less staging folder; writes the version's files there
                (through ``lake.fs`` or ``lake.arrow_fs``). A mapping it returns is merged into the
                manifest (facts known only after writing, such as row counts).
            manifest: The manifest; ``created_at`` defaults to now (``versions`` sorts by it).

        Returns:
            The published manifest.

        Raises:
            Whatever ``write`` raises; the staging folder is removed and nothing becomes visible.
        """
        if not self.is_published(rel):
            with self.staging(rel) as stage:
                extra = write(stage)
                final = {"created_at": utc_now(), **manifest, **(extra or {})}
                # Written last: on S3 this single PUT publishes the folder.
                self.fs.pipe_file(posixpath.join(stage, MANIFEST), _json_bytes(final))
        # Read back: a concurrent run with the same content id may have published first.
        published: dict[str, Any] = self.read_json(posixpath.join(rel, MANIFEST))
        return published

    def versions(self, rel: str) -> list[str]:
        """Published versions under ``rel`` (those with a manifest), oldest first."""
        found = []
        for name in self.listdir(rel):
            if name.startswith("."):
                continue
            manifest = posixpath.join(rel, name, MANIFEST)
            if self.exists(manifest):
                found.append((self.read_json(manifest).get("created_at", ""), name))
        return [name for _, name in sorted(found)]

    def resolve_version(self, rel: str, version: str | None = "latest") -> str:
        """Turn ``latest`` or a version id (or unique prefix) into a published version id.

        Raises:
            LakeError: when nothing is published, or ``version`` matches none or several.
        """
        versions = self.versions(rel)
        if not versions:
            raise LakeError(
                f"no published versions under {self.full_uri(rel)}: run the job that makes them"
            )
        if version in ("latest", "", None):
            return versions[-1]
        matches = [v for v in versions if v == version] or [
            v for v in versions if v.startswith(str(version))
        ]
        if len(matches) != 1:
            problem = f"ambiguous (matches {', '.join(matches)})" if matches else "not found"
            raise LakeError(
                f"version {version!r} under {self.full_uri(rel)}: {problem}; "
                f"versions: {', '.join(versions)}"
            )
        return matches[0]


def as_lake(lake: Lake | str | os.PathLike[str]) -> Lake:
    """``lake`` itself when it is a ``Lake``, else the lake at that URI or path."""
    return lake if isinstance(lake, Lake) else Lake(lake)
