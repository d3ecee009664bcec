"""Bad rows without Ray: each odd value is quarantined with its reason or canonicalised the same
way in CSV, JSON lines and Parquet, and ``count_rows`` counts every record a reader gives."""

import codecs
import gzip
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from app.ingest import readers
from app.ingest.ids import MAX_ID_BYTES
from app.ingest.readers import (
    CSV_CARRIAGE_RETURN,
    CSV_QUOTES,
    JSON_TOO_DEEP,
    MAX_ROW_BYTES,
    ROW_TOO_LONG,
    count_rows,
    csv_batches,
    jsonl_batches,
    parquet_table,
)
from app.ingest.validate import MAX_TS_S, TS_MISSING, TS_RANGE

SPEC = {
    "user": "u",
    "item": "i",
    "timestamp": "t",
    "rating": "rating",
    "weight": None,
    "event": None,
    "event_weights": {},
    "timestamp_unit": "s",
    "delimiter": ",",
    "encoding": "utf-8",
}
COLS = ("u", "i", "t", "rating")
GOOD = {"u": 1, "i": 2, "t": 100, "rating": 4}
"""A good row; each case below replaces one of its values."""


def _read(path, fmt, **spec):
    spec = {**SPEC, **spec, "format": fmt}
    if fmt == "csv":
        tables = list(csv_batches(str(path), spec))
    elif fmt == "jsonl":
        tables = list(jsonl_batches(str(path), spec))
    else:
        tables = [parquet_table(pq.read_table(path), str(path), spec)]
    out = pa.concat_tables(tables).sort_by("row") if tables else None
    n = 0 if out is None else out.num_rows
    # Every record counted from the bytes (or metadata) comes out once, good or quarantined.
    assert count_rows(str(path), spec) == n
    return out


def _csv_cell(v):
    return v if isinstance(v, str) else json.dumps(v)


def _write(tmp_path, fmt, rows, name="f"):
    """Write rows (dicts of Python values; str values are written verbatim in CSV)."""
    if fmt == "csv":
        p = tmp_path / f"{name}.csv"
        lines = [",".join(COLS)] + [",".join(_csv_cell(r[c]) for c in COLS) for r in rows]
        p.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    elif fmt == "jsonl":
        p = tmp_path / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        p = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), p)
    return p


def _only(table):
    assert table.num_rows == 1
    return table.to_pylist()[0]


# ---------------------------------------------------------------- one canonical id


@pytest.mark.parametrize(
    ("csv", "jsonl", "parquet", "expected"),
    [
        ("1", 1, pa.array([1], pa.int64()), "1"),
        ("1.0", 1.0, pa.array([1.0]), "1"),
        ('"1"', "1", pa.array(["1"]), "1"),
        ('"1.0"', "1.0", pa.array(["1.0"]), "1"),
        ("+1", "+1", pa.array(["+1"]), "1"),
        (" 1 ", " 1 ", pa.array([" 1 "]), "1"),
        ("1e3", 1e3, pa.array([1000.0], pa.float32()), "1000"),
        ("-0.0", -0.0, pa.array([-0.0]), "0"),
        ("007", "007", pa.array(["007"]), "007"),  # leading zeros: a string id, kept
        (" u1\t", " u1\t", pa.array([" u1\t"]), "u1"),
        ("9007199254740993", 9007199254740993, pa.array([9007199254740993], pa.uint64()),
         "9007199254740993"),
        # beyond int64 in JSON: the exact digits, never a float
        ("123456789012345678901234567890", 123456789012345678901234567890,
         pa.array(["123456789012345678901234567890"]), "123456789012345678901234567890"),
        ("123456789012345678901234567890.000", "123456789012345678901234567890.000",
         pa.array(["123456789012345678901234567890.000"]), "123456789012345678901234567890"),
    ],
)  # fmt: skip
def test_the_same_id_in_every_format_gives_one_canonical_id(
    tmp_path, csv, jsonl, parquet, expected
):
    row = {**GOOD}
    got = {}
    for fmt, value in (("csv", csv), ("jsonl", jsonl)):
        p = _write(tmp_path, fmt, [{**row, "u": value}])
        got[fmt] = _only(_read(p, fmt))
    table = pa.Table.from_pylist([row]).set_column(0, "u", parquet)
    pq.write_table(table, tmp_path / "f.parquet")
    got["parquet"] = _only(_read(tmp_path / "f.parquet", "parquet"))
    for fmt, r in got.items():
        assert (fmt, r["reason"], r["user"]) == (fmt, None, expected)


