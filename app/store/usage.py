"""Who uses a model version (aliases, serving pointers, live apps), and deleting unused ones.

Part of the model registry, used by the serve stage (pointers, heartbeats) and by
``python -m jobs.registry list|delete --lake <lake> --name <model>``. Layout:

- ``serving/<name>/<app name>.json``: the reload pointer of a deployed application, keyed by
  its Serve application name so that it survives rebuilds and replica restarts
- ``serving/<name>/live/<app name>/<replica id>.json``: each serving replica's heartbeat
  (``version``, ``time``), rewritten every ``HEARTBEAT_S``
- ``models/<name>/deletions.jsonl``: one line per deleted version (time, version, forced, users)

Deletion checks the users, then deletes: a promotion or reload racing it is not seen, so run
deletions while nobody promotes (as with promotions, writers of one model are serialised).
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
import time
from collections.abc import Callable
from typing import Any

from app.store.lake import MANIFEST, Lake, LakeError, utc_now
from app.store.registry import RegistryError, aliases, models_root

log = logging.getLogger(__name__)

HEARTBEAT_S = 30.0
"""How often a serving replica rewrites its heartbeat."""
LIVE_S = 4 * HEARTBEAT_S
"""A heartbeat younger than this marks a live user (three missed beats are tolerated)."""
DELETIONS_FILE = "deletions.jsonl"
LIVE_DIR = "live"

Use = tuple[str, str]
"""``(kind, description)`` of one user of a version; kind is ``alias``, ``pointer`` or ``live``."""


def _part(what: str, value: str) -> str:
    """``value`` as one path segment; refuses what would escape or hide (``..``, ``a/b``)."""
    if not value or "/" in value or value.startswith("."):
        raise RegistryError(f"invalid {what} {value!r}")
    return value


def serving_root(name: str) -> str:
    """Lake-relative folder of model ``name``'s reload pointers and heartbeats."""
    return posixpath.join("serving", _part("model name", name))


def pointer_rel(name: str, app_name: str) -> str:
    """The reload pointer of application ``app_name``: ``serving/<name>/<app_name>.json``."""
    return posixpath.join(serving_root(name), f"{_part('application name', app_name)}.json")


def heartbeat_rel(name: str, app_name: str, replica_id: str) -> str:
    """A replica's heartbeat: ``serving/<name>/live/<app_name>/<replica_id>.json``."""
    app = _part("application name", app_name)
    return posixpath.join(
        serving_root(name), LIVE_DIR, app, f"{_part('replica id', replica_id)}.json"
    )


def write_heartbeat(lake: Lake, name: str, app_name: str, replica_id: str, version: str) -> None:
    """Record that a replica of ``app_name`` serves ``version`` now (atomic write)."""
    lake.write_json(
        heartbeat_rel(name, app_name, replica_id), {"version": version, "time": time.time()}
    )


def _pointer_uses(lake: Lake, name: str) -> dict[str, list[Use]]:
    found: dict[str, list[Use]] = {}
    root = serving_root(name)
    for entry in lake.listdir(root):
        if not entry.endswith(".json") or entry.startswith("."):
            continue
        app = entry.removesuffix(".json")
        try:
            version = str(lake.read_json(posixpath.join(root, entry))["version"])
        except (LakeError, OSError, ValueError, KeyError, TypeError) as exc:
            # A pointer that cannot be read may name any version: it blocks every deletion.
            found.setdefault("*", []).append(
                ("pointer", f"unreadable serving pointer of app {app} ({type(exc).__name__})")
            )
            continue
        found.setdefault(version, []).append(("pointer", f"serving pointer of app {app}"))
    return found


