"""The synthetic generator: deterministic bytes, realistic statistics, every format, caching."""

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest

from app.config import DataArgs, SyntheticArgs
from app.ingest import SourceError, generate_synthetic, resolve_source

SYNTH_COLUMNS = ["user_id", "item_id", "timestamp", "rating", "event"]


def _read(path: str, fmt: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "csv":
        return pacsv.read_csv(path)
    return pajson.read_json(path)


def _read_all(paths: list[str], fmt: str) -> pa.Table:
    return pa.concat_tables([_read(p, fmt) for p in paths])


SMALL = SyntheticArgs(n_users=300, n_items=400, n_interactions=12_000, seed=7, n_files=2)


def test_synthetic_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = generate_synthetic(SMALL, str(tmp_path / "a"))
    b = generate_synthetic(SMALL, str(tmp_path / "b"))
    assert [Path(p).name for p in a] == [Path(p).name for p in b]
    for pa_, pb in zip(a, b, strict=True):
        assert _read(pa_, "parquet").equals(_read(pb, "parquet"))
        assert Path(pa_).read_bytes() == Path(pb).read_bytes()
    assert (tmp_path / "a" / "items.csv").read_bytes() == (
        tmp_path / "b" / "items.csv"
    ).read_bytes()
    other = generate_synthetic(SMALL.model_copy(update={"seed": 8}), str(tmp_path / "c"))
    assert not _read_all(other, "parquet").equals(_read_all(a, "parquet"))


def test_synthetic_statistics(tmp_path: Path) -> None:
    paths = generate_synthetic(SMALL, str(tmp_path))
    assert len(paths) == 2
    table = _read_all(paths, "parquet")
    assert table.column_names == SYNTH_COLUMNS
    assert table.num_rows == SMALL.n_interactions
    users = table.column("user_id").to_numpy()
    items = table.column("item_id").to_numpy()
    ts = table.column("timestamp").to_numpy()
    per_user = np.bincount(users, minlength=SMALL.n_users)
    assert (per_user >= 3).all()
    assert per_user.max() > 4 * np.median(per_user)  # heavy-tailed activity
    pop = np.sort(np.bincount(items, minlength=SMALL.n_items))[::-1]
    assert pop[: SMALL.n_items // 10].sum() / pop.sum() > 0.25  # uniform would be 0.1
    assert items.min() >= 0 and items.max() < SMALL.n_items
    # grouped by user, time non-decreasing within each user, inside a ~2-year window
    assert (np.diff(users) >= 0).all()
    same_user = np.diff(users) == 0
    assert (np.diff(ts)[same_user] >= 0).all()
    assert 1.5e9 < ts.min() and ts.max() <= 1_704_067_200
    assert ts.max() - ts.min() < 2.1 * 365 * 86_400
    ratings = table.column("rating").to_numpy()
    assert ratings.min() >= 0.5 and ratings.max() <= 5.0
    assert np.allclose(ratings * 2, np.round(ratings * 2))
    assert set(table.column("event").to_pylist()) == {"view", "click", "purchase"}
    # some repeated pairs, but most events are distinct pairs
    pairs = len(set(zip(users.tolist(), items.tolist(), strict=True)))
    assert 0.7 * len(users) < pairs < len(users)
    genres = pacsv.read_csv(tmp_path / "items.csv")
    assert genres.column_names == ["item_id", "genres"]
    assert genres.num_rows == SMALL.n_items
    counts = [len(g.split("|")) for g in genres.column("genres").to_pylist()]
    assert min(counts) >= 1 and max(counts) <= 3


@pytest.mark.parametrize("fmt", ["csv", "parquet", "jsonl"])
def test_synthetic_formats_are_readable(tmp_path: Path, fmt: str) -> None:
    args = SyntheticArgs(n_users=50, n_items=80, n_interactions=1_000, format=fmt, n_files=3)
    paths = generate_synthetic(args, str(tmp_path))
    assert [Path(p).name for p in paths] == [
        f"interactions-0000{i}-of-00003.{'jsonl' if fmt == 'jsonl' else fmt}" for i in range(3)
    ]
    tables = [_read(p, fmt) for p in paths]
    for t in tables:
        assert t.column_names == SYNTH_COLUMNS
        assert pa.types.is_integer(t.schema.field("user_id").type)
        assert pa.types.is_integer(t.schema.field("item_id").type)
        assert pa.types.is_integer(t.schema.field("timestamp").type)
        assert pa.types.is_floating(t.schema.field("rating").type)
    assert sum(t.num_rows for t in tables) == 1_000


def test_synthetic_needs_three_events_per_user(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="n_interactions"):
        generate_synthetic(SyntheticArgs(n_users=100, n_interactions=299), str(tmp_path))


def test_resolve_synthetic_generates_once_into_cache(tmp_path: Path) -> None:
    data = DataArgs(source="synthetic", synthetic=SMALL.model_copy(update={"format": "csv"}))
    src = resolve_source(data, str(tmp_path))
    assert src.format == "csv"
    assert len(src.paths) == 2
    folder = Path(src.paths[0]).parent
    assert folder.parent == tmp_path and folder.name.startswith("synthetic-")
    assert (folder / "_SUCCESS").is_file()
    assert (src.columns.user, src.columns.item, src.columns.timestamp) == (
        "user_id",
        "item_id",
        "timestamp",
    )
    assert (src.columns.rating, src.columns.event, src.columns.weight) == ("rating", "event", None)
    assert src.item_features == str(folder / "items.csv")
    assert src.item_features_id_column == "item_id"
    assert sum(_read(p, "csv").num_rows for p in src.paths) == SMALL.n_interactions
    mtime = os.stat(src.paths[0]).st_mtime_ns
    assert resolve_source(data, str(tmp_path)) == src
    assert os.stat(src.paths[0]).st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no staging left over
    # other args -> other folder
    other = resolve_source(
        data.model_copy(update={"synthetic": SMALL.model_copy(update={"seed": 1})}), str(tmp_path)
    )
    assert Path(other.paths[0]).parent != folder
