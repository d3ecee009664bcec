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
"""

from __future__ import annotations

import codecs
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.config import DataArgs
from app.ingest.errors import IngestError
from app.ingest.sources import FORMAT_SUFFIXES, RawSource
from app.ingest.validate import (
    bad_rows,
    check_columns,
    id_reasons,
    normalise,
    wanted_columns,
)
from app.store import filesystem_for, s3_storage_options

MAX_ROW_BYTES = 4 << 20
"""Longest CSV or JSON line (bytes, without its line end) read; longer ones are quarantined."""
ROW_TOO_LONG = f"row too long (over {MAX_ROW_BYTES >> 20} MiB)"
MAX_JSON_DEPTH = 64
"""Deepest nesting of arrays and objects in a JSON line; deeper lines are quarantined."""
JSON_TOO_DEEP = f"invalid JSON (nested deeper than {MAX_JSON_DEPTH} levels)"
CSV_QUOTES = "malformed CSV row: unbalanced quotes (a quoted value cannot span lines)"
CSV_CARRIAGE_RETURN = "malformed CSV row: carriage return inside the row"
CSV_UNPARSABLE = "malformed CSV row: cannot be parsed"
_HEADER_TOO_LONG = "{path}: the CSV header is longer than " + f"{MAX_ROW_BYTES >> 20} MiB"

# Files are read in blocks of this many bytes; CSV is parsed and normalised per block.
_READ_BYTES = 16 << 20
# pyarrow parses in blocks of this size (fastest around 1 MiB), or larger: a row must fit in one.
_CSV_BLOCK_BYTES = 1 << 20
# Quarantine keeps this many characters of a record that could not be parsed.
_RAW_CHARS = 500
_WS = b" \t\r\n\x0b\x0c"
_BOM = codecs.BOM_UTF8
_NEWLINE, _CR = 10, 13
_IS_WS = np.zeros(256, dtype=bool)
_IS_WS[list(_WS)] = True
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


@contextmanager
def _open(path: str, spec: dict[str, Any]) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed by suffix (``.gz`` ...), local or on an object store."""
    fs, p = filesystem_for(path, spec.get("storage_options"))
    with fs.open(p, "rb", compression="infer") as f:
        yield f


def _blocks(f: IO[bytes], encoding: str, size: int | None = None) -> Iterator[bytes]:
    """The file as UTF-8 blocks, a leading byte-order mark dropped.

    Text in another encoding is transcoded here; bytes it cannot decode pass through as bytes
    that are not UTF-8, so that validation quarantines only the values that hold them.
    """
    size = size or _READ_BYTES
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise IngestError(f"unknown encoding {encoding!r}: check data.encoding") from None
    if name == "utf-8":
        first = True
        while block := f.read(size):
            if first and block.startswith(_BOM):
                block = block[len(_BOM) :]
            first = False
            if block:
                yield block
        return
    decoder = codecs.getincrementaldecoder(name)("surrogateescape")
    first = True
    while True:
        block = f.read(size)
        text = decoder.decode(block, final=not block)
        if first and text.startswith("\ufeff"):
            text = text[1:]
        if text:
            first = False
            yield text.encode("utf-8", "surrogateescape")
        if not block:
            return


