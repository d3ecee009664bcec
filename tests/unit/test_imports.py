"""Every app module imports without side effects: importing never starts Ray or Serve."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import importlib, pkgutil, ray, app
names = [m.name for m in pkgutil.walk_packages(app.__path__, prefix="app.")]
assert "app.ingest" in names and "app.config" in names, names
for name in names:
    importlib.import_module(name)
assert not ray.is_initialized(), "importing app started Ray"
print(len(names))
"""


def test_every_module_imports_without_starting_ray():
    # A fresh interpreter: the test session's own Ray cluster must not hide a side effect.
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.strip().splitlines()[-1]) >= 8
