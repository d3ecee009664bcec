"""Notebooks run top to bottom: their code cells execute as one script in a fresh interpreter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, tmp_path):
    nb = json.loads(path.read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    script = "\n\n".join(c for c in cells if not c.lstrip().startswith(("%", "!")))
    # Keep the lake out of the repository.
    script = script.replace("lake=./lake-notebook", f"lake={tmp_path / 'lake'}")
    script += "\nimport ray\nray.shutdown()\n"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT / "notebooks",
        capture_output=True,
        text=True,
        timeout=1200,
        env={"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-4000:]
