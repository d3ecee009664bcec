"""One typed config for every ScaleRec stage: YAML file + dotted command-line overrides.

Every job calls ``load_config(path, overrides)``; each stage then receives only its own section
(``cfg.data``, ``cfg.train`` ...). Ray workers receive ``section.model_dump()`` and re-validate it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

MOVIELENS_VARIANTS = ("ml-latest-small", "ml-100k", "ml-1m", "ml-20m", "ml-25m")


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the offending key."""


# Ray runs a submitted job (and `serve deploy`'s app builder) in a temporary copy of its working
# directory: a relative output path resolved there vanishes with the job, unseen by other nodes.
_RAY_WORKING_DIR_MARK = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"


def in_ray_working_dir_copy() -> bool:
    """Whether this process runs inside Ray's temporary copy of a job's ``--working-dir``."""
    return _RAY_WORKING_DIR_MARK in os.getcwd() + os.sep


def _absolute(value: str) -> str:
    """Local paths made absolute against the launch directory; URIs (``s3://``) unchanged."""
    if not value or "://" in value:
        return value
    return os.path.abspath(os.path.expanduser(value))


def _absolute_output(value: str) -> str:
    """Like ``_absolute``, refusing a relative output path inside a Ray job's working copy."""
    if value and "://" not in value and not os.path.isabs(os.path.expanduser(value)):
        if in_ray_working_dir_copy():
            raise ValueError(
                f"{value!r} is a relative path, and this process runs in Ray's temporary copy of "
                f"the job's working directory ({os.getcwd()}), deleted with the job and unseen by "
                "other nodes: pass an absolute path that every node shares "
                "(lake=/mnt/shared/lake) or an object-store URI (lake=s3://bucket/lake)"
            )
    return _absolute(value)


