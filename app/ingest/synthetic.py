"""Synthetic interactions: a latent-factor generator with power-law popularity and heavy tails.

``generate_synthetic(args, out_dir)`` writes raw interaction files and an ``items.csv`` of genres;
``cached_synthetic(args, cache_dir)`` generates them once per distinct ``args`` under
``cache_dir`` and reuses them afterwards. The same ``args`` always give the same bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor, wait

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.config import ColumnMap, SyntheticArgs
from app.ingest.errors import SourceError
from app.ingest.writers import ChunkSink
from app.store import Lake, content_id

SYNTHETIC_COLUMNS = ColumnMap(
    user="user_id",
    item="item_id",
    timestamp="timestamp",
    rating="rating",
    weight=None,
    event="event",
)
"""Columns of the synthetic raw files."""
SYNTHETIC_ITEMS_FILE = "items.csv"
"""Item features CSV (``item_id,genres``) written next to the synthetic interactions."""
SYNTHETIC_EVENTS = ("view", "click", "purchase")

_EXT = {"csv": ".csv", "parquet": ".parquet", "jsonl": ".jsonl"}
_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("timestamp", pa.int64()),
        ("rating", pa.float32()),
        ("event", pa.string()),
    ]
)
# Bump when the generator's output changes, so cached synthetic data is regenerated.
_GENERATOR_VERSION = 2
_SUCCESS = "_SUCCESS"
# Users are generated in chunks of about this many events (bounds memory; one row group each).
_CHUNK_EVENTS = 1_000_000
# Affinities are computed this many candidates at a time (a gathered (n, dim) float32 block each).
_AFFINITY_BATCH = 1_000_000
# Candidates drawn from the popularity distribution per event before reweighting by affinity:
# a larger pool lets taste reach beyond the head of the catalogue.
_POOL_PER_EVENT = 16
# Share of a user's events that re-use one of their items (re-views, repeat purchases).
_REPEAT_RATE = 0.1
# Standard deviation of a user·item affinity; exp(affinity) tilts popularity towards taste.
# With the pool above, taste explains about as much beyond popularity as in MovieLens, where
# a personal model (EASE) beats popularity by a wide margin (docs/performance.md, quality).
_AFFINITY_STD = 3.0
_T_END = 1_704_067_200  # 2024-01-01T00:00:00Z: fixed so that a seed gives the same files
_WINDOW_S = 2 * 365 * 86_400
_GENRE_NAMES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
)  # fmt: skip


def cached_synthetic(args: SyntheticArgs, cache_dir: str) -> tuple[str, list[str]]:
    """Generate the files for ``args`` once under ``cache_dir`` and return them.

    The folder is named after a hash of ``args`` and the generator version and is complete once
    it holds ``_SUCCESS``; concurrent callers each generate into a staging folder and the first
    rename wins.

    Returns:
        ``(folder, interaction files sorted)``; the folder also holds ``items.csv``.
    """
    key = content_id({"generator": _GENERATOR_VERSION, **args.model_dump(mode="json")})
    if "://" in cache_dir:  # an object store: generate locally, upload, ``_SUCCESS`` last
        return _cached_remote(args, Lake(cache_dir.rstrip("/") + f"/synthetic-{key}"))
    final = os.path.join(cache_dir, f"synthetic-{key}")
    if not os.path.isfile(os.path.join(final, _SUCCESS)):
        os.makedirs(cache_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".synthetic-", dir=cache_dir)
        try:
            generate_synthetic(args, staging)
            with open(os.path.join(staging, _SUCCESS), "w"):
                pass
            if os.path.isdir(final) and not os.path.isfile(os.path.join(final, _SUCCESS)):
                shutil.rmtree(final)  # a crashed earlier attempt
            try:
                os.replace(staging, final)
            except OSError:
                if not os.path.isfile(os.path.join(final, _SUCCESS)):
                    raise  # otherwise a concurrent run finished first: use its files
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    ext = _EXT[args.format]
    paths = sorted(
        os.path.join(final, name)
        for name in os.listdir(final)
        if name.startswith("interactions-") and name.endswith(ext)
    )
    return final, paths


def _cached_remote(args: SyntheticArgs, final: Lake) -> tuple[str, list[str]]:
    if not final.exists(_SUCCESS):
        final.remove("")  # a crashed earlier upload
        with tempfile.TemporaryDirectory(prefix="scalerec-synthetic-") as local:
            generate_synthetic(args, local)
            for name in sorted(os.listdir(local)):
                final.fs.put_file(os.path.join(local, name), final.path(name))
        final.write_bytes(_SUCCESS, b"")
    ext = _EXT[args.format]
    names = [n for n in final.listdir("") if n.startswith("interactions-") and n.endswith(ext)]
    return final.uri, [final.full_uri(n) for n in names]


def generate_synthetic(args: SyntheticArgs, out_dir: str) -> list[str]:
    """Write synthetic raw interactions (and ``items.csv`` with genres) into ``out_dir``.

    Users and items get Gaussian factors. Item popularity is Zipf-like with
    ``popularity_exponent``; user activity is lognormal with at least 3 events per user. Each
    event picks an item with probability ∝ popularity × exp(user·item affinity), sampled by drawing
    a popularity-distributed candidate pool per user and resampling it by affinity. Timestamps
    increase per user within a personal sub-window of a 2-year span. Ratings (0.5 to 5.0) and
    event types (view, click, purchase) rise with affinity. The same ``args`` give the same bytes.

    Returns:
        The interaction files (``interactions-00000-of-0000N.<ext>``), sorted.

    Raises:
        SourceError: when ``n_interactions < 3 * n_users``.
    """
    if args.n_interactions < 3 * args.n_users:
        raise SourceError(
            f"data.synthetic.n_interactions={args.n_interactions} is below 3 events for each of "
            f"data.synthetic.n_users={args.n_users}; raise n_interactions or lower n_users"
        )
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    # factor std chosen so that a user·item dot product has standard deviation _AFFINITY_STD
    scale = np.sqrt(_AFFINITY_STD / np.sqrt(args.dim))
    user_f = (rng.standard_normal((args.n_users, args.dim)) * scale).astype(np.float32)
    item_f = (rng.standard_normal((args.n_items, args.dim)) * scale).astype(np.float32)
    rank_to_item = rng.permutation(args.n_items)  # which item has popularity rank r
    _write_items(args, item_f, rng, os.path.join(out_dir, SYNTHETIC_ITEMS_FILE))

    counts = _user_counts(args, rng)
    starts, spans = _user_windows(args.n_users, rng)
    ext = _EXT[args.format]
    n_files = min(args.n_files, args.n_interactions)  # no empty files
    paths = [
        os.path.join(out_dir, f"interactions-{i:05d}-of-{n_files:05d}{ext}") for i in range(n_files)
    ]
    bounds = np.linspace(0, args.n_interactions, n_files + 1).astype(np.int64)
    sink = ChunkSink(args.format, paths, bounds, _SCHEMA, _CHUNK_EVENTS)
    ends = np.cumsum(counts)
    # cut the user range wherever the cumulative event count crosses a chunk boundary
    cuts = np.searchsorted(ends, np.arange(_CHUNK_EVENTS, ends[-1], _CHUNK_EVENTS), side="left")
    cuts = np.unique(np.concatenate([[0], cuts + 1, [args.n_users]]))
    with tqdm(
        total=args.n_interactions,
        unit="ev",
        unit_scale=True,
        desc="synthetic",
        disable=args.n_interactions < 2_000_000,
    ) as bar:
        # one writer thread: Arrow encodes and writes chunk k while numpy samples chunk k + 1
        with ThreadPoolExecutor(max_workers=1) as writer:
            pending: Future[None] | None = None
            try:
                for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
                    table = _sample_chunk(
                        args, rng, np.arange(lo, hi), counts[lo:hi], starts[lo:hi],
                        spans[lo:hi], user_f, item_f, rank_to_item,
                    )  # fmt: skip
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(sink.write, table)
                    bar.update(table.num_rows)
                if pending is not None:
                    pending.result()
            finally:
                if pending is not None:
                    pending.cancel()
                    wait([pending])
                sink.close()
    return paths


def _user_counts(args: SyntheticArgs, rng: np.random.Generator) -> np.ndarray:
    """Heavy-tailed (lognormal) events per user, each >= 3, summing to ``n_interactions``."""
    activity = rng.lognormal(mean=0.0, sigma=1.2, size=args.n_users)
    extra = rng.multinomial(args.n_interactions - 3 * args.n_users, activity / activity.sum())
    return extra.astype(np.int64) + 3


def _user_windows(n_users: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Each user's first active second and active span, inside the 2-year window."""
    t0 = _T_END - _WINDOW_S
    starts = t0 + (rng.random(n_users) * 0.9 * _WINDOW_S).astype(np.int64)
    spans = ((_T_END - starts) * rng.uniform(0.05, 1.0, n_users)).astype(np.int64)
    return starts, np.maximum(spans, 1)


