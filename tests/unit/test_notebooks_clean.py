"""The notebooks are stored clean and runnable as the slow test runs them (no Ray here).

Outputs would pin one run's numbers in the repository and make every diff noisy;
tests/integration/test_notebooks.py executes them.
"""

from __future__ import annotations

import ast
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {"01_explore_dataset.ipynb", "02_train_and_tune.ipynb", "03_query_serve.ipynb"}
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def _code(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def test_the_notebooks_exist():
    assert EXPECTED <= {p.name for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_valid_and_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert (nb.nbformat, nb.nbformat_minor) >= (4, 5), "nbformat 4.5+: cells carry ids"
    nbformat.validate(nb)
    assert nb.metadata.get("kernelspec") == KERNELSPEC
    ids = [cell.get("id") for cell in nb.cells]
    assert all(ids) and len(set(ids)) == len(ids), ids
    dirty = [
        cell.id
        for cell in nb.cells
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"{path.name}: clear the outputs of cells {dirty} before committing"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_as_the_slow_test_expects(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    code = _code(nb)
    assert code, f"{path.name} has no code"
    for i, source in enumerate(code):
        # Plain Python, no magics: a syntax error fails here rather than minutes into a run.
        ast.parse(source, filename=f"{path.name}[code cell {i}]")
    # The slow test keeps the lake out of the repository through this variable.
    assert "SCALEREC_NOTEBOOK_LAKE" in code[0]
    # The last cell checks what the notebook produced, so that a wrong result fails the run.
    assert any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(code[-1])))


def test_the_serve_notebook_uses_the_given_port_and_stops_serve():
    code = "\n".join(_code(nbformat.read(ROOT / "notebooks" / "03_query_serve.ipynb", 4)))
    assert "SCALEREC_NOTEBOOK_PORT" in code
    assert "serve.shutdown()" in code and "ray.shutdown()" in code
