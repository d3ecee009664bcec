"""Every notebook runs top to bottom in a fresh Jupyter kernel (nbclient), on its own local Ray
cluster, its own lake and its own port; the last cell of each asserts on what it produced.

The stored notebooks are kept clean (no outputs) by tests/unit/test_notebooks_clean.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from serving import free_port

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
KERNEL = "python3"


def _kernel_setup(jupyter_dir: Path, ipython_dir: Path) -> None:
    # A user-level "python3" kernelspec (~/.local/share/jupyter) may name another interpreter;
    # one under $JUPYTER_PATH, which Jupyter searches first, runs this one (the project venv).
    spec = jupyter_dir / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (ScaleRec tests)",
                "language": "python",
            }
        )
    )
    # Plain tracebacks: a failing cell's error reads without terminal colour codes.
    profile = ipython_dir / "profile_default"
    profile.mkdir(parents=True)
    (profile / "ipython_kernel_config.py").write_text('c.InteractiveShell.colors = "nocolor"\n')


@pytest.mark.slow
@pytest.mark.timeout(1500)  # above nbclient's per-cell timeout, so that it names the cell
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    _kernel_setup(tmp_path / "jupyter", tmp_path / "ipython")
    # The kernel inherits this environment.
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("SCALEREC_NOTEBOOK_LAKE", str(tmp_path / "lake"))
    monkeypatch.setenv("SCALEREC_NOTEBOOK_PORT", str(free_port()))
    monkeypatch.setenv("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # The notebook starts its own embedded cluster, never joins one named by the environment.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        timeout=900,
        kernel_name=KERNEL,
        resources={"metadata": {"path": str(ROOT / "notebooks")}},
    )
    try:
        # On a failing cell nbclient raises CellExecutionError with its source and traceback;
        # shutting the kernel down stops the notebook's Ray cluster with it.
        client.execute()
    finally:
        # The executed copy, outputs and all, for a look at what a failing run printed.
        nbformat.write(nb, tmp_path / path.name)