def _live_uses(lake: Lake, name: str, live_s: float) -> dict[str, list[Use]]:
    found: dict[str, list[Use]] = {}
    root = posixpath.join(serving_root(name), LIVE_DIR)
    now = time.time()
    for app in lake.listdir(root):
        for entry in lake.listdir(posixpath.join(root, app)):
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            try:
                beat = lake.read_json(posixpath.join(root, app, entry))
                version, age = str(beat["version"]), now - float(beat["time"])
            except (LakeError, OSError, ValueError, KeyError, TypeError):
                continue  # a live replica rewrites its heartbeat within HEARTBEAT_S
            if age < live_s:  # a clock ahead of ours gives a negative age: live
                replica = entry.removesuffix(".json")
                text = f"live app {app} (replica {replica}, {max(age, 0.0):.0f} s ago)"
                found.setdefault(version, []).append(("live", text))
    return found


def _uses(lake: Lake, name: str, live_s: float) -> dict[str, list[Use]]:
    """Every version's users, from one read of the aliases, pointers and heartbeats."""
    found: dict[str, list[Use]] = {}
    for alias, version in sorted(aliases(lake, name).items()):
        found.setdefault(version, []).append(("alias", f"alias {alias}"))
    for part in (_pointer_uses(lake, name), _live_uses(lake, name, live_s)):
        for version, uses in part.items():
            found.setdefault(version, []).extend(sorted(uses))
    return found


def users_by_version(lake: Lake, name: str, live_s: float = LIVE_S) -> dict[str, list[str]]:
    """Users of every version that has one (see ``users``), keyed by version id.

    The key ``*`` holds unreadable serving pointers, which may name any version.
    """
    return {v: [text for _, text in uses] for v, uses in _uses(lake, name, live_s).items()}


def users(lake: Lake, name: str, version: str, live_s: float = LIVE_S) -> list[str]:
    """Who uses ``version`` of model ``name``, one readable line each.

    Every alias pointing at it (``alias production``), every reload pointer naming it
    (``serving pointer of app scalerec``) and every heartbeat younger than ``live_s`` seconds
    naming it (``live app scalerec (replica abc, 12 s ago)``); older heartbeats are ignored.
    """
    found = users_by_version(lake, name, live_s)
    return found.get(version, []) + found.get("*", [])


class VersionInUse(RegistryError):
    """Deletion refused: the version has users (the message names them and what to do)."""

    def __init__(self, name: str, version: str, users: list[str]) -> None:
        self.name, self.version, self.users = name, version, list(users)
        super().__init__(
            f"refusing to delete {name} {version}: it is in use by {'; '.join(users)}. "
            f"Move each alias to another version (app.store.promote), reload each app to "
            f"another version (POST /admin/reload) or stop it (its heartbeat goes stale after "
            f"{LIVE_S:.0f} s), then delete again; or pass force=True (CLI: --force) to delete "
            f"it anyway (replicas whose pointer names it then start on their configured version)"
        )


def delete_version(lake: Lake, name: str, version: str, force: bool = False) -> dict[str, Any]:
    """Delete one model version unless something uses it (see ``users``) or ``force``.

    Takes an exact version id (no alias, prefix or ``latest``). The manifest goes first, so
    readers stop seeing the version before its files go; then one line is appended to
    ``models/<name>/deletions.jsonl``. A folder left without a manifest (an interrupted
    deletion) is removed only with ``force``.

    Returns:
        The deletion log entry.

    Raises:
        VersionInUse: naming every user, unless ``force``.
        RegistryError: when no such version is published.
    """
    root = models_root(name)
    rel = posixpath.join(root, _part("version", version))
    published = lake.is_published(rel)
    if not published and not (force and lake.exists(rel)):
        hint = (
            "its files have no manifest (an interrupted deletion, or a registration in "
            "progress); pass force to remove them"
            if lake.exists(rel)
            else "`python -m jobs.registry list` shows the versions"
        )
        raise RegistryError(f"model {name!r} has no published version {version!r}: {hint}")
    found = users(lake, name, version) if published else []
    if found and not force:
        raise VersionInUse(name, version, found)
    lake.remove(posixpath.join(rel, MANIFEST))  # unpublish first: readers stop seeing it
    lake.remove(rel)
    entry = {
        "time": utc_now(),
        "version": version,
        "forced": bool(found) or not published,
        "users": found,
    }
    lake.append_line(posixpath.join(root, DELETIONS_FILE), json.dumps(entry, sort_keys=True))
    log.info("deleted %s %s%s", name, version, f" (forced; users: {found})" if found else "")
    return entry


