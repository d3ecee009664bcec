"""Model registry: immutable model versions with lineage, aliases and a promotion gate.

Used by the train, tune, evaluate and serve stages (``python -m jobs.train`` registers,
``python -m jobs.evaluate model=<ref>`` reads). Layout of ``<lake>/models/<name>/``:

- ``<version>/weights.pt``: the model's ``state_dict()`` (loadable with ``weights_only=True``)
- ``<version>/config.yaml``: the resolved ``AppConfig``
- ``<version>/metrics.json``: metrics; the one file that may change after publishing
- ``<version>/lineage.json``: dataset name + version, code version, parent run, hparams
- ``<version>/manifest.json``: written last; its presence publishes the version
- ``aliases.json``: ``{"staging": <version>, "production": <version>}``
- ``promotions.jsonl``: one line per alias change (time, alias, version, previous, forced, reason)

A version id is ``<UTC timestamp>-<content hash>`` so that versions sort by time; registering
identical content (weights, config, dataset version) again returns the existing version.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import io
import json
import posixpath
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import yaml

from app.config import AppConfig, ModelArgs, config_to_yaml
from app.store.datasets import DatasetVersion, load_dataset
from app.store.lake import MANIFEST, Lake, LakeError, content_id

if TYPE_CHECKING:
    # torch is imported where weights are handled: ingest workers import app.store without it.
    import torch

    from app.models import Recommender

WEIGHTS = "weights.pt"
CONFIG = "config.yaml"
METRICS = "metrics.json"
LINEAGE = "lineage.json"
ALIASES_FILE = "aliases.json"
PROMOTIONS_FILE = "promotions.jsonl"
ALIASES = ("staging", "production")
GATE_METRIC = "valid_ndcg@10"
"""Validation metric a production candidate must not be worse on."""

ModelBuilder = Callable[..., "Recommender"]
"""``build_model(args, n_users, n_items, item_genres=None, seed=0)``-compatible factory."""


class RegistryError(LakeError):
    """A model name, version or alias cannot be resolved; the message lists what exists."""


class PromotionRefused(RegistryError):
    """The promotion gate refused a version (pass ``force=True`` to override)."""


@dataclass
class ModelRecord:
    """One published model version."""

    name: str
    version: str
    path: str
    """Full URI of the version folder."""
    config: dict[str, Any]
    """The resolved ``AppConfig`` it was trained with, as a dict."""
    metrics: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def registry_name(dataset: str, model: str) -> str:
    """Registry name of model family ``model`` on dataset ``dataset``: ``ml-latest-small-mf``."""
    return f"{dataset}-{model}"


def models_root(name: str) -> str:
    """Lake-relative folder holding every version of model ``name``."""
    if not name or "/" in name or name.startswith("."):
        raise RegistryError(f"invalid model name {name!r}")
    return posixpath.join("models", name)


def _version_rel(name: str, version: str) -> str:
    return posixpath.join(models_root(name), version)


def _state_hash(state: dict[str, torch.Tensor]) -> str:
    """Hash of the tensors' names, dtypes, shapes and values (independent of torch.save bytes)."""
    import torch

    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _code_version() -> dict[str, str | None]:
    """Git commit of the checkout (if any) and a hash of the ``app/`` sources."""
    app_dir = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(app_dir.rglob("*.py")):
        h.update(path.relative_to(app_dir).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    git = ["git", "-C", str(app_dir.parent), "rev-parse", "HEAD"]
    try:
        proc = subprocess.run(git, capture_output=True, text=True, timeout=5, check=False)
        commit = (proc.stdout.strip() or None) if proc.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"git_commit": commit, "sources_sha256": h.hexdigest()}


def list_versions(lake: Lake, name: str) -> list[str]:
    """Published versions of a model, oldest first."""
    return lake.versions(models_root(name))


def aliases(lake: Lake, name: str) -> dict[str, str]:
    """Current alias → version map of a model (empty when none is set)."""
    rel = posixpath.join(models_root(name), ALIASES_FILE)
    if not lake.exists(rel):
        return {}
    return {str(k): str(v) for k, v in lake.read_json(rel).items()}


