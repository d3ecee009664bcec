r"""Readers: stream raw CSV / JSON-lines files, or take Parquet blocks, as normalised rows.

Each reader yields tables in ``NORMAL_SCHEMA`` (``app.ingest.validate``): records that cannot be
parsed at all (a malformed CSV row, a line that is not a JSON object, a line longer than
``MAX_ROW_BYTES``) become quarantine rows at once, parsed rows go through ``normalise``.
``check_headers`` reads only the header of every file, so that a wrong column name or delimiter
fails in the driver before any Ray work starts.

A record of a text file is one physical line (docs/ingest-validation.md): lines end at ``\n``
(a ``\r`` before it belongs to the line end) and a last line without one counts; a blank line
(only spaces, tabs, ``\r``, ``\v``, ``\f``) is no record. A CSV value quoted across lines is not
supported: each of its lines is quarantined on its own. ``count_rows`` counts the records of a
file from its bytes (or Parquet metadata) alone, so that every counted record comes out of its
reader exactly once, as a normalised or a quarantined row. The ``row`` of a text record is its
0-based line number in the file (a CSV header is line 0); Parquet rows have -1.

Line framing and counting are in ``app.ingest.records``, CSV parsing in ``app.ingest.csv_parse``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from app.config import DataArgs
from app.ingest.csv_parse import (
    CSV_CARRIAGE_RETURN,
    CSV_QUOTES,
    CsvRun,
    check_csv_columns,
    csv_header,
)
from app.ingest.errors import IngestError
from app.ingest.ids import id_reasons
from app.ingest.records import (
    CR,
    WS,
    blank_lines,
    count_records,
    file_format,
    is_utf8,
    line_bounds,
    line_runs,
    open_bytes,
    raw_text,
    utf8_blocks,
)
from app.ingest.sources import RawSource
from app.ingest.validate import (
    bad_rows,
    check_columns,
    normalise,
    wanted_columns,
)
from app.ingest.values import json_binary
from app.store import filesystem_for, s3_storage_options

MAX_ROW_BYTES = 4 << 20
"""Longest CSV or JSON line (bytes, without its line end) read; longer ones are quarantined."""
ROW_TOO_LONG = f"row too long (over {MAX_ROW_BYTES >> 20} MiB)"
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a JSON line; deeper lines are quarantined."""
JSON_TOO_DEEP = f"invalid JSON (nested deeper than {MAX_JSON_DEPTH} levels)"
_HEADER_TOO_LONG = "{path}: the CSV header is longer than " + f"{MAX_ROW_BYTES >> 20} MiB"