def test_the_same_rows_give_the_same_normalised_rows_in_every_format(tmp_path):
    rows = [
        {"u": 1, "i": "10", "t": 1_600_000_000, "rating": 4.5},
        {"u": 2, "i": "x y", "t": 0, "rating": 0},
        {"u": 1, "i": "11", "t": MAX_TS_S, "rating": 3.4e38},
        {"u": 3, "i": "ünï", "t": 5, "rating": 1e-3},
        {"u": 3, "i": "bad", "t": -1, "rating": 1},  # quarantined alike
        {"u": 4, "i": "bad", "t": 7, "rating": 1e39},
    ]
    csv_rows = [{**r, "i": f'"{r["i"]}"'} for r in rows]
    out = {
        "csv": _read(_write(tmp_path, "csv", csv_rows), "csv"),
        "jsonl": _read(_write(tmp_path, "jsonl", rows), "jsonl"),
        "parquet": _read(_write(tmp_path, "parquet", rows), "parquet"),
    }

    def rows_of(t):
        cols = ["user", "item", "ts", "w", "reason"]
        return sorted(t.select(cols).to_pylist(), key=lambda r: (str(r["reason"]), str(r)))

    assert rows_of(out["csv"]) == rows_of(out["jsonl"]) == rows_of(out["parquet"])
    good = out["csv"].filter(pc.is_null(out["csv"].column("reason")))
    assert sorted(good.column("item").to_pylist()) == ["10", "11", "x y", "ünï"]
    assert sorted(r for r in out["csv"].column("reason").to_pylist() if r) == [
        "rating out of range (float32)",
        TS_RANGE,
    ]


# ---------------------------------------------------------------- one reason per bad value


BAD_VALUES = [
    # (column, CSV text, JSON value, Parquet array, reason)
    ("rating", "1e39", 1e39, pa.array([1e39]), "rating out of range (float32)"),
    ("rating", "inf", math.inf, pa.array([math.inf]), "non-finite rating"),
    ("rating", "-inf", -math.inf, pa.array([-math.inf]), "non-finite rating"),
    ("rating", "NaN", math.nan, pa.array([math.nan], pa.float32()), "non-finite rating"),
    ("rating", "-1", -1, pa.array([-1]), "negative rating"),
    ("rating", '"4,5"', "4,5", pa.array(["4,5"]), "non-numeric rating"),
    ("rating", "", None, pa.array([None], pa.float64()), "missing rating"),
    ("t", "9223372037", 9223372037, pa.array([9223372037]), TS_RANGE),  # after 2262-04-11
    ("t", "99999999999999999999", 99999999999999999999, pa.array([2**64 - 1], pa.uint64()),
     TS_RANGE),  # overflows int64
    ("t", "-1", -1, pa.array([-1]), TS_RANGE),
    ("t", "inf", math.inf, pa.array([math.inf]), TS_RANGE),
    ("t", "nan", math.nan, pa.array([math.nan]), TS_MISSING),
    ("t", "soon", "soon", pa.array(["soon"]), TS_MISSING),
    ("t", "", None, pa.array([None], pa.int64()), TS_MISSING),
    ("u", '"a\x00b"', "a\x00b", pa.array(["a\x00b"]), "user id contains a control character"),
    ("u", '"a\tb"', "a\tb", pa.array(["a\tb"]), "user id contains a control character"),
    ("u", '"a\u200bb"', "a\u200bb", pa.array(["a\u200bb"]), "user id contains a control character"),
    ("u", '"   "', "   ", pa.array(["   "]), "missing user id"),
    ("u", "", None, pa.array([None], pa.int64()), "missing user id"),
    ("u", "1.5", 1.5, pa.array([1.5]), "user id is a non-integer number"),
    ("u", "nan", math.nan, pa.array([math.nan]), "user id is a non-integer number"),
    ("u", "-inf", -math.inf, pa.array([-math.inf]), "user id is a non-integer number"),
    # a float beyond 2**53 is not one exact integer
    ("u", "1e20", 1e20, pa.array([1e20]), "user id is a non-integer number"),
    ("i", "x" * (MAX_ID_BYTES + 1), "x" * (MAX_ID_BYTES + 1), pa.array(["x" * (MAX_ID_BYTES + 1)]),
     f"item id longer than {MAX_ID_BYTES} bytes"),
]  # fmt: skip


