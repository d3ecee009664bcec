"""Ingest stage: raw interaction logs → validated, deduplicated, indexed, split dataset version.

Run by ``python -m jobs.ingest --config jobs/configs/<name>.yaml`` (also under ``ray job submit``).

Ray Data pipeline::

    read (CSV / JSONL streamed per file, Parquet per row group) → validate every row
      → hash-shuffle by user → per user: dedupe (user, item) at the first event, temporal split
      → stage to Parquet → quarantine bad rows, build id maps, encode and write train/valid/test
      → manifest.json (published last)

Every input row ends up ingested, quarantined with a reason, or collapsed as a duplicate, per file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import time
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.config import DataArgs
from app.dataset import (
    GENRES,
    INTERACTION_SCHEMA,
    ITEM_ID,
    ITEM_IDX,
    SPLITS,
    TIMESTAMP,
    USER_ID,
    USER_IDX,
    WEIGHT,
    DatasetVersion,
    datasets_root,
    load_dataset,
)
from app.lake import MANIFEST, Lake, content_id, filesystem_for, s3_storage_options, utc_now
from app.sources import RawSource, resolve_source

log = logging.getLogger(__name__)

# Columns of the normalised rows between pipeline steps.
FILE = "file"
ROW = "row"
USER = "user"
ITEM = "item"
TS = "ts"
W = "w"
REASON = "reason"
RAW = "raw"
STATUS = "status"
QUARANTINED = "quarantined"
DUPLICATE = "duplicate"

NORMAL_SCHEMA = pa.schema(
    [
        (FILE, pa.string()),
        (ROW, pa.int64()),
        (USER, pa.string()),
        (ITEM, pa.string()),
        (TS, pa.int64()),
        (W, pa.float32()),
        (REASON, pa.string()),
        (RAW, pa.string()),
    ]
)
STAGED_SCHEMA = NORMAL_SCHEMA.append(pa.field(STATUS, pa.string()))
QUARANTINE_SCHEMA = pa.schema(
    [(FILE, pa.string()), (ROW, pa.int64()), (REASON, pa.string()), (RAW, pa.string())]
)

# Version ids change when the pipeline's output format changes.
PIPELINE_VERSION = 1
_CSV_BLOCK_BYTES = 16 << 20
_ID_PAD = 20


class IngestError(ValueError):
    """Input that cannot be ingested at all (not a per-row problem); says what to fix."""


# ---------------------------------------------------------------- reading


def _csv_batches(path: str, src: dict[str, Any]) -> Iterator[pa.Table]:
    """Stream one CSV file as normalised tables; malformed lines become quarantine rows."""
    fs, p = filesystem_for(path, src.get("storage_options"))
    wanted = _wanted_columns(src)
    bad: list[tuple[int, str, str]] = []

    def on_invalid(row: Any) -> str:
        bad.append(
            (
                row.number if row.number is not None else -1,
                f"malformed CSV row: expected {row.expected_columns} fields, "
                f"got {row.actual_columns}",
                row.text,
            )
        )
        return "skip"

    with fs.open(p, "rb") as f:
        try:
            reader = pacsv.open_csv(
                f,
                read_options=pacsv.ReadOptions(
                    encoding=src["encoding"], block_size=_CSV_BLOCK_BYTES
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=src["delimiter"], invalid_row_handler=on_invalid
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.binary() for c in wanted},
                    include_columns=None,
                    strings_can_be_null=True,
                ),
            )
        except pa.ArrowInvalid as exc:
            if "Empty CSV file" in str(exc):
                return
            raise IngestError(f"{path}: cannot parse as CSV: {exc}") from None
        _check_columns(path, reader.schema.names, src)
        offset = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise IngestError(
                    f"{path}: CSV parsing stopped after {offset} rows: {exc}. "
                    "Check data.delimiter, data.encoding and quoting."
                ) from None
            table = pa.Table.from_batches([batch])
            yield _normalise(table, path, offset, src)
            offset += table.num_rows
            if bad:
                yield _bad_rows(path, bad)
                bad.clear()
    if bad:
        yield _bad_rows(path, bad)


def _jsonl_batches(path: str, src: dict[str, Any], chunk: int = 200_000) -> Iterator[pa.Table]:
    """Stream one JSON-lines file; lines that are not JSON objects are quarantined."""
    fs, p = filesystem_for(path, src.get("storage_options"))
    wanted = _wanted_columns(src)
    rows: list[dict[str, Any]] = []
    row_numbers: list[int] = []
    bad: list[tuple[int, str, str]] = []
    n = 0
    with fs.open(p, "rb") as f:
        for n, line in enumerate(f):
            if not line.strip():
                bad.append((n, "empty line", ""))
                continue
            try:
                obj = json.loads(line.decode(src["encoding"]))
            except UnicodeDecodeError:
                bad.append((n, f"not valid {src['encoding']}", line.decode("latin-1")[:500]))
                continue
            except json.JSONDecodeError as exc:
                bad.append((n, f"invalid JSON ({exc.msg})", line.decode("latin-1")[:500]))
                continue
            if not isinstance(obj, dict):
                bad.append((n, "JSON line is not an object", line.decode("latin-1")[:500]))
                continue
            rows.append({c: _json_cell(obj.get(c)) for c in wanted})
            row_numbers.append(n)
            if len(rows) >= chunk:
                yield _jsonl_table(rows, row_numbers, path, src)
                rows, row_numbers = [], []
            if len(bad) >= chunk:
                yield _bad_rows(path, bad)
                bad = []
    if rows:
        yield _jsonl_table(rows, row_numbers, path, src)
    if bad:
        yield _bad_rows(path, bad)


def _json_cell(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode()
    return str(value).encode()


def _jsonl_table(
    rows: list[dict[str, Any]], numbers: list[int], path: str, src: dict[str, Any]
) -> pa.Table:
    cols = {c: pa.array([r[c] for r in rows], type=pa.binary()) for c in _wanted_columns(src)}
    if not any(any(r[c] is not None for r in rows) for c in (src["user"], src["item"])):
        _check_columns(path, [], src)
    table = pa.table(cols)
    out = _normalise(table, path, 0, src)
    return out.set_column(out.schema.get_field_index(ROW), ROW, pa.array(numbers, pa.int64()))


def _parquet_normalise(batch: pa.Table, src: dict[str, Any], counter: Any) -> pa.Table:
    """Normalise one Parquet block read by Ray Data (``path`` column added by the reader)."""
    import ray

    paths = batch.column("path")
    out = []
    counts = {}
    for stored in pc.unique(paths).to_pylist():
        path = src["paths"].get(stored, stored)
        part = batch.filter(pc.equal(paths, stored))
        _check_columns(path, part.schema.names, src)
        cols = {c: _as_binary(part.column(c)) for c in _wanted_columns(src)}
        out.append(_normalise(pa.table(cols), path, -1, src))
        counts[path] = part.num_rows
    ray.get(counter.add.remote(counts))
    return pa.concat_tables(out) if out else NORMAL_SCHEMA.empty_table()


def _as_binary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    if pa.types.is_timestamp(col.type):
        col = pc.cast(pc.cast(col, pa.timestamp("s")), pa.int64())
    if pa.types.is_floating(col.type):
        # 1.0 and 1 must give the same id / value text.
        ints = pc.cast(col, pa.int64(), safe=False)
        col = pc.if_else(
            pc.equal(pc.cast(ints, col.type), col),
            pc.cast(ints, pa.string()),
            pc.cast(col, pa.string()),
        )
    if pa.types.is_dictionary(col.type):
        col = pc.cast(col, col.type.value_type)
    if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
        # Arrow has no int → binary cast; going via string stays vectorised (no per-value Python).
        col = pc.cast(col, pa.string())
    try:
        return pc.cast(col, pa.binary())
    except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
        return pa.chunked_array(
            [
                pa.array(
                    [
                        None if v is None else json.dumps(v, default=str).encode()
                        for v in col.to_pylist()
                    ],
                    pa.binary(),
                )
            ]
        )


def _wanted_columns(src: dict[str, Any]) -> list[str]:
    cols = [src["user"], src["item"], src["timestamp"]]
    cols += [c for c in (src["weight"], src["rating"], src["event"]) if c]
    return list(dict.fromkeys(cols))


def _check_columns(path: str, found: list[str], src: dict[str, Any]) -> None:
    missing = [c for c in _wanted_columns(src) if c not in found]
    if not missing:
        return
    hint = "check data.columns (the raw column names)"
    header = " ".join(found)
    for d in (";", "\t", "|", ","):
        if d != src["delimiter"] and d in header:
            hint = f"the header contains {d!r}: set data.delimiter={d!r}"
            break
    raise IngestError(
        f"{path}: missing column(s) {', '.join(missing)}; found {found or 'none'}; {hint}"
    )


def _bad_rows(path: str, bad: list[tuple[int, str, str]]) -> pa.Table:
    n = len(bad)
    return pa.table(
        {
            FILE: pa.array([path] * n, pa.string()),
            ROW: pa.array([b[0] for b in bad], pa.int64()),
            USER: pa.nulls(n, pa.string()),
            ITEM: pa.nulls(n, pa.string()),
            TS: pa.nulls(n, pa.int64()),
            W: pa.nulls(n, pa.float32()),
            REASON: pa.array([b[1] for b in bad], pa.string()),
            RAW: pa.array([b[2] for b in bad], pa.string()),
        },
        schema=NORMAL_SCHEMA,
    )


# ---------------------------------------------------------------- validation


def _decode(col: pa.ChunkedArray) -> tuple[pa.ChunkedArray, np.ndarray]:
    """Binary → string; returns the strings and a mask of values that are not valid UTF-8."""
    try:
        return pc.cast(col, pa.string()), np.zeros(len(col), dtype=bool)
    except pa.ArrowInvalid:
        values = col.to_pylist()
        bad = np.zeros(len(values), dtype=bool)
        text: list[str | None] = []
        for i, v in enumerate(values):
            if v is None:
                text.append(None)
                continue
            try:
                text.append(v.decode("utf-8"))
            except UnicodeDecodeError:
                bad[i] = True
                text.append(None)
        return pa.chunked_array([pa.array(text, pa.string())]), bad


def _numbers(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Parse numeric text; returns float64 values (NaN where missing) and a parse-failure mask."""
    stripped = pc.utf8_trim_whitespace(col)
    present = pc.fill_null(pc.greater(pc.utf8_length(stripped), 0), False)
    values = np.full(len(col), np.nan)
    failed = np.zeros(len(col), dtype=bool)
    try:
        parsed = pc.cast(stripped, pa.float64())
        values = parsed.to_numpy(zero_copy_only=False).astype(np.float64)
    except pa.ArrowInvalid:
        for i, v in enumerate(stripped.to_pylist()):
            if not v:
                continue
            try:
                values[i] = float(v)
            except ValueError:
                failed[i] = True
    present_np = present.to_numpy(zero_copy_only=False)
    values[~present_np] = np.nan
    failed |= present_np & ~np.isfinite(values) & ~failed
    return values, failed