# Files are read in blocks of this many bytes; CSV is parsed and normalised per block.
_READ_BYTES = 16 << 20
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def reader_spec(src: RawSource, data: DataArgs) -> dict[str, Any]:
    """What readers and validation need to know about a source, as a plain (picklable) dict."""
    return {
        "format": src.format,
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


# ---------------------------------------------------------------- bytes and lines


def _blocks(f: IO[bytes], encoding: str, size: int | None = None) -> Iterator[bytes]:
    """The file as UTF-8 blocks of ``_READ_BYTES`` (``records.utf8_blocks``)."""
    return utf8_blocks(f, encoding, size or _READ_BYTES)


def _lines(blocks: Iterator[bytes]) -> Iterator[tuple[int, bytes | None, bytes]]:
    """Runs of whole lines, lines over ``MAX_ROW_BYTES`` alone (``records.line_runs``)."""
    return line_runs(blocks, MAX_ROW_BYTES)


# ---------------------------------------------------------------- counting


def count_rows(path: str, spec: dict[str, Any]) -> int:
    r"""How many records ``path`` holds, counted from its bytes alone (not by the parser).

    Parquet: the rows in the file's row-group metadata. CSV and JSON lines: the lines that are
    not blank, the last one counted with or without its ``\n``; a CSV header is not a record.
    Every record comes out of ``csv_batches`` / ``jsonl_batches`` / ``parquet_table`` as
    exactly one normalised or quarantined row, so ``rows_read`` can be checked against them.
    """
    fmt = file_format(path, spec)
    if fmt == "parquet":
        fs, p = filesystem_for(path, spec.get("storage_options"))
        with fs.open(p, "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    with open_bytes(path, spec) as f:
        return count_records(_blocks(f, spec.get("encoding", "utf-8")), header=fmt == "csv")


# ---------------------------------------------------------------- CSV


def csv_batches(path: str, src: dict[str, Any]) -> Iterator[pa.Table]:
    """Stream one CSV file as normalised tables; lines that cannot be parsed are quarantined.

    One table of good and bad rows per block of lines (``_READ_BYTES``). Lines longer than
    ``MAX_ROW_BYTES``, with a carriage return inside, with the wrong number of fields or an
    unclosed quote are quarantined, each on its own; blank lines are skipped.
    """
    with open_bytes(path, src) as f:
        runs = _lines(_blocks(f, src["encoding"]))
        parser: CsvRun | None = None
        for first, run, head in runs:
            if parser is None:
                if run is None:
                    raise IngestError(_HEADER_TOO_LONG.format(path=path))
                if first != 0:  # line 0 was a (long) blank line
                    raise IngestError(f"{path}: the CSV header (line 0) is blank")
                cut = run.find(b"\n")
                header, run = (run, b"") if cut < 0 else (run[: cut + 1], run[cut + 1 :])
                if len(header) > MAX_ROW_BYTES:
                    raise IngestError(_HEADER_TOO_LONG.format(path=path))
                names = csv_header(header, path, src)
                check_csv_columns(path, names, src)
                parser = CsvRun(names, src)
                first += 1
                if not run:
                    continue
            if run is None:
                yield bad_rows(path, [(first, ROW_TOO_LONG, raw_text(head))])
                continue
            yield from _csv_run(run, first, path, src, parser)


def _csv_run(
    run: bytes, first: int, path: str, src: dict[str, Any], parser: CsvRun
) -> Iterator[pa.Table]:
    """Normalised rows of one run of whole lines that starts at line ``first``."""
    arr = np.frombuffer(run, dtype=np.uint8)
    starts, ends, stops = line_bounds(arr)
    blank = blank_lines(arr, starts, ends)
    too_long = ~blank & (ends - starts > MAX_ROW_BYTES)
    inner_cr = np.zeros(len(starts), dtype=bool)
    # pyarrow ends a row at a lone \r too: a line holding one would give two records.
    if run.count(b"\r") > int(np.count_nonzero(arr[ends[ends < len(arr)]] == CR)):
        cr = np.flatnonzero(arr == CR)
        line = np.searchsorted(starts, cr, side="right") - 1
        inside = cr < ends[line]
        inner_cr[line[inside]] = True
    inner_cr &= ~blank & ~too_long
    # An odd number of quotes: the line opens or closes a value quoted across lines.
    odd_quotes = np.zeros(len(starts), dtype=bool)
    if b'"' in run:
        quotes = np.flatnonzero(arr == ord('"'))
        per_line = np.bincount(
            np.searchsorted(starts, quotes, side="right") - 1, minlength=len(starts)
        )
        odd_quotes = (per_line % 2 == 1) & ~blank & ~too_long & ~inner_cr
    bad = [(int(i), ROW_TOO_LONG) for i in np.flatnonzero(too_long)]
    bad += [(int(i), CSV_CARRIAGE_RETURN) for i in np.flatnonzero(inner_cr)]
    bad += [(int(i), CSV_QUOTES) for i in np.flatnonzero(odd_quotes)]
    quarantined = [(first + i, why, raw_text(run[starts[i] : ends[i]])) for i, why in bad]
    lines = np.flatnonzero(~blank & ~too_long & ~inner_cr & ~odd_quotes)
    parser.undecodable = bool(len(arr)) and int(arr.max()) >= 0x80 and not is_utf8(run)
    if parser.undecodable:
        lines, malformed = parser.check_undecodable(run, starts, stops, lines)
        quarantined += [(first + i, why, text) for i, why, text in malformed]
    tables, at, invalid = parser.parse(run, starts, stops, lines)
    quarantined += [(first + i, why, text) for i, why, text in invalid]
    for table, idx in zip(tables, at, strict=True):
        if table.num_rows:
            yield normalise(table, path, 0, src, rows=first + idx)
    if quarantined:
        yield bad_rows(path, sorted(quarantined))


# ---------------------------------------------------------------- JSON lines


def _json_depth(line: bytes) -> int:
    """Deepest nesting of ``[`` and ``{`` in a JSON line, strings left out."""
    bare = np.frombuffer(_JSON_STRING.sub(b'""', line), dtype=np.uint8)
    step = np.zeros(len(bare), dtype=np.int32)
    step[(bare == ord("[")) | (bare == ord("{"))] = 1
    step[(bare == ord("]")) | (bare == ord("}"))] = -1
    return int(np.cumsum(step).max()) if len(step) else 0


# Numbers keep their text (parse_int/parse_float), as do NaN and Infinity.
_JSON = json.JSONDecoder(parse_int=str, parse_float=str, parse_constant=str)


def _json_object(text: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON line (stripped, not blank) as an object, or None and the quarantine reason."""
    if len(text) > MAX_ROW_BYTES:
        return None, ROW_TOO_LONG
    if text.count(b"[") + text.count(b"{") > MAX_JSON_DEPTH and _json_depth(text) > MAX_JSON_DEPTH:
        return None, JSON_TOO_DEEP
    s = text.decode("utf-8", "surrogateescape")
    try:
        obj, end = _JSON.raw_decode(s)
    except RecursionError:
        return None, JSON_TOO_DEEP
    except ValueError as exc:
        return None, f"invalid JSON ({getattr(exc, 'msg', 'not JSON')})"
    if end != len(s):
        return None, "invalid JSON (Extra data)"
    if not isinstance(obj, dict):
        return None, "JSON line is not an object"
    return obj, None


def jsonl_batches(path: str, src: dict[str, Any], chunk: int = 200_000) -> Iterator[pa.Table]:
    """Stream one JSON-lines file; lines that are not JSON objects are quarantined.

    Numbers keep the text they are written with (``1``, ``1.0``, ``12345678901234567890``), as
    a CSV would give them, so that ids and values canonicalise the same way in both formats.
    A line nested deeper than ``MAX_JSON_DEPTH`` or longer than ``MAX_ROW_BYTES`` is quarantined
    before it is parsed; blank lines are skipped.
    """
    wanted = wanted_columns(src)
    rows: list[tuple[Any, ...]] = []
    numbers: list[int] = []
    bad: list[tuple[int, str, str]] = []
    checked = False

    def flush() -> Iterator[pa.Table]:
        nonlocal checked
        if rows:
            yield _jsonl_table(rows, numbers, path, src, check=not checked)
            checked = True
            rows.clear()
            numbers.clear()
        if bad:
            yield bad_rows(path, bad)
            bad.clear()

    with open_bytes(path, src) as f:
        for first, run, head in _lines(_blocks(f, src["encoding"])):
            if run is None:
                bad.append((first, ROW_TOO_LONG, raw_text(head)))
                continue
            lines = run.split(b"\n")
            if run.endswith(b"\n"):
                lines.pop()
            for n, line in enumerate(lines, start=first):
                text = line.strip(WS)
                if not text:
                    continue
                obj, why = _json_object(text)
                if obj is None:
                    bad.append((n, str(why), raw_text(text)))
                    continue
                rows.append(tuple(map(obj.get, wanted)))
                numbers.append(n)
                if len(rows) >= chunk or len(bad) >= chunk:
                    yield from flush()
        yield from flush()


def _jsonl_table(
    rows: list[tuple[Any, ...]],
    numbers: list[int],
    path: str,
    src: dict[str, Any],
    check: bool,
) -> pa.Table:
    """Normalise rows of wanted JSON values; ``check`` fails when no row has an id column."""
    wanted = wanted_columns(src)
    columns = list(zip(*rows, strict=True))
    arrays = {}
    reasons = None
    for c, values in zip(wanted, columns, strict=True):
        arrays[c], flagged = json_binary(values)
        for key, label in ((src["user"], "user"), (src["item"], "item")):
            if c == key and flagged.any():
                if reasons is None:
                    reasons = np.full(len(rows), None, dtype=object)
                unset = np.array([r is None for r in reasons], dtype=bool)
                reasons[flagged & unset] = id_reasons(label)["not_scalar"]
    table = pa.table(arrays)
    ids = (src["user"], src["item"])
    if check and all(table.column(c).null_count == table.num_rows for c in ids):
        check_columns(path, [], src)
    return normalise(table, path, 0, src, rows=np.asarray(numbers, dtype=np.int64), reasons=reasons)


# ---------------------------------------------------------------- Parquet


def parquet_table(part: pa.Table, path: str, spec: dict[str, Any]) -> pa.Table:
    """Normalise the rows of one Parquet file (any column types) read as one Arrow table.

    Typed columns go to ``normalise`` as they are (no round trip through text): integer ids are
    their digits, whole float ids lose their decimal part, timestamps and dates are times
    whatever ``timestamp_unit`` says. An id of a boolean, list or struct column is quarantined.
    """
    check_columns(path, part.schema.names, spec)
    cols = {c: part.column(c) for c in wanted_columns(spec)}
    return normalise(pa.table(cols), path, -1, spec)


# ---------------------------------------------------------------- headers


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
            with open_bytes(path, spec) as f:
                first = next(_lines(_blocks(f, spec["encoding"], size=1 << 16)), None)
            if first is None:
                warnings.append(f"{path}: empty file")
                continue
            _, run, _ = first
            header = None if run is None else run.split(b"\n", 1)[0]
            if header is None or len(header) > MAX_ROW_BYTES:
                raise IngestError(_HEADER_TOO_LONG.format(path=path))
            check_csv_columns(path, csv_header(header, path, spec), spec)
    return warnings