@pytest.mark.parametrize(("col", "csv", "jsonl", "parquet", "reason"), BAD_VALUES)
def test_bad_values_get_the_same_reason_in_every_format(tmp_path, col, csv, jsonl, parquet, reason):
    got = {}
    for fmt, value in (("csv", csv), ("jsonl", jsonl)):
        p = _write(tmp_path, fmt, [{**GOOD, col: value}])
        got[fmt] = _only(_read(p, fmt))
    table = pa.Table.from_pylist([GOOD])
    table = table.set_column(COLS.index(col), col, parquet)
    pq.write_table(table, tmp_path / "f.parquet")
    got["parquet"] = _only(_read(tmp_path / "f.parquet", "parquet"))
    for fmt, r in got.items():
        assert (fmt, r["reason"]) == (fmt, reason)
        assert r["user"] is None and r["item"] is None and r["raw"]


def test_the_last_valid_timestamp_is_kept(tmp_path):
    p = _write(tmp_path, "csv", [{**GOOD, "t": MAX_TS_S}, {**GOOD, "t": "9223372036.9"}])
    assert _read(p, "csv").column("ts").to_pylist() == [MAX_TS_S, MAX_TS_S]
    ms = _write(tmp_path, "csv", [{**GOOD, "t": MAX_TS_S * 1000}, {**GOOD, "t": 2**63 - 1}])
    assert _read(ms, "csv", timestamp_unit="ms").column("reason").to_pylist() == [None, TS_RANGE]


def test_iso_timestamps_past_2262_or_before_1970_are_out_of_range(tmp_path):
    p = _write(
        tmp_path,
        "csv",
        [
            {**GOOD, "t": "2262-04-11T23:47:16Z"},
            {**GOOD, "t": "2262-04-11T23:47:17Z"},
            {**GOOD, "t": "3000-01-01T00:00:00Z"},
            {**GOOD, "t": "1969-12-31T23:59:59Z"},
            {**GOOD, "t": "10000-01-01"},
        ],
    )
    t = _read(p, "csv", timestamp_unit="iso")
    assert t.column("reason").to_pylist() == [None, TS_RANGE, TS_RANGE, TS_RANGE, TS_MISSING]


def test_parquet_timestamps_are_times_whatever_the_unit(tmp_path):
    stamps = pa.array([1_000_500, 32_503_680_000_000, -500], pa.timestamp("ms"))  # 3000 AD
    table = pa.Table.from_pylist([GOOD] * 3).set_column(2, "t", stamps)
    pq.write_table(table, tmp_path / "f.parquet")
    for unit in ("s", "ms", "iso"):
        t = _read(tmp_path / "f.parquet", "parquet", timestamp_unit=unit)
        assert t.column("ts").to_pylist()[0] == 1000
        # before 1970 by half a second: floored to -1, not truncated to 0
        assert t.column("reason").to_pylist() == [None, TS_RANGE, TS_RANGE]