def _timestamps(col: pa.ChunkedArray, unit: str) -> tuple[np.ndarray, np.ndarray]:
    """Event times as Unix seconds (int64) and a mask of missing/unparsable values."""
    if unit == "iso":
        import pandas as pd

        parsed = pd.to_datetime(
            pd.Series(col.to_pylist(), dtype="object"), errors="coerce", utc=True, format="ISO8601"
        )
        bad = parsed.isna().to_numpy()
        out = np.zeros(len(col), dtype=np.int64)
        if (~bad).any():
            # Resolution-independent (pandas may hold ns or us): count whole seconds.
            secs = (parsed[~bad] - pd.Timestamp(0, tz="UTC")) // pd.Timedelta(seconds=1)
            out[~bad] = secs.to_numpy(dtype=np.int64)
        return out, bad
    values, failed = _numbers(col)
    bad = failed | np.isnan(values) | (values < 0)
    values = np.where(bad, 0, values)
    if unit == "ms":
        values = values / 1000.0
    return np.floor(values).astype(np.int64), bad


def _normalise(table: pa.Table, path: str, offset: int, src: dict[str, Any]) -> pa.Table:
    """Validate raw (binary) columns into the normalised schema, with a reason per bad row."""
    n = table.num_rows
    reasons = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, reason: str) -> None:
        reasons[mask & (reasons == None)] = reason  # noqa: E711  (numpy elementwise)

    decoded: dict[str, pa.ChunkedArray] = {}
    for c in _wanted_columns(src):
        decoded[c], bad_utf8 = _decode(table.column(c))
        flag(bad_utf8, f"column {c}: not valid UTF-8")

    ids = {}
    for key, label in ((src["user"], "user"), (src["item"], "item")):
        s = pc.utf8_trim_whitespace(decoded[key])
        missing = pc.fill_null(pc.equal(pc.utf8_length(s), 0), True).to_numpy(zero_copy_only=False)
        flag(missing, f"missing {label} id")
        ids[label] = s

    ts, bad_ts = _timestamps(decoded[src["timestamp"]], src["timestamp_unit"])
    flag(bad_ts, "missing or unparsable timestamp")

    weight = np.ones(n, dtype=np.float64)
    wcol = src["weight"] or src["rating"]
    if wcol:
        w, bad_w = _numbers(decoded[wcol])
        flag(bad_w, f"non-numeric {wcol}")
        flag(np.isnan(w) & ~bad_w, f"missing {wcol}")
        flag(w < 0, f"negative {wcol}")
        weight = np.where(np.isnan(w), 0.0, w)
    if src["event"] and src["event_weights"]:
        events = decoded[src["event"]].to_numpy(zero_copy_only=False)
        known = np.array([e in src["event_weights"] for e in events], dtype=bool)
        flag(~known, f"unknown {src['event']} value")
        weight = weight * np.array([src["event_weights"].get(e, 0.0) for e in events])

    ok = np.equal(reasons, None).astype(bool) if n else np.zeros(0, dtype=bool)
    raw = np.full(n, None, dtype=object)
    if (~ok).any():
        bad_idx = np.flatnonzero(~ok)
        sub = {c: decoded[c].take(pa.array(bad_idx)).to_pylist() for c in decoded}
        raw[bad_idx] = [json.dumps({c: sub[c][j] for c in sub}) for j in range(len(bad_idx))]
    ok_arr = pa.array(ok)
    rows = np.arange(offset, offset + n, dtype=np.int64) if offset >= 0 else np.full(n, -1)
    return pa.table(
        {
            FILE: pa.array(np.full(n, path, dtype=object), pa.string()),
            ROW: pa.array(rows, pa.int64()),
            USER: pc.if_else(ok_arr, ids["user"], pa.scalar(None, pa.string())),
            ITEM: pc.if_else(ok_arr, ids["item"], pa.scalar(None, pa.string())),
            TS: pa.array(ts, pa.int64()),
            W: pa.array(weight, pa.float32()),
            REASON: pa.array(reasons, pa.string()),
            RAW: pa.array(raw, pa.string()),
        },
        schema=NORMAL_SCHEMA,
    )


