r"""Records of a text file: its bytes as UTF-8 blocks, framed into lines, and counted.

A record of a text file is one physical line (docs/ingest-validation.md): lines end at ``\n``
(a ``\r`` before it belongs to the line end) and a last line without one counts; a blank line
(only spaces, tabs, ``\r``, ``\v``, ``\f``) is no record. ``line_runs`` splits blocks into runs of
whole lines (a line too long to hold comes alone, cut), ``line_bounds`` / ``blank_lines`` find the
lines of a run, and ``count_records`` counts the records of a file from its bytes alone. The
sizes (block, longest line) are the readers' (``app.ingest.readers``), passed in.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO, Any

import numpy as np

from app.ingest.errors import IngestError
from app.ingest.sources import FORMAT_SUFFIXES
from app.store import filesystem_for

# Quarantine keeps this many characters of a record that could not be parsed.
RAW_CHARS = 500
WS = b" \t\r\n\x0b\x0c"
_BOM = codecs.BOM_UTF8
_NEWLINE, CR = 10, 13
_IS_WS = np.zeros(256, dtype=bool)
_IS_WS[list(WS)] = True


@contextmanager
def open_bytes(path: str, spec: dict[str, Any]) -> Iterator[IO[bytes]]:
    """The file's bytes, decompressed by suffix (``.gz`` ...), local or on an object store."""
    fs, p = filesystem_for(path, spec.get("storage_options"))
    with fs.open(p, "rb", compression="infer") as f:
        yield f


def utf8_blocks(f: IO[bytes], encoding: str, size: int) -> Iterator[bytes]:
    """The file as UTF-8 blocks, a leading byte-order mark dropped.

    Text in another encoding is transcoded here; bytes it cannot decode pass through as bytes
    that are not UTF-8, so that validation quarantines only the values that hold them.
    """
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


def is_utf8(data: bytes) -> bool:
    """Whether ``data`` is valid UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def raw_text(data: bytes) -> str:
    """The first ``RAW_CHARS`` characters of a record, for the quarantine."""
    return data[: RAW_CHARS * 4].decode("utf-8", "replace")[:RAW_CHARS]


def line_runs(
    blocks: Iterator[bytes], max_row_bytes: int
) -> Iterator[tuple[int, bytes | None, bytes]]:
    r"""Split blocks into runs of whole lines: ``(first line number, run, b"")``.

    A run ends with ``\n`` (but the file's last one may not). A line longer than the read
    buffer (over ``max_row_bytes``) is never held: it comes alone as
    ``(line number, None, its first bytes)``, unless it is blank (then it is skipped, as a blank
    line is no record).
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
            blank = blank and not part.strip(WS)
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
        if len(carry) > max_row_bytes:
            skipping, head, blank = True, carry[: RAW_CHARS * 4], not carry.strip(WS)
            carry = b""
    if skipping and not blank:
        yield line_no, None, head
    elif carry:
        yield line_no, carry, b""


def line_bounds(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
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
    cr[has] = arr[ends[has] - 1] == CR
    return starts, ends - cr, stops


def blank_lines(arr: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
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


def file_format(path: str, spec: dict[str, Any]) -> str:
    """The format of ``path``: ``spec['format']``, else by its suffix."""
    if spec.get("format"):
        return str(spec["format"])
    for fmt, suffixes in FORMAT_SUFFIXES.items():
        if path.lower().endswith(suffixes):
            return fmt
    raise IngestError(f"{path}: cannot tell the format; set spec['format']")


def count_records(blocks: Iterator[bytes], header: bool) -> int:
    r"""How many records a text file's blocks hold: the lines that are not blank.

    The last line counts with or without its ``\n``; with ``header`` (CSV), line 0 is not a record.
    """
    records = 0
    line_no = 0  # of the next line to finish
    open_line = False  # a line is in progress across blocks
    open_text = False  # and it holds a non-space byte
    first_text = False  # line 0 holds a non-space byte (a CSV header)
    for block in blocks:
        arr = np.frombuffer(block, dtype=np.uint8)
        nl = np.flatnonzero(arr == _NEWLINE)
        if not len(nl):
            open_line = True
            open_text = open_text or bool(block.strip(WS))
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
        open_line, open_text = bool(tail), bool(tail.strip(WS))
    if open_line:
        records += int(open_text)
        if line_no == 0:
            first_text = open_text
    if header:
        records -= int(first_text)
    return records