def test_ids_that_are_not_scalars_are_quarantined(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(
        '{"u": true, "i": 2, "t": 1, "rating": 1}\n'
        '{"u": 1, "i": [2], "t": 1, "rating": 1}\n'
        '{"u": 1, "i": {"a": 1}, "t": 1, "rating": 1}\n'
        '{"u": 1, "i": 2, "t": true, "rating": [1]}\n'
    )
    assert _read(p, "jsonl").column("reason").to_pylist() == [
        "user id is not a string or number",
        "item id is not a string or number",
        "item id is not a string or number",
        TS_MISSING,
    ]
    table = pa.table({"u": [True], "i": [2], "t": [1], "rating": [1]})
    pq.write_table(table, tmp_path / "f.parquet")
    r = _only(_read(tmp_path / "f.parquet", "parquet"))
    assert r["reason"] == "user id is not a string or number"


def test_csv_text_that_means_null_elsewhere_is_text(tmp_path):
    p = _write(
        tmp_path, "csv", [{**GOOD, "u": "NA"}, {**GOOD, "u": "null"}, {**GOOD, "rating": "null"}]
    )
    t = _read(p, "csv")
    assert t.column("user").to_pylist() == ["NA", "null", None]
    assert t.column("reason").to_pylist() == [None, None, "non-numeric rating"]


# ---------------------------------------------------------------- records a parser chokes on


def test_a_deeply_nested_json_line_is_quarantined(tmp_path):
    p = tmp_path / "f.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    nested_values = json.dumps([{"a": [i]} for i in range(200)])  # many brackets, depth 3
    p.write_text(
        json.dumps(GOOD)
        + "\n"
        + f'{{"u": 1, "x": {deep}}}\n'
        + deep
        + "\n"
        + '{"u": 1, "x": "'
        + "[" * 500
        + '", "i": 2, "t": 3, "rating": 4}\n'
        + f'{{"u": 1, "i": 2, "t": 3, "rating": 4, "x": {nested_values}}}\n'
        + "[1, 2]\n"
        + '"just a string"\n'
        + "{not json\n"
        + '{"u": 1} trailing\n'
    )
    t = _read(p, "jsonl")
    assert t.column("reason").to_pylist() == [
        None,
        JSON_TOO_DEEP,
        JSON_TOO_DEEP,
        None,  # brackets inside a string do not nest
        None,
        "JSON line is not an object",
        "JSON line is not an object",
        "invalid JSON (Expecting property name enclosed in double quotes)",
        "invalid JSON (Extra data)",
    ]
    assert t.column("row").to_pylist() == list(range(9))
    assert all(len(r) <= 500 for r in t.column("raw").to_pylist() if r)


def test_recursion_error_is_a_quarantine_reason_not_a_crash(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MAX_JSON_DEPTH", 10**9)  # no pre-screen: json itself gives up
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    assert _read(p, "jsonl").column("reason").to_pylist() == [None, JSON_TOO_DEEP]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_a_16_mib_row_is_quarantined_and_the_rest_read(tmp_path, fmt):
    huge = "x" * (16 << 20)
    rows = [GOOD, {**GOOD, "u": huge}, {**GOOD, "u": 5}, {**GOOD, "i": "y" * (MAX_ROW_BYTES + 10)}]
    # a long row that is allowed: the extra column keeps it under MAX_ROW_BYTES, over pyarrow's
    # default block
    rows.append({**GOOD, "u": 6, "i": "z" * (2 << 20)})
    p = _write(tmp_path, fmt, rows)
    t = _read(p, fmt)
    by_row = dict(zip(t.column("row").to_pylist(), t.column("reason").to_pylist(), strict=True))
    first = 1 if fmt == "csv" else 0
    assert by_row == {
        first: None,
        first + 1: ROW_TOO_LONG,
        first + 2: None,
        first + 3: ROW_TOO_LONG,
        first + 4: "item id longer than 1024 bytes",
    }
    # the quarantine keeps the start of a huge record or value, not all of it
    assert max(len(r) for r in t.column("raw").to_pylist() if r) < 1000


def test_a_huge_blank_line_is_no_record(tmp_path):
    p = tmp_path / "f.csv"
    p.write_bytes(b"u,i,t,rating\n1,2,3,4\n" + b" " * (17 << 20) + b"\n5,6,7,8")
    assert _read(p, "csv").column("row").to_pylist() == [1, 3]


def test_a_huge_csv_header_fails_the_file(tmp_path):
    p = tmp_path / "f.csv"
    p.write_bytes(b"u,i,t,rating" + b"x" * (MAX_ROW_BYTES + 1) + b"\n1,2,3,4\n")
    with pytest.raises(readers.IngestError, match="header is longer"):
        list(csv_batches(str(p), {**SPEC, "format": "csv"}))


def test_csv_quotes_that_span_lines_or_do_not_close_are_quarantined_per_line(tmp_path):
    p = tmp_path / "f.csv"
    p.write_bytes(
        b"u,i,t,rating,note\n"
        b'1,2,3,4,"fine, quoted"\n'
        b'1,2,3,4,"spans\n'  # the first line of a value quoted across lines
        b'two lines"\n'  # and its last
        b'1,2,3,4,a"b,"c\n'  # even quotes, but the last opens a value that never closes
        b"5,6,7,8,after\n"
        b'"1","2","3","4","all quoted"\n'
        b'1,2,"3\r4",4,x\n'  # a lone \r would end a row inside pyarrow
        b"1,2,3\n"
    )
    t = _read(p, "csv")
    by_row = dict(zip(t.column("row").to_pylist(), t.column("reason").to_pylist(), strict=True))
    assert by_row == {
        1: None,
        2: CSV_QUOTES,
        3: CSV_QUOTES,
        4: CSV_QUOTES,
        5: None,
        6: None,
        7: CSV_CARRIAGE_RETURN,
        8: "malformed CSV row: expected 5 fields, got 3",
    }


def test_unbalanced_quotes_in_a_big_run_find_only_the_bad_lines(tmp_path):
    lines = [f"{u},{u % 7},{u},1" for u in range(20_000)]
    lines[123] = '1,2,3,"4'
    lines[15_000] = '1,"2",3,4,"x'  # even count of quotes, opens a value at its end
    p = tmp_path / "f.csv"
    p.write_text("u,i,t,rating\n" + "\n".join(lines) + "\n")
    t = _read(p, "csv")
    bad = t.filter(pc.is_valid(t.column("reason")))
    assert sorted(bad.column("row").to_pylist()) == [124, 15_001]
    assert t.num_rows == 20_000


# ---------------------------------------------------------------- counting


@pytest.mark.parametrize(
    "body",
    [
        b"u,i,t,rating\n1,2,3,4\n5,6,7,8\n",
        b"u,i,t,rating\n1,2,3,4\n5,6,7,8",  # no newline at the end
        b"u,i,t,rating\r\n1,2,3,4\r\n5,6,7,8\r\n",  # CRLF
        b"u,i,t,rating\r\n1,2,3,4\r\n5,6,7,8\r",  # CRLF, the last without \n
        b"u,i,t,rating\n\n1,2,3,4\n   \n\t\r\n5,6,7,8\n\n\n",  # blank lines
        b"u,i,t,rating\n1,2\n,,,\n1,2,3,4,5\nx,y,z,w\n\xff,2,3,4",  # bad rows
        b"\xef\xbb\xbfu,i,t,rating\n1,2,3,4\n",  # byte-order mark
        b"u,i,t,rating",  # a header only
        b"u,i,t,rating\n",
        b"",
    ],
)
def test_count_rows_matches_the_csv_reader(tmp_path, body):
    p = tmp_path / "f.csv"
    p.write_bytes(body)
    _read(p, "csv")


@pytest.mark.parametrize(
    "body",
    [
        b'{"u": 1, "i": 2, "t": 3, "rating": 4}\n{"u": 1, "i": 3, "t": 3, "rating": 4}\n',
        b'{"u": 1, "i": 2, "t": 3, "rating": 4}\n{"u": 1, "i": 3, "t": 3, "rating": 4}',
        b'{"u": 1, "i": 2, "t": 3, "rating": 4}\r\n{"u": 1, "i": 3, "t": 3, "rating": 4}\r\n',
        b'\n\n{"u": 1, "i": 2, "t": 3, "rating": 4}\n  \n\t\r\n{"u": 1, "i": 3}\n\n',
        b'{"u": 1, "i": 2, "t": 3, "rating": 4}\nnot json\n[1]\n\xff\xfe\n{"u": "\xff"}\n',
        b'\xef\xbb\xbf{"u": 1, "i": 2, "t": 3, "rating": 4}\n',
        b"\n",
        b"",
    ],
)
def test_count_rows_matches_the_jsonl_reader(tmp_path, body):
    p = tmp_path / "f.jsonl"
    p.write_bytes(body)
    _read(p, "jsonl")


def test_count_rows_streams_blocks(tmp_path, monkeypatch):
    # small blocks: lines and blank lines straddle block boundaries
    monkeypatch.setattr(readers, "_READ_BYTES", 7)
    rng = np.random.default_rng(0)
    lines = []
    for k in range(300):
        kind = rng.integers(0, 4)
        lines.append(["", "   ", f"{k},{k},{k},1", f"{k},x"][kind])
    body = "u,i,t,rating\n" + "\r\n".join(lines)
    for fmt, text in (("csv", body), ("jsonl", body.replace(",", " ").split("\n", 1)[1])):
        p = tmp_path / f"f.{fmt}"
        p.write_text(text)
        expected = sum(1 for line in text.split("\n") if line.strip()) - (fmt == "csv")
        assert count_rows(str(p), {**SPEC, "format": fmt}) == expected
        _read(p, fmt)


def test_count_rows_reads_parquet_metadata(tmp_path):
    table = pa.Table.from_pylist([GOOD] * 10)
    pq.write_table(table, tmp_path / "f.parquet", row_group_size=3)
    assert pq.ParquetFile(tmp_path / "f.parquet").metadata.num_row_groups == 4
    assert count_rows(str(tmp_path / "f.parquet"), {**SPEC, "format": "parquet"}) == 10
    # the format may also come from the suffix
    assert count_rows(str(tmp_path / "f.parquet"), SPEC) == 10


def test_compressed_and_transcoded_files_count_and_read_alike(tmp_path):
    text = "u,i,t,rating\nJosé,2,3,4\n\n5,6,7,8\n"
    with gzip.open(tmp_path / "f.csv.gz", "wt") as f:
        f.write(text)
    t = _read(tmp_path / "f.csv.gz", "csv")
    assert t.column("user").to_pylist() == ["José", "5"]
    (tmp_path / "l.csv").write_bytes(text.encode("latin-1"))
    assert _read(tmp_path / "l.csv", "csv", encoding="latin-1").column("user").to_pylist() == [
        "José",
        "5",
    ]
    (tmp_path / "w.csv").write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))
    assert _read(tmp_path / "w.csv", "csv", encoding="utf-16").column("user").to_pylist() == [
        "José",
        "5",
    ]
    # a byte cp1252 cannot decode quarantines its value only
    (tmp_path / "c.csv").write_bytes(b"u,i,t,rating\n\x81,2,3,4\n5,6,7,8\n")
    t = _read(tmp_path / "c.csv", "csv", encoding="cp1252")
    assert t.column("reason").to_pylist() == ["column u: not valid cp1252", None]


