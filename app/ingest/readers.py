"""Readers: stream raw CSV / JSON-lines files, or take Parquet blocks, as normalised rows.

Each reader yields tables in ``NORMAL_SCHEMA`` (``app.ingest.validate``): lines that cannot be
parsed at all (a malformed CSV row, a line that is not a JSON object) become quarantine rows at
once, parsed rows go through ``normalise``. ``check_headers`` reads only the header of every file,
so that a wrong column name or delimiter fails in the driver before any Ray work starts.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.config import DataArgs
from app.ingest.errors import IngestError
from app.ingest.sources import RawSource
from app.ingest.validate import ROW, bad_rows, check_columns, normalise, wanted_columns
from app.store import filesystem_for, s3_storage_options

# CSV is parsed in blocks of this many bytes, each one normalised table.
_CSV_BLOCK_BYTES = 16 << 20


def reader_spec(src: RawSource, data: DataArgs) -> dict[str, Any]:
    """What readers and validation need to know about a source, as a plain (picklable) dict."""
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


def csv_batches(path: str, src: dict[str, Any]) -> Iterator[pa.Table]:
    """Stream one CSV file as normalised tables; malformed lines become quarantine rows."""
    fs, p = filesystem_for(path, src.get("storage_options"))
    wanted = wanted_columns(src)
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
        check_columns(path, reader.schema.names, src)
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
            yield normalise(table, path, offset, src)
            offset += table.num_rows
            if bad:
                yield bad_rows(path, bad)
                bad.clear()
    if bad:
        yield bad_rows(path, bad)


def jsonl_batches(path: str, src: dict[str, Any], chunk: int = 200_000) -> Iterator[pa.Table]:
    """Stream one JSON-lines file; lines that are not JSON objects are quarantined."""
    fs, p = filesystem_for(path, src.get("storage_options"))
    wanted = wanted_columns(src)
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
                yield bad_rows(path, bad)
                bad = []
    if rows:
        yield _jsonl_table(rows, row_numbers, path, src)
    if bad:
        yield bad_rows(path, bad)


def _json_cell(value: Any) -> bytes | None:
    if value is None:
        return None
    if isinstance(value, (dict, list)):
        return json.dumps(value).encode()
    return str(value).encode()


def _jsonl_table(
    rows: list[dict[str, Any]], numbers: list[int], path: str, src: dict[str, Any]
) -> pa.Table:
    cols = {c: pa.array([r[c] for r in rows], type=pa.binary()) for c in wanted_columns(src)}
    if not any(any(r[c] is not None for r in rows) for c in (src["user"], src["item"])):
        check_columns(path, [], src)
    table = pa.table(cols)
    out = normalise(table, path, 0, src)
    return out.set_column(out.schema.get_field_index(ROW), ROW, pa.array(numbers, pa.int64()))


def parquet_table(part: pa.Table, path: str, spec: dict[str, Any]) -> pa.Table:
    """Normalise the rows of one Parquet file (any column types) read as one Arrow table."""
    check_columns(path, part.schema.names, spec)
    cols = {c: as_binary(part.column(c)) for c in wanted_columns(spec)}
    return normalise(pa.table(cols), path, -1, spec)


def as_binary(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """Typed Parquet values as the binary text a CSV reader would give, for ``normalise``.

    Whole floats give the same text as integers (``1.0`` -> ``1``), timestamps become Unix
    seconds, dictionary columns their values, and values Arrow cannot cast become JSON.
    """
    if pa.types.is_timestamp(col.type):
        # whole seconds, as the CSV path floors them (unsafe: fractions are dropped, not errors)
        col = pc.cast(pc.cast(col, pa.timestamp("s"), safe=False), pa.int64())
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


def check_headers(src: RawSource, spec: dict[str, Any]) -> list[str]:
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
            check_columns(path, names, spec)
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
            check_columns(path, header, spec)
    return warnings
