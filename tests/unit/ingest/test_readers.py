"""Readers without Ray: CSV and JSON lines streamed per file, Parquet tables, header checks."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.config import DataArgs
from app.ingest import IngestError, as_binary, resolve_source
from app.ingest.readers import check_headers, jsonl_batches, parquet_table, reader_spec


def test_good_csv_rows_are_normalised(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,10,4.5,100\n2,20.0,3,200\n")
    t = read_csv(p)
    assert t.column("reason").null_count == 2
    assert t.column("user").to_pylist() == ["1", "2"]
    # "20.0" is an integral number: the same id as 20 (docs/ingest-validation.md)
    assert t.column("item").to_pylist() == ["10", "20"]
    assert t.column("ts").to_pylist() == [100, 200]
    assert t.column("w").to_pylist() == [4.5, 3.0]


def test_truncated_last_line_is_quarantined(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_bytes(b"userId,movieId,rating,timestamp\n1,10,4,100\n2,20,3,200\n3,3")
    t = read_csv(p)
    assert t.num_rows == 3
    assert t.column("reason").to_pylist()[-1].startswith("malformed CSV row")


def test_latin1_with_declared_encoding(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_bytes("userId,movieId,rating,timestamp\nJosé,10,4,100\n".encode("latin-1"))
    t = read_csv(p, encoding="latin-1")
    assert t.column("user").to_pylist() == ["José"]


def test_wrong_delimiter_says_which_to_use(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_text("userId;movieId;rating;timestamp\n1;10;4;100\n")
    with pytest.raises(IngestError, match=r"data.delimiter=';'"):
        read_csv(p)


def test_missing_column_is_named(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_text("userId,rating,timestamp\n1,4,100\n")
    with pytest.raises(IngestError, match=r"missing column\(s\) movieId"):
        read_csv(p)


def test_empty_file_yields_nothing(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_bytes(b"")
    assert read_csv(p) is None


def test_one_row_file(tmp_path, read_csv):
    p = tmp_path / "r.csv"
    p.write_text("userId,movieId,rating,timestamp\n7,70,5,1000")
    t = read_csv(p)
    assert t.num_rows == 1 and t.column("reason").null_count == 1


def test_jsonl_bad_lines_are_quarantined(tmp_path, spec):
    p = tmp_path / "r.jsonl"
    p.write_text(
        '{"userId": 1, "movieId": 10, "rating": 4, "timestamp": 100}\n'
        "{not json\n"
        "[1, 2]\n"
        '{"userId": 2, "movieId": 20, "rating": 4}\n'
    )
    t = pa.concat_tables(list(jsonl_batches(str(p), spec)))
    assert t.num_rows == 4
    reasons = sorted(r for r in t.column("reason").to_pylist() if r)
    assert reasons[0].startswith("JSON line is not an object")
    assert reasons[1].startswith("invalid JSON")
    assert reasons[2] == "missing or unparsable timestamp"


def test_jsonl_keeps_line_numbers_across_chunks(tmp_path, spec):
    p = tmp_path / "r.jsonl"
    lines = [f'{{"userId": {u}, "movieId": 1, "rating": 4, "timestamp": 5}}' for u in range(5)]
    p.write_text("\n".join(lines[:2] + ["", *lines[2:]]) + "\n")
    t = pa.concat_tables(list(jsonl_batches(str(p), spec, chunk=2)))
    rows = dict(zip(t.column("row").to_pylist(), t.column("reason").to_pylist(), strict=True))
    # a blank line is no record (count_rows skips it too); rows are line numbers
    assert rows == {0: None, 1: None, 3: None, 4: None, 5: None}


def test_as_binary_gives_the_text_a_csv_reader_sees():
    values = [
        (pa.array([1, None, 30], pa.int64()), [b"1", None, b"30"]),
        (pa.array([1.0, 2.5]), [b"1", b"2.5"]),
        (pa.array([1_000, 61_000], pa.timestamp("ms")), [b"1", b"61"]),
        # fractions of a second are floored, as the CSV path does, never an error
        (pa.array([1_500, 61_999], pa.timestamp("ms")), [b"1", b"61"]),
        (pa.array(["a", "b", "a"]).dictionary_encode(), [b"a", b"b", b"a"]),
    ]
    for array, expected in values:
        out = as_binary(pa.chunked_array([array]))
        assert out.type == pa.binary()
        assert out.to_pylist() == expected


def test_parquet_table_normalises_typed_columns(spec):
    part = pa.table(
        {
            "userId": pa.array([1, 2], pa.int64()),
            "movieId": pa.array([10.0, 11.0]),
            "rating": pa.array([4.0, -1.0]),
            "timestamp": pa.array([100, 200], pa.int64()),
            "path": ["p", "p"],
        }
    )
    t = parquet_table(part, "file.parquet", spec)
    assert t.column("item").to_pylist() == ["10", None]
    assert t.column("reason").to_pylist() == [None, "negative rating"]
    assert t.column("row").to_pylist() == [-1, -1]
    assert set(t.column("file").to_pylist()) == {"file.parquet"}
    with pytest.raises(IngestError, match="missing column"):
        parquet_table(part.drop_columns(["movieId"]), "file.parquet", spec)


def test_check_headers_fails_fast_and_warns_on_empty_files(tmp_path):
    (tmp_path / "a.csv").write_text("userId,movieId,timestamp\n1,2,3\n")
    (tmp_path / "b.csv").write_bytes(b"")
    data = DataArgs(path=str(tmp_path))
    src = resolve_source(data, "unused")
    assert check_headers(src, reader_spec(src, data)) == [f"{tmp_path / 'b.csv'}: empty file"]
    (tmp_path / "c.csv").write_text("user;item;timestamp\n1;2;3\n")
    src = resolve_source(data, "unused")
    with pytest.raises(IngestError, match="c.csv: missing column"):
        check_headers(src, reader_spec(src, data))


def test_check_headers_reads_parquet_schemas(tmp_path):
    pq.write_table(pa.table({"uid": [1], "movieId": [2], "timestamp": [3]}), tmp_path / "p.pq")
    data = DataArgs(path=str(tmp_path), format="parquet")
    src = resolve_source(data, "unused")
    with pytest.raises(IngestError, match=r"missing column\(s\) userId"):
        check_headers(src, reader_spec(src, data))