CSV_FRAGMENTS = [
    "1,2,3,4",
    "1,2",
    '"1","2","3","4"',
    '1,"2',
    '3",4,5,6',
    'a"b,"c,1,2',
    "1,2,3\r4",
    "",
    "   ",
    "\t\x0b\x0c",
    "x" * 80,
    " " * 80,
    "1,2,3," + "9" * 70,
    "\x00,\x00,\x00,\x00",
    "\xff,2,3,4",
]
JSON_FRAGMENTS = [
    '{"u": 1, "i": 2, "t": 3, "rating": 4}',
    '{"u": 1}',
    "[1]",
    "{bad",
    "[" * 70 + "]" * 70,
    '{"u": "' + "x" * 80 + '"}',
    "",
    "   ",
    " " * 80,
    "\xff",
    '{"u": true, "i": 2, "t": 3, "rating": 4}',
]


@pytest.mark.parametrize("seed", range(40))
def test_every_non_blank_line_comes_out_once(tmp_path, monkeypatch, seed):
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(readers, "_READ_BYTES", int(rng.integers(1, 64)))
    monkeypatch.setattr(readers, "MAX_ROW_BYTES", 50)
    for fmt, fragments in (("csv", CSV_FRAGMENTS), ("jsonl", JSON_FRAGMENTS)):
        lines = [fragments[k] for k in rng.integers(0, len(fragments), int(rng.integers(0, 40)))]
        if fmt == "csv":
            lines = ["u,i,t,rating", *lines]
        ends = [("\r\n" if rng.random() < 0.3 else "\n") for _ in lines]
        body = "".join(line + end for line, end in zip(lines, ends, strict=True))
        if lines and rng.random() < 0.5:
            body = body[: -len(ends[-1])]  # no line end after the last line
        p = tmp_path / f"f.{fmt}"
        p.write_bytes(body.encode("utf-8", "surrogateescape").replace(b"\xc3\xbf", b"\xff"))
        t = _read(p, fmt)
        rows = [] if t is None else t.column("row").to_pylist()
        expected = [
            n
            for n, line in enumerate(lines)
            if line.strip(" \t\r\n\x0b\x0c") and n >= (fmt == "csv")
        ]
        assert sorted(rows) == expected