def _quiet_decode_errors(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    def quiet(unraisable: Any) -> object:
        if isinstance(unraisable.exc_value, UnicodeDecodeError):
            return None
        return hook(unraisable)

    return quiet


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _raw(data: bytes) -> str:
    return data[: _RAW_CHARS * 4].decode("utf-8", "replace")[:_RAW_CHARS]


def _lines(blocks: Iterator[bytes]) -> Iterator[tuple[int, bytes | None, bytes]]:
    r"""Split blocks into runs of whole lines: ``(first line number, run, b"")``.

    A run ends with ``\n`` (but the file's last one may not). A line longer than the read
    buffer is never held: it comes alone as ``(line number, None, its first bytes)``, unless
    it is blank (then it is skipped, as a blank line is no record).
    """
    line_no = 0
    carry = b""
    skipping = False  # inside a line too long to hold
    head = b""  # the start of that line
    blank = True  # and whether it is blank so far
    for block in blocks:
        if skipping:
            cut = block.find(b"\n")
            part = block if cut < 0 else block[:cut]
            blank = blank and not part.strip(_WS)
            if cut < 0:
                continue
            if not blank:
                yield line_no, None, head
            line_no += 1
            skipping, block = False, block[cut + 1 :]
            if not block:
                continue
        data = carry + block if carry else block
        cut = data.rfind(b"\n")
        if cut < 0:
            run, carry = b"", data
        else:
            run, carry = data[: cut + 1], data[cut + 1 :]
        if run:
            yield line_no, run, b""
            line_no += run.count(b"\n")
        if len(carry) > MAX_ROW_BYTES:
            skipping, head, blank = True, carry[: _RAW_CHARS * 4], not carry.strip(_WS)
            carry = b""
    if skipping and not blank:
        yield line_no, None, head
    elif carry:
        yield line_no, carry, b""


def _line_bounds(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Per line of a run: start, end of content (before ``\r\n`` / ``\n``) and end (after)."""
    nl = np.flatnonzero(arr == _NEWLINE)
    stops = nl + 1
    if len(arr) and arr[-1] != _NEWLINE:
        stops = np.append(stops, len(arr))
        nl = np.append(nl, len(arr))
    starts = np.empty(len(stops), dtype=np.int64)
    if len(stops):
        starts[0] = 0
        starts[1:] = stops[:-1]
    ends = nl.astype(np.int64)
    has = ends > starts
    cr = np.zeros(len(ends), dtype=bool)
    cr[has] = arr[ends[has] - 1] == _CR
    return starts, ends - cr, stops


def _blank_lines(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Which lines hold only whitespace; only lines that start with whitespace are scanned."""
    if not len(starts):
        return np.zeros(0, dtype=bool)
    empty = ends <= starts
    maybe = empty.copy()
    maybe[~empty] = _IS_WS[arr[starts[~empty]]]
    if not maybe.any():
        return maybe
    # A line is blank when none of its bytes (up to the next line's start) is non-space.
    nonws = ~_IS_WS[arr]
    has_text = np.logical_or.reduceat(nonws, starts) if len(arr) else np.zeros(0, dtype=bool)
    return maybe & ~has_text


# ---------------------------------------------------------------- counting


def _format(path: str, spec: dict[str, Any]) -> str:
    if spec.get("format"):
        return str(spec["format"])
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if path.lower().endswith(suffixes):
            return fmt
    raise IngestError(f"{path}: cannot tell the format; set spec['format']")


def count_rows(path: str, spec: dict[str, Any]) -> int:
    r"""How many records ``path`` holds, counted from its bytes alone (not by the parser).

    Parquet: the rows in the file's row-group metadata. CSV and JSON lines: the lines that are
    not blank, the last one counted with or without its ``\n``; a CSV header is not a record.
    Every record comes out of ``csv_batches`` / ``jsonl_batches`` / ``parquet_table`` as
    exactly one normalised or quarantined row, so ``rows_read`` can be checked against them.
    """
    fmt = _format(path, spec)
    if fmt == "parquet":
        fs, p = filesystem_for(path, spec.get("storage_options"))
        with fs.open(p, "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    records = 0
    line_no = 0  # of the next line to finish
    open_line = False  # a line is in progress across blocks
    open_text = False  # and it holds a non-space byte
    first_text = False  # line 0 holds a non-space byte (a CSV header)
    with _open(path, spec) as f:
        for block in _blocks(f, spec.get("encoding", "utf-8")):
            arr = np.frombuffer(block, dtype=np.uint8)
            nl = np.flatnonzero(arr == _NEWLINE)
            if not len(nl):
                open_line = True
                open_text = open_text or bool(block.strip(_WS))
                continue
            # Line i of this block ends at nl[i]; it may have started in an earlier block.
            starts = np.r_[0, nl[:-1] + 1]
            whole = arr[: nl[-1] + 1]
            first_ws = _IS_WS[whole[starts]]
            text = ~first_ws
            if first_ws.any():
                text = np.logical_or.reduceat(~_IS_WS[whole], starts)
            if open_line:
                text[0] = text[0] or open_text
            if line_no == 0:
                first_text = bool(text[0])
            records += int(np.count_nonzero(text))
            line_no += len(nl)
            tail = block[nl[-1] + 1 :]
            open_line, open_text = bool(tail), bool(tail.strip(_WS))
    if open_line:
        records += int(open_text)
        if line_no == 0:
            first_text = open_text
    if fmt == "csv":
        records -= int(first_text)
    return records


# ---------------------------------------------------------------- CSV


def _csv_header(line: bytes, path: str, spec: dict[str, Any]) -> list[str]:
    """Column names of a CSV header line (UTF-8 bytes, line end included or not)."""
    try:
        return pacsv.read_csv(
            io.BytesIO(line.rstrip(b"\r\n") + b"\n"),
            parse_options=pacsv.ParseOptions(delimiter=spec["delimiter"]),
        ).schema.names
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise IngestError(
            f"{path}: cannot read the CSV header ({exc}); check data.encoding "
            f"({spec['encoding']}) and data.delimiter ({spec['delimiter']!r})"
        ) from None


def _check_csv_columns(path: str, names: list[str], spec: dict[str, Any]) -> None:
    """``check_columns``, and each wanted column named once."""
    check_columns(path, names, spec)
    twice = [c for c in wanted_columns(spec) if names.count(c) > 1]
    if twice:
        raise IngestError(f"{path}: column(s) {', '.join(twice)} appear more than once")


class _CsvRun:
    """Parse one run of CSV lines with pyarrow, one record per line whatever the quoting.

    pyarrow lets a quoted value run across lines: a stray quote would merge lines into one
    record and break the count. So a run is parsed with a sentinel row after it (as many
    empty fields as the header); when the records out are not one per line plus the sentinel,
    the run is halved until the lines at fault stand alone, and those are quarantined.
    """

    def __init__(self, names: list[str], spec: dict[str, Any]) -> None:
        self.names = names
        self.sentinel = (spec["delimiter"] * (len(names) - 1) + "\n").encode()
        self.block_size = _CSV_BLOCK_BYTES
        self.undecodable = False  # the run holds bytes that are not UTF-8
        self.wanted = wanted_columns(spec)
        self.delimiter = spec["delimiter"]
        self.convert_options = pacsv.ConvertOptions(
            column_types={c: pa.binary() for c in self.wanted},
            include_columns=self.wanted,
            # Only an empty field is missing: "NA", "null" or "NaN" are text, as in JSON.
            strings_can_be_null=False,
        )

    def _try(self, data: bytes, n: int) -> tuple[pa.Table, list[tuple[int, str, str]]] | None:
        """Parse ``n`` lines; None unless they give ``n`` records (plus the sentinel's)."""
        invalid: list[tuple[int, str, str]] = []

        def on_invalid(row: Any) -> str:
            invalid.append(
                (
                    -1 if row.number is None else row.number - 1,
                    f"malformed CSV row: expected {row.expected_columns} fields, "
                    f"got {row.actual_columns}",
                    (row.text or "")[:_RAW_CHARS],
                )
            )
            return "skip"

        if data and not data.endswith(b"\n"):
            data += b"\n"
        hook = sys.unraisablehook
        if self.undecodable:
            # pyarrow cannot hand a row that is not UTF-8 to on_invalid: it fails decoding it
            # (then the read fails and the run is halved) and reports the error as unraisable.
            sys.unraisablehook = _quiet_decode_errors(hook)
        try:
            table = pacsv.read_csv(
                pa.BufferReader(data + self.sentinel),
                read_options=pacsv.ReadOptions(
                    column_names=self.names, use_threads=False, block_size=self.block_size
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=self.delimiter, invalid_row_handler=on_invalid
                ),
                convert_options=self.convert_options,
            )
        except (pa.ArrowInvalid, UnicodeDecodeError):
            return None
        finally:
            sys.unraisablehook = hook
        if table.num_rows + len(invalid) != n + 1 or any(not 0 <= i[0] < n for i in invalid):
            return None
        return table.slice(0, table.num_rows - 1), invalid

    def parse(
        self, buf: bytes, starts: np.ndarray, stops: np.ndarray, lines: np.ndarray
    ) -> tuple[list[pa.Table], list[np.ndarray], list[tuple[int, str, str]]]:
        """Parse ``lines`` (indices into the run ``buf``): tables, their line indices, bad lines.

        Bad lines come back as ``(line index, reason, raw text)``.
        """
        longest = int((stops[lines] - starts[lines]).max()) if len(lines) else 0
        self.block_size = max(_CSV_BLOCK_BYTES, 2 * longest + (1 << 16))
        tables: list[pa.Table] = []
        at: list[np.ndarray] = []
        bad: list[tuple[int, str, str]] = []
        todo = [lines]
        while todo:
            idx = todo.pop()
            if not len(idx):
                continue
            got = self._try(self._gather(buf, starts, stops, idx), len(idx))
            if got is not None:
                table, invalid = got
                for i, why, text in invalid:
                    bad.append((int(idx[i]), why, text))
                keep = np.delete(idx, [i for i, _, _ in invalid])
                tables.append(table)
                at.append(keep)
            elif len(idx) == 1:
                line = buf[starts[idx[0]] : stops[idx[0]]]
                why = CSV_QUOTES if b'"' in line else CSV_UNPARSABLE
                bad.append((int(idx[0]), why, _raw(line)))
            else:
                half = len(idx) // 2
                todo += [idx[half:], idx[:half]]
        return tables, at, bad

    def check_undecodable(
        self, buf: bytes, starts: np.ndarray, stops: np.ndarray, lines: np.ndarray
    ) -> tuple[np.ndarray, list[tuple[int, str, str]]]:
        """Take out the lines that are not UTF-8 and have the wrong number of fields.

        pyarrow cannot report such a row to the invalid-row handler (it fails decoding its
        text), so each is parsed alone with its bad bytes replaced, only to count its fields. A
        line with the right number of fields stays: validation quarantines its bad values.
        """
        high = np.flatnonzero(np.frombuffer(buf, dtype=np.uint8) >= 0x80)
        suspects = np.intersect1d(np.searchsorted(starts, high, side="right") - 1, lines)
        bad: list[tuple[int, str, str]] = []
        for i in suspects:
            line = buf[starts[i] : stops[i]]
            if _is_utf8(line):
                continue
            got = self._try(line.decode("utf-8", "replace").encode(), 1)
            if got is not None and got[1]:
                bad.append((int(i), got[1][0][1], got[1][0][2]))
        return np.setdiff1d(lines, [b[0] for b in bad]), bad

    @staticmethod
    def _gather(buf: bytes, starts: np.ndarray, stops: np.ndarray, idx: np.ndarray) -> bytes:
        """The bytes of lines ``idx`` (ascending) of ``buf``, in order."""
        first, last = int(idx[0]), int(idx[-1])
        if last - first + 1 == len(idx):
            return buf[starts[first] : stops[last]]
        keep = np.zeros(len(buf) + 1, dtype=np.int8)
        keep[starts[idx]] += 1
        keep[stops[idx]] -= 1
        mask = np.cumsum(keep[:-1], dtype=np.int8).astype(bool)
        return np.frombuffer(buf, dtype=np.uint8)[mask].tobytes()


def csv_batches(path: str, src: dict[str, Any]) -> Iterator[pa.Table]:
    """Stream one CSV file as normalised tables; lines that cannot be parsed are quarantined.

    One table of good and bad rows per block of lines (``_READ_BYTES``). Lines longer than
    ``MAX_ROW_BYTES``, with a carriage return inside, with the wrong number of fields or an
    unclosed quote are quarantined, each on its own; blank lines are skipped.
    """
    with _open(path, src) as f:
        runs = _lines(_blocks(f, src["encoding"]))
        parser: _CsvRun | None = None
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
                names = _csv_header(header, path, src)
                _check_csv_columns(path, names, src)
                parser = _CsvRun(names, src)
                first += 1
                if not run:
                    continue
            if run is None:
                yield bad_rows(path, [(first, ROW_TOO_LONG, _raw(head))])
                continue
            yield from _csv_run(run, first, path, src, parser)


def _csv_run(
    run: bytes, first: int, path: str, src: dict[str, Any], parser: _CsvRun
) -> Iterator[pa.Table]:
    """Normalised rows of one run of whole lines that starts at line ``first``."""
    arr = np.frombuffer(run, dtype=np.uint8)
    starts, ends, stops = _line_bounds(arr)
    blank = _blank_lines(arr, starts, ends)
    too_long = ~blank & (ends - starts > MAX_ROW_BYTES)
    inner_cr = np.zeros(len(starts), dtype=bool)
    # pyarrow ends a row at a lone \r too: a line holding one would give two records.
    if run.count(b"\r") > int(np.count_nonzero(arr[ends[ends < len(arr)]] == _CR)):
        cr = np.flatnonzero(arr == _CR)
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
    quarantined = [(first + i, why, _raw(run[starts[i] : ends[i]])) for i, why in bad]
    lines = np.flatnonzero(~blank & ~too_long & ~inner_cr & ~odd_quotes)
    parser.undecodable = bool(len(arr)) and int(arr.max()) >= 0x80 and not _is_utf8(run)
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

    with _open(path, src) as f:
        for first, run, head in _lines(_blocks(f, src["encoding"])):
            if run is None:
                bad.append((first, ROW_TOO_LONG, _raw(head)))
                continue
            lines = run.split(b"\n")
            if run.endswith(b"\n"):
                lines.pop()
            for n, line in enumerate(lines, start=first):
                text = line.strip(_WS)
                if not text:
                    continue
                obj, why = _json_object(text)
                if obj is None:
                    bad.append((n, str(why), _raw(text)))
                    continue
                rows.append(tuple(map(obj.get, wanted)))
                numbers.append(n)
                if len(rows) >= chunk or len(bad) >= chunk:
                    yield from flush()
        yield from flush()


def _binary(values: tuple[Any, ...]) -> tuple[pa.Array, np.ndarray]:
    """JSON values (str or None on the fast path) as a binary column, and a not-a-scalar mask.

    Booleans, arrays and objects become their JSON text; text that is not valid Unicode stays
    bytes that are not UTF-8, so that validation quarantines it.
    """
    flagged = np.zeros(len(values), dtype=bool)
    try:
        return pc.cast(pa.array(values, pa.string()), pa.binary()), flagged
    except (pa.ArrowInvalid, pa.ArrowTypeError, UnicodeEncodeError):
        pass
    out: list[bytes | None] = []
    for i, v in enumerate(values):
        if v is None:
            out.append(None)
            continue
        if not isinstance(v, str):
            flagged[i] = True
            v = json.dumps(v)
        out.append(v.encode("utf-8", "surrogatepass"))
    return pa.array(out, pa.binary()), flagged


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
        arrays[c], flagged = _binary(values)
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
            pc.equal(pc.cast(ints, col.type, safe=False), col),
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
        pass
    try:
        return pc.cast(pc.cast(col, pa.string()), pa.binary())
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
            with _open(path, spec) as f:
                first = next(_lines(_blocks(f, spec["encoding"], size=1 << 16)), None)
            if first is None:
                warnings.append(f"{path}: empty file")
                continue
            _, run, _ = first
            header = None if run is None else run.split(b"\n", 1)[0]
            if header is None or len(header) > MAX_ROW_BYTES:
                raise IngestError(_HEADER_TOO_LONG.format(path=path))
            _check_csv_columns(path, _csv_header(header, path, spec), spec)
    return warnings