def _zipf_ranks(n: int, exponent: float, size: int, rng: np.random.Generator) -> np.ndarray:
    """Popularity ranks with P(rank r) ≈ (r + 1)^-exponent, vectorised.

    Inverts the CDF of a continuous power law on [0.5, n + 0.5) and rounds: rank r gets the mass
    of [r + 0.5, r + 1.5), whose midpoint rule is (r + 1)^-exponent.
    """
    lo, hi = 0.5, n + 0.5
    x = rng.random(size)
    if abs(exponent - 1.0) < 1e-9:  # x = lo * (hi / lo) ** u, in place
        x *= np.log(hi / lo)
        np.exp(x, out=x)
        x *= lo
    else:  # x = (lo**a + u * (hi**a - lo**a)) ** (1 / a), in place
        a = 1.0 - exponent
        x *= hi**a - lo**a
        x += lo**a
        np.log(x, out=x)
        x *= 1.0 / a
        np.exp(x, out=x)
    x += 0.5
    ranks = x.astype(np.int64)
    ranks -= 1
    return np.clip(ranks, 0, n - 1, out=ranks)


def _sample_chunk(
    args: SyntheticArgs,
    rng: np.random.Generator,
    users: np.ndarray,
    counts: np.ndarray,
    starts: np.ndarray,
    spans: np.ndarray,
    user_f: np.ndarray,
    item_f: np.ndarray,
    rank_to_item: np.ndarray,
) -> pa.Table:
    """Sample the events of a contiguous block of users, grouped by user in time order."""
    n_events = int(counts.sum())
    n_local = len(users)
    # Candidate pool: _POOL_PER_EVENT popularity-distributed draws per event, deduped per user
    # (the multiplicity keeps the popularity weight).
    pool_local = np.repeat(np.arange(n_local, dtype=np.int64), counts * _POOL_PER_EVENT)
    pool_item = rank_to_item[
        _zipf_ranks(args.n_items, args.popularity_exponent, len(pool_local), rng)
    ]
    keys, mult = np.unique(pool_local * args.n_items + pool_item, return_counts=True)
    cand_local, cand_item = keys // args.n_items, keys % args.n_items
    affinity = np.empty(len(keys), dtype=np.float32)
    for b in range(0, len(keys), _AFFINITY_BATCH):
        sl = slice(b, b + _AFFINITY_BATCH)
        # np.take gathers rows faster than fancy indexing
        rows_u = np.take(user_f, users[0] + cand_local[sl], axis=0)
        affinity[sl] = np.einsum("ij,ij->i", rows_u, np.take(item_f, cand_item[sl], axis=0))
    # Gumbel top-k per user on log(multiplicity) + affinity: distinct items drawn
    # ∝ popularity × exp(affinity). A few events re-use one of the user's items (re-views), and
    # users whose pool is too small for their count get repeats too.
    score = affinity + np.log(mult) + rng.gumbel(size=len(keys))
    n_cand = np.bincount(cand_local, minlength=n_local)
    n_pick = np.minimum(counts - rng.binomial(counts - 1, _REPEAT_RATE), n_cand)
    # by user, best score first: the fraction in (0, 0.5) falls as the score rises (one float
    # argsort instead of a two-key np.lexsort; below 0.5 so that rounding never carries a key into
    # the next user)
    order = np.argsort(cand_local + 0.5 / (1.0 + np.exp(np.clip(score, -30.0, 30.0))))
    rank = np.arange(len(order)) - np.repeat(np.cumsum(n_cand) - n_cand, n_cand)
    picked = order[rank < np.repeat(n_pick, n_cand)]
    n_fill = counts - n_pick
    fill = picked[
        np.repeat(np.cumsum(n_pick) - n_pick, n_fill)
        + (rng.random(int(n_fill.sum())) * np.repeat(n_pick, n_fill)).astype(np.int64)
    ]
    chosen = np.concatenate([picked, fill])
    # group by user in random order: time order must not follow the score or the item id
    chosen = chosen[np.argsort(cand_local[chosen] + 0.5 * rng.random(n_events))]
    items = cand_item[chosen]
    aff = affinity[chosen].astype(np.float64)
    aff = (aff - aff.mean()) / (aff.std() + 1e-9)  # standardised taste of the chosen events

    # timestamps: uniform in each user's window, sorted per user (one sort on user-offset keys)
    local = np.repeat(np.arange(len(users), dtype=np.int64), counts)
    offsets = (rng.random(n_events) * np.repeat(spans, counts)).astype(np.int64)
    time_keys = local * (_WINDOW_S + 1) + offsets
    time_keys.sort()
    timestamps = np.repeat(starts, counts) + (time_keys - local * (_WINDOW_S + 1))

    rating = np.clip(np.round((3.5 + 0.9 * aff + rng.normal(0.0, 0.6, n_events)) * 2) / 2, 0.5, 5)
    signal = aff + rng.normal(0.0, 0.7, n_events)
    event = np.where(signal > 1.6, 2, np.where(signal > 0.4, 1, 0)).astype(np.int32)
    events = pc.take(pa.array(SYNTHETIC_EVENTS), pa.array(event))
    return pa.table(
        [
            pa.array(np.repeat(users, counts), pa.int64()),
            pa.array(items, pa.int64()),
            pa.array(timestamps, pa.int64()),
            pa.array(rating.astype(np.float32), pa.float32()),
            events,
        ],
        schema=_SCHEMA,
    )


def _write_items(
    args: SyntheticArgs, item_f: np.ndarray, rng: np.random.Generator, path: str
) -> None:
    """Write ``item_id,genres``: 1-3 genres per item, its top scores under a random projection."""
    import pyarrow.csv as pacsv

    names = [
        _GENRE_NAMES[g] if g < len(_GENRE_NAMES) else f"Genre-{g}" for g in range(args.n_genres)
    ]
    projection = rng.standard_normal((args.dim, args.n_genres)).astype(np.float32)
    top = np.argsort(-(item_f @ projection), axis=1)[:, :3]
    n_genres = rng.integers(1, min(3, args.n_genres) + 1, size=args.n_items)
    flat = top[np.arange(top.shape[1]) < n_genres[:, None]]  # row-major: each item's best first
    offsets = np.concatenate([[0], np.cumsum(n_genres)]).astype(np.int32)
    lists = pa.ListArray.from_arrays(pa.array(offsets), pc.take(pa.array(names), pa.array(flat)))
    table = pa.table(
        {
            "item_id": pa.array(np.arange(args.n_items), pa.int64()),
            "genres": pc.binary_join(lists, "|"),
        }
    )
    pacsv.write_csv(table, path, pacsv.WriteOptions(quoting_style="needed"))