InputPath = Annotated[str, AfterValidator(_absolute)]
"""A local path (made absolute where the config is loaded) or a URI such as ``s3://b/p``."""
OutputPath = Annotated[str, AfterValidator(_absolute_output)]
"""Like ``InputPath``, for what a stage writes: never relative inside a Ray job's working copy."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class ColumnMap(_Args):
    """Which raw column holds each field of an interaction."""

    user: str = "userId"
    """Raw column with the user id (any type; stored as a string)."""
    item: str = "movieId"
    """Raw column with the item id (any type; stored as a string)."""
    timestamp: str = "timestamp"
    """Raw column with the event time (see ``DataArgs.timestamp_unit``)."""
    rating: str | None = None
    """Optional raw column with an explicit rating (kept as the interaction weight)."""
    weight: str | None = None
    """Optional raw column with a non-negative weight; wins over ``rating`` when both are set."""
    event: str | None = None
    """Optional raw column with an event type (click, view, purchase ...)."""


class SyntheticArgs(_Args):
    """Synthetic interaction generator: latent-factor users/items with power-law popularity."""

    n_users: int = Field(2_000, ge=1)
    """Number of users."""
    n_items: int = Field(1_000, ge=1)
    """Number of items."""
    n_interactions: int = Field(50_000, ge=1)
    """Number of raw interaction events (before dedupe)."""
    dim: int = Field(16, ge=1)
    """Dimension of the hidden user/item factors."""
    popularity_exponent: float = Field(1.0, ge=0.0)
    """Zipf exponent of item popularity (0 = uniform)."""
    n_files: int = Field(1, ge=1)
    """Number of raw files to split the events across."""
    format: Literal["csv", "parquet", "jsonl"] = "parquet"
    """Raw format to write."""
    n_genres: int = Field(12, ge=1)
    """Number of item genres (item side feature)."""
    seed: int = 0
    """Random seed; the same seed gives the same files."""


class DataArgs(_Args):
    """Where the raw interactions come from and how to ingest them."""

    name: str = "dataset"
    """Dataset name in the lake: ``<lake>/datasets/<name>/<version>/``."""
    source: Literal["files", "movielens", "synthetic", "events"] = "files"
    """``files``: raw files at ``path``; ``movielens``: a MovieLens variant; ``synthetic``;
    ``events``: newest version of ``name`` + events logged since (``app.ingest.events_source``)."""
    path: InputPath = ""
    """Local folder/file or ``s3://bucket/prefix`` with the raw files (or where a variant lives)."""
    format: Literal["csv", "parquet", "jsonl"] = "csv"
    """Raw file format for ``source: files``."""
    glob: str | None = None
    """Optional file-name pattern inside ``path`` (default: every file with the format's suffix)."""
    variant: Literal["ml-latest-small", "ml-100k", "ml-1m", "ml-20m", "ml-25m"] = "ml-latest-small"
    """MovieLens variant for ``source: movielens``."""
    download: bool = False
    """Download the MovieLens variant from GroupLens into ``path`` when it is missing."""
    columns: ColumnMap = ColumnMap()
    """Raw column names."""
    event_weights: dict[str, float] = Field(default_factory=dict)
    """Weight per event type (``{view: 1, purchase: 5}``); other event values are quarantined."""
    timestamp_unit: Literal["s", "ms", "iso"] = "s"
    """Timestamps are Unix seconds, Unix milliseconds or ISO-8601 strings."""
    delimiter: str = Field(",", min_length=1, max_length=1)
    """CSV field delimiter."""
    encoding: str = "utf-8"
    """Text encoding of CSV/JSONL files; rows that do not decode are quarantined."""
    item_features: InputPath | None = None
    """Optional CSV with item side features (``item id column,...,genres``), e.g. movies.csv."""
    item_features_id_column: str = "movieId"
    """Item id column of ``item_features``."""
    genres_column: str = "genres"
    """Column of ``item_features`` with ``|``-separated genres."""
    synthetic: SyntheticArgs = SyntheticArgs()
    """Generator settings for ``source: synthetic``."""
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    """Per user, the last ceil(test_fraction * n) interactions are test."""
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Per user, the last ceil(valid_fraction * rest) of the remainder are validation."""

    @model_validator(mode="after")
    def _needs_path(self) -> DataArgs:
        if self.source in ("files", "movielens") and not self.path:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        return self


class ModelArgs(_Args):
    """Which recommender to build and its hyperparameters."""

    name: Literal["popularity", "ease", "edlae", "mf", "two_tower", "seq_ae"] = "mf"
    """Model family."""
    version: str | None = None
    """Registry version or alias (``production``, ``staging``) to load, for evaluate/serve."""
    embed_dim: int = Field(128, ge=1, description="Embedding size of the torch models.")
    loss: Literal["bpr", "softmax"] = "softmax"
    """Training loss: BPR with sampled negatives, or sampled softmax."""
    num_negatives: int = Field(256, ge=1)
    """Negatives per batch (softmax) or per positive (BPR)."""
    l2: float = Field(1e-3, ge=0.0)
    """L2 penalty on the embeddings used in a batch."""
    logq: bool = True
    """Correct sampled-softmax logits by the log sampling probability (popularity bias)."""
    use_bias: bool = False
    """Learn a per-item bias in matrix factorisation."""
    normalize: bool = Field(False, description="MF: cosine scores (unit-length vectors) / T.")
    history_dropout: float = Field(0.3, ge=0.0, lt=1.0)
    """Two-tower, seq_ae: drop this share of a user's history items while training."""
    temperature: float = Field(0.1, gt=0.0, description="Softmax temperature.")
    ease_lambda: float = Field(500.0, gt=0.0, description="EASE ridge strength.")
    ease_max_items: int = Field(40_000, ge=1)
    """Refuse EASE/EDLAE above this many items (the item-item matrix is dense)."""
    edlae_lambda: float = Field(500.0, gt=0.0, description="EDLAE ridge strength.")
    edlae_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """EDLAE emphasised-denoising dropout rate p (0 = EASE's objective)."""
    edlae_zero_diagonal: bool = True
    """Constrain the item-item diagonal to zero (EDLAE) or not (DLAE)."""
    recency_tau: float = Field(5.0, ge=0.0)
    """EDLAE, seq_ae: weight history items by exp(-rank_from_latest / tau); 0 = binary."""
    seq_window: float = Field(0.25, gt=0.0, le=1.0)
    """seq_ae: a sample cut at position c predicts the next ceil(seq_window * c) items."""
    seq_cuts: float = Field(4.0, gt=0.0, description="seq_ae: samples per user per epoch.")
    seq_min_cut: float = Field(0.3, ge=0.0, lt=1.0, description="seq_ae: earliest cut (share).")