def deletions(lake: Lake, name: str) -> list[dict[str, Any]]:
    """Every deletion of a model's versions, oldest first."""
    rel = posixpath.join(models_root(name), DELETIONS_FILE)
    if not lake.exists(rel):
        return []
    return [json.loads(line) for line in lake.read_bytes(rel).decode().splitlines() if line]


def usage_table(lake: Lake, name: str, live_s: float = LIVE_S) -> str:
    """A readable table of a model's versions: created, aliases and other users of each."""
    uses = _uses(lake, name, live_s)
    root = models_root(name)
    rows = [("version", "created_at", "aliases", "used by")]
    published = lake.versions(root)
    # Versions that are gone but still named (a forced deletion) show up too.
    for version in published + sorted(set(uses) - set(published)):
        if version in published:
            created = str(lake.read_json(posixpath.join(root, version, MANIFEST))["created_at"])
        else:
            created = "(not published)" if version != "*" else "(any)"
        mine = uses.get(version, [])
        names = ", ".join(text.removeprefix("alias ") for kind, text in mine if kind == "alias")
        others = "; ".join(text for kind, text in mine if kind != "alias")
        rows.append((version, created[:19], names or "-", others or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join([*(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)), r[3]])
        for r in rows
    )


class Heartbeat:
    """A replica's heartbeat: a daemon thread rewrites it every ``every_s`` (and on ``beat``).

    The lake I/O stays on that thread, off any event loop. A failed write is logged once per
    streak of failures and never reaches a request; a stale heartbeat only means that
    ``delete_version`` no longer sees this replica as a user.
    """

    def __init__(
        self,
        lake: Lake,
        name: str,
        app_name: str,
        replica_id: str,
        version: Callable[[], str],
        every_s: float = HEARTBEAT_S,
    ) -> None:
        self.lake, self.name, self.app_name, self.replica_id = lake, name, app_name, replica_id
        self.rel = heartbeat_rel(name, app_name, replica_id)
        self.every_s = every_s
        self._version = version
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failing = False
        """Whether the last write failed (the streak's first failure was logged)."""

    def write(self) -> bool:
        """Write the heartbeat now; False (and one warning per streak) when it fails."""
        try:
            write_heartbeat(self.lake, self.name, self.app_name, self.replica_id, self._version())
        except Exception as exc:  # never fail serving over a heartbeat
            if not self.failing:
                log.warning(
                    "could not write the heartbeat %s (%s); retrying every %.0f s, and until "
                    "it works registry deletion may not see that this replica serves its version",
                    self.rel,
                    exc,
                    self.every_s,
                )
            self.failing = True
            return False
        if self.failing:
            log.info("heartbeat %s written again", self.rel)
        self.failing = False
        return True

    def start(self) -> None:
        """Write the first heartbeat now, then keep writing from a daemon thread."""
        self.write()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self.app_name}", daemon=True
        )
        self._thread.start()

    def beat(self) -> None:
        """Ask the thread to write at once (after a version switch); no I/O on the caller."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.every_s)
            self._wake.clear()
            if not self._stop.is_set():
                self.write()

    def stop(self, remove: bool = True, timeout_s: float = 5.0) -> None:
        """Stop the thread and (by default) remove the heartbeat: this replica serves no more."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if remove:
            try:
                self.lake.remove(self.rel)
            except Exception as exc:  # it goes stale after LIVE_S anyway
                log.warning("could not remove the heartbeat %s (%s)", self.rel, exc)