# ---------------------------------------------------------------- dedupe + split


def item_order_key(items: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Sort key for raw item ids: digit-only ids compare numerically, others as text after."""
    digits = pc.fill_null(pc.utf8_is_digit(items), False)
    padded = pc.utf8_lpad(items, _ID_PAD, "0")
    return pc.if_else(
        digits,
        pc.binary_join_element_wise("0", padded, ""),
        pc.binary_join_element_wise("1", items, ""),
    )


def _ceil_frac(n: np.ndarray, frac: float) -> np.ndarray:
    f = Fraction(frac).limit_denominator(10**6)
    return (n * f.numerator + f.denominator - 1) // f.denominator


def dedupe_and_split(batch: pa.Table, test_fraction: float, valid_fraction: float) -> pa.Table:
    """Per user: keep each (user, item) at its first event, then split by time (docs/design.md).

    The batch holds every row of its users (hash-partitioned by user). Bad rows pass through
    with status ``quarantined``; repeats get ``duplicate``; the rest ``train|valid|test``.
    """
    good_mask = pc.is_null(batch.column(REASON))
    good = batch.filter(good_mask)
    bad = batch.filter(pc.invert(good_mask))
    bad = bad.append_column(STATUS, pa.array([QUARANTINED] * bad.num_rows, pa.string()))
    if good.num_rows == 0:
        return bad.cast(STAGED_SCHEMA)
    users = pc.dictionary_encode(good.column(USER)).combine_chunks()
    ucode = users.indices.to_numpy()
    ikey = item_order_key(good.column(ITEM))
    icode = pc.dictionary_encode(ikey).combine_chunks()
    # Rank item keys so that integer order == key order (ties in time go to the lower item).
    key_rank = np.argsort(np.argsort(np.asarray(icode.dictionary.to_pylist(), dtype=object)))
    irank = key_rank[icode.indices.to_numpy()]
    ts = good.column(TS).to_numpy()
    order = np.lexsort((irank, ts, ucode))
    u, i = ucode[order], irank[order]
    # Sorted by (user, ts, item): the first row of each (user, item) is its first event.
    pair = u.astype(np.int64) * (int(irank.max()) + 1) + i
    _, first = np.unique(pair, return_index=True)
    keep = np.zeros(len(order), dtype=bool)
    keep[first] = True
    status = np.full(len(order), DUPLICATE, dtype=object)
    ku = u[keep]
    starts = np.flatnonzero(np.r_[True, ku[1:] != ku[:-1]])
    counts = np.diff(np.r_[starts, len(ku)])
    n = np.repeat(counts, counts)
    rank = np.arange(len(ku)) - np.repeat(starts, counts)
    from_end = n - 1 - rank
    n_test = _ceil_frac(n, test_fraction)
    n_valid = _ceil_frac(n - n_test, valid_fraction)
    split = np.where(
        from_end < n_test, "test", np.where(from_end < n_test + n_valid, "valid", "train")
    )
    status[np.flatnonzero(keep)] = split
    out = good.take(pa.array(order)).append_column(STATUS, pa.array(status, pa.string()))
    return pa.concat_tables([out.cast(STAGED_SCHEMA), bad.cast(STAGED_SCHEMA)])


# ---------------------------------------------------------------- pipeline


def _source_dict(src: RawSource, data: DataArgs) -> dict[str, Any]:
    return {
        "user": src.columns.user,
        "item": src.columns.item,
        "timestamp": src.columns.timestamp,
        "rating": src.columns.rating,
        "weight": src.columns.weight,
        "event": src.columns.event,
        "event_weights": dict(data.event_weights),
        "timestamp_unit": src.timestamp_unit,
        "delimiter": src.delimiter,
        "encoding": src.encoding,
        # Resolved in the driver: Ray workers may not share its environment.
        "storage_options": s3_storage_options(),
    }


def _fingerprint(paths: list[str]) -> list[dict[str, Any]]:
    """Identify inputs by content: SHA-256 of local files, ETag + size on object stores."""
    prints = []
    for path in paths:
        fs, p = filesystem_for(path)
        info = fs.info(p)
        entry: dict[str, Any] = {"path": path, "size": info.get("size")}
        if Lake(path).is_local:
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(8 << 20), b""):
                    digest.update(chunk)
            entry["sha256"] = digest.hexdigest()
        else:
            entry["etag"] = str(info.get("ETag", "")).strip('"')
        prints.append(entry)
    return prints


def _preflight(src: RawSource, spec: dict[str, Any]) -> list[str]:
    """Check every file's columns in the driver, so a wrong header fails fast with a clear message.

    Returns warnings (e.g. empty files), which end up in the manifest.
    """
    warnings = []
    for path in src.paths:
        fs, p = filesystem_for(path)
        if fs.info(p).get("size", 0) == 0:
            warnings.append(f"{path}: empty file")
            continue
        if src.format == "parquet":
            with fs.open(p, "rb") as f:
                names = pq.read_schema(f).names
            _check_columns(path, names, spec)
        elif src.format == "csv":
            with fs.open(p, "rb") as f:
                head = f.read(1 << 16)
            first = head.split(b"\n", 1)[0].rstrip(b"\r")
            try:
                header = pacsv.read_csv(
                    io.BytesIO(first + b"\n"),
                    read_options=pacsv.ReadOptions(encoding=spec["encoding"]),
                    parse_options=pacsv.ParseOptions(delimiter=spec["delimiter"]),
                ).schema.names
            except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
                raise IngestError(
                    f"{path}: cannot read the CSV header ({exc}); check data.encoding "
                    f"({spec['encoding']}) and data.delimiter ({spec['delimiter']!r})"
                ) from None
            _check_columns(path, header, spec)
    return warnings


class _RowCounter:
    """Counts rows as the readers produce them, independently of the later pipeline steps."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def add(self, counts: dict[str, int]) -> None:
        for path, n in counts.items():
            self.counts[path] = self.counts.get(path, 0) + n

    def get(self) -> dict[str, int]:
        return self.counts


def _read_normalised(src: RawSource, spec: dict[str, Any], counter: Any) -> Any:
    """Ray Dataset of normalised rows (good and bad) for every input file."""
    import ray
    import ray.data

    if src.format == "parquet":
        arrow_fs = Lake(src.paths[0]).arrow_fs
        stored = {filesystem_for(p)[1]: p for p in src.paths}
        # At least one block per file and per CPU, so that validation runs on every core.
        n_blocks = max(len(stored), int(ray.cluster_resources().get("CPU", 1)))
        ds = ray.data.read_parquet(
            list(stored), filesystem=arrow_fs, include_paths=True, override_num_blocks=n_blocks
        )
        return ds.map_batches(
            _parquet_normalise,
            fn_kwargs={"src": {**spec, "paths": stored}, "counter": counter},
            batch_format="pyarrow",
            batch_size=None,
        )
    reader = _csv_batches if src.format == "csv" else _jsonl_batches

    def read_files(batch: pa.Table) -> Iterator[pa.Table]:
        for path in batch.column("path").to_pylist():
            n = 0
            for table in reader(path, spec):
                n += table.num_rows
                yield table
            ray.get(counter.add.remote({path: n}))

    files = ray.data.from_items(
        [{"path": p} for p in src.paths], override_num_blocks=len(src.paths)
    )
    return files.map_batches(read_files, batch_format="pyarrow", batch_size=1)


def _block_stats(batch: pa.Table) -> pa.Table:
    """Per-block counts by (file, status), quarantine reasons and distinct ids, as one JSON row."""
    counts: dict[str, dict[str, int]] = {}
    for row in batch.group_by([FILE, STATUS]).aggregate([([], "count_all")]).to_pylist():
        counts.setdefault(row[FILE], {})[row[STATUS]] = row["count_all"]
    bad = batch.filter(pc.equal(batch.column(STATUS), QUARANTINED))
    reasons = {
        r[REASON]: r["count_all"]
        for r in bad.group_by([REASON]).aggregate([([], "count_all")]).to_pylist()
    }
    good = batch.filter(pc.is_in(batch.column(STATUS), pa.array(SPLITS)))
    stats = {
        "counts": counts,
        "reasons": reasons,
        "users": pc.unique(good.column(USER)).to_pylist(),
        "items": pc.unique(good.column(ITEM)).to_pylist(),
    }
    return pa.table({"stats": [json.dumps(stats)]})


def _collect_stats(staged: Any) -> tuple[dict[str, dict[str, int]], dict[str, int], list, list]:
    by_file: dict[str, dict[str, int]] = {}
    reasons: dict[str, int] = {}
    users: set[str] = set()
    items: set[str] = set()
    stats_ds = staged.map_batches(_block_stats, batch_format="pyarrow", batch_size=None)
    for row in stats_ds.iter_rows():
        stats = json.loads(row["stats"])
        for path, c in stats["counts"].items():
            for status, n in c.items():
                by_file.setdefault(path, {})[status] = by_file.get(path, {}).get(status, 0) + n
        for reason, n in stats["reasons"].items():
            reasons[reason] = reasons.get(reason, 0) + n
        users.update(stats["users"])
        items.update(stats["items"])
    return by_file, reasons, list(users), list(items)


def _id_table(ids: list[str], idx_col: str, id_col: str, numeric_first: bool) -> pa.Table:
    arr = pa.array(ids, pa.string())
    key = item_order_key(arr) if numeric_first else arr
    order = pc.sort_indices(key)
    sorted_ids = arr.take(order)
    return pa.table({idx_col: pa.array(np.arange(len(ids), dtype=np.int32)), id_col: sorted_ids})


def _item_genres(src: RawSource, items: pa.Table) -> pa.Table:
    genres: dict[str, list[str]] = {}
    if src.item_features:
        fs, p = filesystem_for(src.item_features)
        with fs.open(p, "rb") as f:
            feats = pacsv.read_csv(
                f,
                convert_options=pacsv.ConvertOptions(
                    column_types={src.item_features_id_column: pa.string()},
                    include_columns=[src.item_features_id_column, src.genres_column],
                ),
            )
        for iid, g in zip(
            feats.column(src.item_features_id_column).to_pylist(),
            feats.column(src.genres_column).to_pylist(),
            strict=True,
        ):
            if iid is not None and g and not g.startswith("("):
                genres[iid.strip()] = [x for x in g.split("|") if x]
    values = [genres.get(i, []) for i in items.column(ITEM_ID).to_pylist()]
    return items.append_column(GENRES, pa.array(values, pa.list_(pa.string())))


def _encode(batch: pa.Table, users: pa.Array, items: pa.Array) -> pa.Table:
    batch = batch.filter(pc.is_in(batch.column(STATUS), pa.array(SPLITS)))
    return pa.table(
        {
            "split": batch.column(STATUS),
            USER_IDX: pc.cast(pc.index_in(batch.column(USER), value_set=users), pa.int32()),
            ITEM_IDX: pc.cast(pc.index_in(batch.column(ITEM), value_set=items), pa.int32()),
            TIMESTAMP: batch.column(TS),
            WEIGHT: batch.column(W),
        },
        schema=INTERACTION_SCHEMA.insert(0, pa.field("split", pa.string())),
    )


def _publish_splits(lake: Lake, out: str) -> None:
    """Rename Hive folders ``split=train`` → ``train`` (an empty split gets an empty file)."""
    fs = lake.fs
    for split in SPLITS:
        hive, final = posixpath.join(out, f"split={split}"), posixpath.join(out, split)
        if fs.exists(hive) and lake.is_local:
            fs.mv(hive, final, recursive=True)
        elif fs.exists(hive):
            # Object stores have no folder rename: copy each part, then drop the Hive folder.
            for part in fs.find(hive):
                fs.copy(part, posixpath.join(final, posixpath.basename(part)))
            fs.rm(hive, recursive=True)
        else:
            fs.makedirs(final, exist_ok=True)
            pq.write_table(
                INTERACTION_SCHEMA.empty_table(),
                posixpath.join(final, "empty.parquet"),
                filesystem=lake.arrow_fs,
            )


def run(data: DataArgs, lake_uri: str, seed: int = 0) -> DatasetVersion:
    """Ingest ``data`` into ``<lake>/datasets/<data.name>/<version>/`` and return the version.

    Re-running with the same inputs and config returns the existing version untouched.
    """
    import ray

    t0 = time.time()
    lake = Lake(lake_uri)
    src = resolve_source(data, cache_dir=lake.full_uri("raw"))
    spec = _source_dict(src, data)
    fingerprint = _fingerprint(src.paths)
    version = content_id(
        {
            "pipeline": PIPELINE_VERSION,
            "inputs": fingerprint,
            "item_features": src.item_features,
            "data": data.model_dump(mode="json", exclude={"name", "download"}),
            "spec": {k: v for k, v in spec.items() if k != "storage_options"},
        }
    )
    root = datasets_root(data.name)
    if lake.exists(posixpath.join(root, version, MANIFEST)):
        log.info("dataset %s/%s already exists: inputs and config unchanged", data.name, version)
        return load_dataset(lake, data.name, version)

    log.info("ingesting %s (%d file(s)) into %s", src.description, len(src.paths), lake.uri)
    arrow_fs = lake.arrow_fs
    staged_rel = posixpath.join("tmp", f"ingest-{data.name}-{version}")
    lake.remove(staged_rel)
    warnings = _preflight(src, spec)
    counter = ray.remote(num_cpus=0)(_RowCounter).remote()
    normal = _read_normalised(src, spec, counter)
    n_parts = max(2, min(64, int(ray.cluster_resources().get("CPU", 2)) * 2))
    staged = normal.repartition(n_parts, keys=[USER]).map_batches(
        dedupe_and_split,
        fn_kwargs={"test_fraction": data.test_fraction, "valid_fraction": data.valid_fraction},
        batch_format="pyarrow",
        batch_size=None,
    )
    staged.write_parquet(lake.path(staged_rel), filesystem=arrow_fs)
    staged = ray.data.read_parquet(lake.path(staged_rel), filesystem=arrow_fs, schema=STAGED_SCHEMA)

    by_file, reasons, user_list, item_list = _collect_stats(staged)
    rows_read = ray.get(counter.get.remote())
    ray.kill(counter)
    users = _id_table(user_list, USER_IDX, USER_ID, numeric_first=True)
    items = _id_table(item_list, ITEM_IDX, ITEM_ID, numeric_first=True)
    if users.num_rows == 0:
        raise IngestError(
            f"no valid interactions in {src.description}: "
            + (
                f"all rows quarantined, see {lake.full_uri('quarantine', data.name, version)}"
                if by_file
                else "the input files are empty"
            )
        )
    items = _item_genres(src, items)

    quarantine_rel = posixpath.join("quarantine", data.name, version)
    lake.remove(quarantine_rel)
    if reasons:
        staged.filter(expr=f"{STATUS} == '{QUARANTINED}'").select_columns(
            [FILE, ROW, REASON, RAW]
        ).write_parquet(lake.path(quarantine_rel), filesystem=arrow_fs)

    user_ids = users.column(USER_ID).combine_chunks()
    item_ids = items.column(ITEM_ID).combine_chunks()
    rel = posixpath.join(root, version)
    with lake.staging(rel) as out:
        staged.map_batches(
            _encode,
            fn_kwargs={"users": user_ids, "items": item_ids},
            batch_format="pyarrow",
        ).write_parquet(out, filesystem=arrow_fs, partition_cols=["split"])
        _publish_splits(lake, out)
        pq.write_table(users, posixpath.join(out, "users.parquet"), filesystem=arrow_fs)
        pq.write_table(items, posixpath.join(out, "items.parquet"), filesystem=arrow_fs)
        manifest = _manifest(
            data,
            src,
            version,
            fingerprint,
            rows_read,
            by_file,
            reasons,
            users,
            items,
            quarantine_rel,
            lake,
            time.time() - t0,
        )
        manifest["warnings"] = warnings
        pq_manifest = json.dumps(manifest, indent=2, sort_keys=True).encode()
        with arrow_fs.open_output_stream(posixpath.join(out, MANIFEST)) as f:
            f.write(pq_manifest)
    lake.remove(staged_rel)
    log.info("published %s", lake.full_uri(rel, MANIFEST))
    return load_dataset(lake, data.name, version)


def _manifest(
    data: DataArgs,
    src: RawSource,
    version: str,
    fingerprint: list[dict[str, Any]],
    rows_read: dict[str, int],
    by_file: dict[str, dict[str, int]],
    reasons: dict[str, int],
    users: pa.Table,
    items: pa.Table,
    quarantine_rel: str,
    lake: Lake,
    seconds: float,
) -> dict[str, Any]:
    files = []
    totals = {"rows_read": 0, "rows_ingested": 0, "rows_quarantined": 0, "duplicates_collapsed": 0}
    splits = dict.fromkeys(SPLITS, 0)
    for fp in fingerprint:
        c = by_file.get(fp["path"], {})
        entry = {
            "path": fp["path"],
            "rows_ingested": sum(c.get(s, 0) for s in SPLITS),
            "rows_quarantined": c.get(QUARANTINED, 0),
            "duplicates_collapsed": c.get(DUPLICATE, 0),
        }
        entry["rows_read"] = rows_read.get(fp["path"], 0)
        accounted = (
            entry["rows_ingested"] + entry["rows_quarantined"] + entry["duplicates_collapsed"]
        )
        if accounted != entry["rows_read"]:
            raise IngestError(
                f"{fp['path']}: read {entry['rows_read']} rows but accounted for {accounted} "
                "(ingested + quarantined + duplicates); refusing to publish"
            )
        files.append(entry)
        for k in totals:
            totals[k] += entry[k]
        for s in SPLITS:
            splits[s] += c.get(s, 0)
    unknown = set(by_file) - {fp["path"] for fp in fingerprint}
    if unknown:
        raise IngestError(f"internal: rows attributed to unknown files {sorted(unknown)}")
    return {
        "name": data.name,
        "version": version,
        "created_at": utc_now(),
        "source": {"description": src.description, "format": src.format, "files": fingerprint},
        **totals,
        "splits": splits,
        "n_users": users.num_rows,
        "n_items": items.num_rows,
        "items_with_genres": int(sum(1 for g in items.column(GENRES).to_pylist() if g)),
        "files": files,
        "quarantine": {
            "reasons": reasons,
            "path": lake.full_uri(quarantine_rel) if reasons else None,
        },
        "schema": {f.name: str(f.type) for f in INTERACTION_SCHEMA},
        "protocol": {
            "dedupe": "first event per (user, item)",
            "split": "per user by (timestamp, item): test last ceil(test_fraction*n), "
            "valid last ceil(valid_fraction*rest)",
            "test_fraction": data.test_fraction,
            "valid_fraction": data.valid_fraction,
        },
        "config": data.model_dump(mode="json"),
        "ingest_seconds": round(seconds, 2),
        "density": round(sum(splits.values()) / max(1, users.num_rows * items.num_rows), 6),
        "rows_check": "rows_read == rows_ingested + rows_quarantined + duplicates_collapsed",
        "pipeline_version": PIPELINE_VERSION,
    }


def summary_table(manifest: dict[str, Any]) -> str:
    """Readable per-file counts of a manifest (read = ingested + quarantined + duplicates)."""
    head = f"{'file':<48} {'read':>11} {'ingested':>11} {'quarantined':>11} {'duplicates':>11}"
    lines = [f"dataset {manifest['name']} version {manifest['version']}", head, "-" * len(head)]
    keys = ("rows_read", "rows_ingested", "rows_quarantined", "duplicates_collapsed")
    for f in manifest["files"] + [{"path": "TOTAL", **{k: manifest[k] for k in keys}}]:
        name = f["path"] if len(f["path"]) <= 48 else "…" + f["path"][-47:]
        lines.append(f"{name:<48} " + " ".join(f"{f[k]:>11,}" for k in keys))
    s = manifest["splits"]
    lines.append(
        f"users {manifest['n_users']:,}  items {manifest['n_items']:,}  "
        f"train {s['train']:,}  valid {s['valid']:,}  test {s['test']:,}"
    )
    for reason, n in sorted(manifest["quarantine"]["reasons"].items(), key=lambda x: -x[1]):
        lines.append(f"  quarantined {n:>9,}  {reason}")
    return "\n".join(lines)