def test_event_weights_are_matched_stripped_and_checked_for_float32(tmp_path):
    spec = {"rating": None, "weight": "w", "event": "ev", "event_weights": {"view": 1, "buy": 1e10}}
    p = tmp_path / "f.csv"
    p.write_text("u,i,t,w,ev\n1,2,3,1, view \n1,3,3,1e30,buy\n1,4,3,1,zap\n1,5,3,2,buy\n")
    t = _read(p, "csv", **spec)
    assert t.column("reason").to_pylist() == [
        None,
        "w out of range (float32)",  # 1e30 * 1e10 > float32 max
        "unknown ev value",
        None,
    ]
    assert t.column("w").to_pylist()[3] == 2e10


def test_a_later_jsonl_chunk_without_ids_is_quarantined_not_an_error(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text(json.dumps(GOOD) + "\n" + json.dumps(GOOD) + "\n" + '{"x": 1}\n')
    tables = list(jsonl_batches(str(p), {**SPEC, "format": "jsonl"}, chunk=2))
    reasons = pa.concat_tables(tables).column("reason").to_pylist()
    assert reasons == [None, None, "missing user id"]
    # a file none of whose first rows has an id column is a wrong column map: it fails
    p.write_text('{"x": 1}\n' * 3)
    with pytest.raises(readers.IngestError, match="missing column"):
        list(jsonl_batches(str(p), {**SPEC, "format": "jsonl"}))


def test_check_headers_reads_compressed_csv_and_rejects_a_huge_header(tmp_path):
    from app.config import DataArgs
    from app.ingest import resolve_source
    from app.ingest.readers import check_headers, reader_spec

    with gzip.open(tmp_path / "a.csv.gz", "wt") as f:
        f.write("userId,movieId,timestamp\n1,2,3\n")
    data = DataArgs(path=str(tmp_path))
    src = resolve_source(data, "unused")
    spec = reader_spec(src, data)
    assert spec["format"] == "csv"
    assert check_headers(src, spec) == []
    (tmp_path / "b.csv").write_bytes(b"userId,movieId,timestamp" + b"x" * (MAX_ROW_BYTES + 1))
    with pytest.raises(readers.IngestError, match="header is longer"):
        check_headers(resolve_source(data, "unused"), spec)