def resolve(lake: Lake, name: str, ref: str | None) -> str:
    """Turn a version id, unique prefix, ``latest`` or alias into a published version id.

    Aliases are looked up here; everything else is ``Lake.resolve_version``.

    Raises:
        RegistryError: listing the published versions and aliases.
    """
    root = models_root(name)
    ref = (ref or "latest").strip()
    current = aliases(lake, name)
    if ref not in ALIASES and ref not in current:
        try:
            return lake.resolve_version(root, ref)
        except LakeError as err:
            raise RegistryError(f"model {name!r}: {err}; aliases: {current or 'none'}") from None
    if ref not in current:
        versions = ", ".join(list_versions(lake, name)) or "none"
        raise RegistryError(
            f"alias {ref!r} of model {name!r} is not set; promote a version first "
            f"(aliases: {current or 'none'}; versions: {versions})"
        )
    if not lake.is_published(_version_rel(name, current[ref])):
        raise RegistryError(
            f"alias {ref!r} of model {name!r} points at {current[ref]!r}, which is not "
            f"published under {lake.full_uri(root)}"
        )
    return current[ref]


def _read_record(lake: Lake, name: str, version: str) -> ModelRecord:
    rel = _version_rel(name, version)
    config = yaml.safe_load(lake.read_bytes(posixpath.join(rel, CONFIG))) or {}
    return ModelRecord(
        name=name,
        version=version,
        path=lake.full_uri(rel),
        config=config,
        metrics=lake.read_json(posixpath.join(rel, METRICS)),
        lineage=lake.read_json(posixpath.join(rel, LINEAGE)),
        manifest=lake.read_json(posixpath.join(rel, MANIFEST)),
    )


def get_record(lake: Lake, name: str, ref: str = "latest") -> ModelRecord:
    """Metadata of a version (no weights loaded)."""
    return _read_record(lake, name, resolve(lake, name, ref))


def _json_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {str(k): v.item() if isinstance(v, np.generic) else v for k, v in metrics.items()}


def register(
    lake: Lake,
    name: str,
    model: Recommender,
    cfg: AppConfig,
    dataset: DatasetVersion,
    metrics: dict[str, Any],
    lineage_extra: dict[str, Any] | None = None,
) -> ModelRecord:
    """Publish a fitted model as a new immutable version (or return the identical existing one).

    Args:
        lake: The lake to write to.
        name: Registry name (see ``registry_name``).
        model: The fitted model.
        cfg: The resolved config it was trained with.
        dataset: The dataset version it was trained on.
        metrics: Initial metrics (``valid_ndcg@10`` feeds the promotion gate).
        lineage_extra: Extra lineage, e.g. ``{"parent_run": ..., "checkpoint": ...}``.
    """
    import torch

    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    weights_hash = _state_hash(state)
    family = getattr(model, "family", type(model).__name__)
    digest = content_id(
        {
            "weights": weights_hash,
            "config": cfg.model_dump(mode="json"),
            "dataset": [dataset.name, dataset.version],
            "family": family,
        },
        length=8,
    )
    # The version id starts with a timestamp, so identical content is found by its hash.
    for existing in list_versions(lake, name):
        if existing.endswith(f"-{digest}"):
            return _read_record(lake, name, existing)

    now = dt.datetime.now(dt.timezone.utc)
    version = f"{now.strftime('%Y%m%dT%H%M%S')}-{digest}"
    # Microseconds: versions registered within one second still sort by ``created_at``.
    created_at = now.isoformat(timespec="microseconds")
    buf = io.BytesIO()
    torch.save(state, buf)
    lineage = {
        "model": name,
        "version": version,
        "family": family,
        "class": f"{type(model).__module__}.{type(model).__qualname__}",
        "n_users": int(model.n_users),
        "n_items": int(model.n_items),
        "hparams": model.hparams(),
        "dataset": {
            "name": dataset.name,
            "version": dataset.version,
            "uri": dataset.lake.full_uri(dataset.rel),
            "n_users": dataset.n_users,
            "n_items": dataset.n_items,
        },
        "code": _code_version(),
        "parent_run": None,
        "checkpoint": None,
        "created_at": created_at,
        **(lineage_extra or {}),
    }
    files = {
        WEIGHTS: buf.getvalue(),
        CONFIG: config_to_yaml(cfg).encode(),
        METRICS: json.dumps(_json_metrics(metrics), indent=2, sort_keys=True).encode(),
        LINEAGE: json.dumps(lineage, indent=2, sort_keys=True, default=str).encode(),
    }
    manifest = {
        "name": name,
        "version": version,
        "created_at": created_at,
        "content_id": digest,
        "weights_sha256": weights_hash,
        "files": {
            fname: hashlib.sha256(data).hexdigest()
            for fname, data in files.items()
            if fname != METRICS  # metrics.json stays mutable
        },
    }

    def write(stage: str) -> None:
        for fname, data in files.items():
            lake.fs.pipe_file(posixpath.join(stage, fname), data)

    lake.publish(_version_rel(name, version), write, manifest)
    return _read_record(lake, name, version)