class TrainArgs(_Args):
    """Ray Train settings."""

    num_workers: int = Field(1, ge=0)
    """Data-parallel workers (0 runs the loop in the driver)."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """Logical CPUs per worker; keep below 1 on a 2-core machine so Ray Data can run."""
    worker_resources: dict[str, float] = {}
    """Custom resources per worker: ``{"train_slot": 1}`` places one per node holding one."""
    use_gpu: bool = False
    """Train on GPUs (NCCL) when the cluster has them."""
    epochs: int = Field(50, ge=1)
    """Training epochs."""
    batch_size: int = Field(1024, ge=1)
    """Interactions per batch per worker."""
    cache_shard: bool = True
    """Hold each worker's shard in memory after one read (16 bytes a row); false streams it."""
    lr: float = Field(0.005, gt=0.0)
    """Adam learning rate."""
    max_failures: int = Field(2, ge=0)
    """Worker-group restarts allowed; each resumes from the last checkpoint."""
    eval_every: int = Field(1, ge=1)
    """Compute validation NDCG@10 every N epochs."""
    refit: bool = False
    """Fit on train + validation (for the final model) instead of train only."""
    refit_final: bool = True
    """Register a refit on train + validation at the best epoch count (false: the first fit)."""
    promote_to: Literal["none", "staging", "production"] = "staging"
    """Alias to point at the newly registered model (production goes through the gate)."""


class TuneArgs(_Args):
    """Ray Tune search settings."""

    num_samples: int = Field(8, ge=1)
    """Trials to run."""
    max_concurrent_trials: int = Field(1, ge=1)
    """Trials running at once."""
    grace_period: int = Field(3, ge=1)
    """ASHA: epochs before a trial can be stopped."""
    max_epochs: int = Field(20, ge=1)
    """ASHA: the longest a trial runs."""
    search_space: dict[str, Any] = Field(default_factory=dict)
    """Override the default search space: ``{"model.embed_dim": [32, 64, 128], ...}``."""
    searcher: Literal["optuna", "random"] = "optuna"
    """Optuna (TPE) through Ray Tune, or Tune's own random search."""
    resume: bool = False
    """Resume the experiment at ``<lake>/tune/<name>`` after a driver crash (Tuner.restore)."""
    name: str | None = None
    """Experiment folder name (default: the dataset name)."""
    promote_to: Literal["none", "staging", "production"] = "staging"
    """Alias to point at the refit best model."""


class EventsArgs(_Args):
    """The online store of live events (``app.events``), read by serving and by ingest."""

    backend: Literal["embedded", "redis"] = "embedded"
    """``embedded``: a log in the lake, no extra server; ``redis``: a Redis server (AOF on)."""
    redis_url: str = "redis://127.0.0.1:6379/0"
    """Redis server of the ``redis`` backend."""
    history_cap: int = Field(200, ge=1)
    """Live events kept per user (the latest); all stay in the log for ingest."""
    dedupe_window: int = Field(1000, ge=1)
    """Embedded: event ids remembered per user (a retry within the window dedupes)."""
    dedupe_ttl_s: float = Field(7 * 86_400.0, gt=0.0)
    """Redis: how long an event id is remembered for idempotency."""
    types: list[str] = ["interaction", "view", "click", "cart", "purchase", "rating"]
    """Event types ``POST /events`` accepts; others are rejected entry by entry (422)."""


