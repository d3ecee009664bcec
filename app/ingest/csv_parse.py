"""CSV parsing: a header line's column names, and runs of whole lines parsed one record per line.

``CsvRun`` parses a run of lines (``app.ingest.records``) with pyarrow so that every line gives
exactly one record or one quarantined row, whatever its quoting; ``app.ingest.readers`` streams
files through it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from app.ingest.errors import IngestError
from app.ingest.records import RAW_CHARS, is_utf8, raw_text
from app.ingest.validate import check_columns, wanted_columns

CSV_QUOTES = "malformed CSV row: unbalanced quotes (a quoted value cannot span lines)"
CSV_CARRIAGE_RETURN = "malformed CSV row: carriage return inside the row"
CSV_UNPARSABLE = "malformed CSV row: cannot be parsed"

# pyarrow parses in blocks of this size (fastest around 1 MiB), or larger: a row must fit in one.
_CSV_BLOCK_BYTES = 1 << 20


def _quiet_decode_errors(hook: Callable[[Any], object]) -> Callable[[Any], object]:
    def quiet(unraisable: Any) -> object:
        if isinstance(unraisable.exc_value, UnicodeDecodeError):
            return None
        return hook(unraisable)

    return quiet


def csv_header(line: bytes, path: str, spec: dict[str, Any]) -> list[str]:
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


def check_csv_columns(path: str, names: list[str], spec: dict[str, Any]) -> None:
    """``check_columns``, and each wanted column named once."""
    check_columns(path, names, spec)
    twice = [c for c in wanted_columns(spec) if names.count(c) > 1]
    if twice:
        raise IngestError(f"{path}: column(s) {', '.join(twice)} appear more than once")


class CsvRun:
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
                    (row.text or "")[:RAW_CHARS],
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
                bad.append((int(idx[0]), why, raw_text(line)))
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
            if is_utf8(line):
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
