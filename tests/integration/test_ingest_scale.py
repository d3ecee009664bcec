"""5M rows through the ingest pipeline with a small object store: same result as one process.

The rows of the new design never go through the object store (the shuffle goes through the
lake), so a 100 MB store must be enough; the benchmark's own check compares every split's
counts and (user, item) checksum with the single-process pyarrow reference.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_5m_rows_with_a_100mb_object_store_match_one_process(tmp_path: Path) -> None:
    out = tmp_path / "ingest.json"
    cmd = [
        sys.executable, "-m", "bench.ingest", "--sizes", "5000000", "--formats", "parquet",
        "--no-polars", "--object-store-mb", "100", "--workdir", str(tmp_path), "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert run.returncode == 0, run.stderr[-4000:]
    (size,) = json.loads(out.read_text())["sizes"]
    assert size["rows"] == 5_000_000
    assert size["outputs_match"], size