class ServeArgs(_Args):
    """Ray Serve application settings, the base of ``app.serve.ServeAppArgs``.

    A pipeline run deploys the Serve config named by ``config`` and overrides its ``host``,
    ``port`` and ``cache_size`` with this section's (``app.serve.args.resolve_settings`` decides).
    """

    model: str = "production"
    """Registry version or alias to serve."""
    events: EventsArgs = EventsArgs()
    """The online store of live events."""
    host: str = "127.0.0.1"
    """HTTP host (a Serve config's ``http_options`` win over its ``args``)."""
    port: int = Field(8000, ge=1, le=65535)
    """HTTP port (a Serve config's ``http_options`` win over its ``args``)."""
    default_k: int = Field(10, ge=1)
    """Default number of recommendations."""
    max_k: int = Field(100, ge=1)
    """Largest k a request may ask for."""
    cache_size: int = Field(10_000, ge=0)
    """Answers kept in each ingress replica's LRU cache (0 disables it)."""
    cache_ttl_s: float = Field(60.0, gt=0.0)
    """Seconds a cached answer lives."""
    max_batch_size: int = Field(32, ge=1)
    """Most requests scored in one batch."""
    batch_wait_timeout_s: float = Field(0.0, ge=0.0)
    """Longest a batch waits for more requests (0: take what is queued, no added wait).

    In the ingress a batch waits for the *wave*, the recent peak of concurrent requests
    (``app.serve.coalesce``): it merges a closed loop's clients into one scoring pass instead
    of two half-size ones. An idle request never waits; after a drop in load, one batch
    waits at most this long."""
    max_in_flight: int = Field(1, ge=1)
    """Ingress: concurrent retriever calls per replica; requests arriving meanwhile are batched.

    1 makes the largest batches (best on one machine); raise it to the number of retriever
    replicas when the retriever autoscales."""
    quantize: Literal["none", "fp16", "int8"] = "none"
    """Compressed embedding variant to serve."""
    ann_min_items: int | None = Field(None, ge=0)
    """Catalogues with at least this many items are searched with a faiss HNSW index
    (approximate, ``app/serve/ann.py``), smaller ones exactly; None (default): always exact.
    Recall depends on the embeddings: check it with ``python -m bench.retrieval`` first."""
    ann_ef_search: int = Field(256, ge=1)
    """HNSW search effort per query: higher is closer to exact and slower."""
    admin_token_env: str = "SCALEREC_ADMIN_TOKEN"
    """Environment variable holding the bearer token for /admin endpoints."""
    config: InputPath = Field("serve_configs/local.yaml", validate_default=True)
    """Serve config (deployments, autoscaling) the pipeline deploys with."""
    after_pipeline: Literal["serve", "sample", "skip"] = "serve"
    """``make run``'s last step: keep serving until Ctrl-C, exit after a sample answer, or skip."""


class ClusterArgs(_Args):
    """Where Ray runs."""

    address: str | None = None
    """Ray address (``auto`` or ``ray://...``); empty starts an embedded local cluster."""
    num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of the embedded cluster (default: the machine's)."""
    progress_bars: bool = True
    """Show Ray Data progress bars."""


class AppConfig(_Args):
    """The whole ScaleRec configuration; each stage reads only its own section."""

    lake: OutputPath = Field("./lake", validate_default=True)
    """Lake root: a local folder (relative to where the job is launched) or ``s3://bucket/prefix``."""
    seed: int = 42
    """Global seed for data splits, initialisation and sampling."""
    data: DataArgs = DataArgs(source="synthetic")
    """Ingestion."""
    model: ModelArgs = ModelArgs()
    """Model."""
    train: TrainArgs = TrainArgs()
    """Training."""
    tune: TuneArgs = TuneArgs()
    """Hyperparameter search."""
    serve: ServeArgs = ServeArgs()
    """Serving."""
    cluster: ClusterArgs = ClusterArgs()
    """Ray cluster."""


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``key="a.b.c"``, creating sections on the way."""
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` strings; values are read as YAML scalars (numbers, bools, lists)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(
                f"bad override {item!r}: expected dotted.key=value, e.g. train.lr=3e-4"
            )
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key.strip(), value))
    return parsed


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {key}: {msg} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> AppConfig:
    """Read a YAML config, apply dotted overrides and validate.

    ``model=<version|alias>`` is shorthand for ``model.version=<version|alias>``.

    Raises:
        ConfigError: naming the file, the key and the problem.
    """
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p} (see jobs/configs/ for examples)")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        tree = loaded
        source = str(p)
    for key, value in parse_overrides(overrides or []):
        if key == "model" and not isinstance(value, dict):
            key = "model.version"
            value = str(value)
        set_dotted(tree, key, value)
    try:
        return AppConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None


def config_to_yaml(cfg: AppConfig) -> str:
    """Render a resolved config as YAML (logged by every job, stored with every model)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