def _lineage_genres(lake: Lake, lineage: dict[str, Any]) -> list[list[str]] | None:
    """Item genres of the lineage's dataset version, or None if it is not readable."""
    info = lineage.get("dataset") or {}
    try:
        return load_dataset(lake, info["name"], info["version"]).item_genres()
    except (LakeError, KeyError, FileNotFoundError, OSError):
        return None


def load_weights(lake: Lake, name: str, version: str) -> dict[str, torch.Tensor]:
    """The stored state dict of a version, loaded with ``weights_only=True`` on CPU."""
    import torch

    data = lake.read_bytes(posixpath.join(_version_rel(name, version), WEIGHTS))
    state: dict[str, torch.Tensor] = torch.load(
        io.BytesIO(data), weights_only=True, map_location="cpu"
    )
    return state


def load_model(
    lake: Lake, name: str, ref: str = "latest", builder: ModelBuilder | None = None
) -> tuple[Recommender, ModelRecord]:
    """Rebuild a registered model and load its weights.

    Args:
        lake: The lake.
        name: Registry name.
        ref: Version id, unique prefix, ``latest`` or an alias (``staging``, ``production``).
        builder: Model factory; default ``build_model`` of the models package.
    """
    record = get_record(lake, name, ref)
    if builder is None:
        from app.models import build_model

        builder = build_model
    args = ModelArgs.model_validate(record.config.get("model", {}))
    lineage = record.lineage
    model = builder(
        args,
        int(lineage["n_users"]),
        int(lineage["n_items"]),
        item_genres=_lineage_genres(lake, lineage),
        seed=int(record.config.get("seed", 0)),
    )
    model.load_state_dict(load_weights(lake, name, record.version))
    return model, record


def update_metrics(lake: Lake, name: str, version: str, metrics: dict[str, Any]) -> dict[str, Any]:
    """Merge ``metrics`` into a published version's ``metrics.json`` (atomic); return the result."""
    version = resolve(lake, name, version)
    merged = {**_stored_metrics(lake, name, version), **_json_metrics(metrics)}
    lake.write_json(posixpath.join(_version_rel(name, version), METRICS), merged)
    return merged


def promotions(lake: Lake, name: str) -> list[dict[str, Any]]:
    """Every promotion of a model, oldest first."""
    rel = posixpath.join(models_root(name), PROMOTIONS_FILE)
    if not lake.exists(rel):
        return []
    lines = lake.read_bytes(rel).decode().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _stored_metrics(lake: Lake, name: str, version: str) -> dict[str, Any]:
    rel = posixpath.join(_version_rel(name, version), METRICS)
    return dict(lake.read_json(rel)) if lake.exists(rel) else {}


def _gate_value(lake: Lake, name: str, version: str) -> float | None:
    value = _stored_metrics(lake, name, version).get(GATE_METRIC)
    return None if value is None else float(value)


def promote(
    lake: Lake, name: str, version: str, alias: str, force: bool = False, reason: str = ""
) -> dict[str, Any]:
    """Point ``alias`` at a version and log the promotion.

    Promotion to ``production`` is gated: it is refused when the candidate's validation NDCG@10
    (``valid_ndcg@10`` in ``metrics.json``) is below the current production model's, or missing
    while production has one, unless ``force``. Staging has no gate.

    Returns:
        The promotion log entry.

    Raises:
        PromotionRefused: with both NDCG values and the hint to pass ``force``.
    """
    if alias not in ALIASES:
        raise RegistryError(f"unknown alias {alias!r}; expected one of {', '.join(ALIASES)}")
    version = resolve(lake, name, version)
    current = aliases(lake, name)
    previous = current.get(alias)
    new_value = _gate_value(lake, name, version)
    old_value = _gate_value(lake, name, previous) if previous else None
    refused = (
        alias == "production"
        and previous is not None
        and previous != version
        and old_value is not None
        and (new_value is None or new_value < old_value)
    )
    if refused and not force:
        shown = "missing" if new_value is None else f"{new_value:.6f}"
        raise PromotionRefused(
            f"refusing to promote {name} {version} to production: {GATE_METRIC} {shown} is below "
            f"the current production {previous} ({old_value:.6f}); pass force=True "
            f"(CLI: --force) to promote anyway"
        )
    entry = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "alias": alias,
        "version": version,
        "previous": previous,
        "forced": bool(refused and force),
        "reason": reason,
        GATE_METRIC: new_value,
        f"previous_{GATE_METRIC}": old_value,
    }
    current[alias] = version
    root = models_root(name)
    lake.write_json(posixpath.join(root, ALIASES_FILE), current)
    lake.append_line(posixpath.join(root, PROMOTIONS_FILE), json.dumps(entry, sort_keys=True))
    return entry
