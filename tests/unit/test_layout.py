"""The package's shape stays readable: small modules, public names across modules, no cycles."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / "app").glob("**/*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = path
    return out


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app"):
            found.append((node.module, [a.name for a in node.names]))
    return found


def test_no_module_is_long():
    long = {
        m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules (over {MAX_LINES} lines): {long}"


def test_no_private_names_cross_modules():
    crossing = [
        f"{module} imports {name} from {source}"
        for module, path in _modules().items()
        for source, names in _imports(path)
        for name in names
        if name.startswith("_")
    ]
    assert not crossing, crossing


def test_no_module_named_like_the_package():
    assert not [m for m in _modules() if m.rsplit(".", 1)[-1] == "app" and m != "app"]


def test_imports_have_no_cycles():
    mods = _modules()
    edges = {m: set() for m in mods}
    for module, path in mods.items():
        # only module-level imports: a function-level import is a deliberate late binding
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module in mods:
                targets = [f"{node.module}.{a.name}" for a in node.names]
                edges[module] |= {t for t in targets if t in mods} or {node.module}
    edges = {m: {t for t in ts if t != m and not m.startswith(t + ".")} for m, ts in edges.items()}
    state: dict[str, int] = {}

    def visit(m: str, chain: list[str]) -> None:
        if state.get(m) == 2:
            return
        assert state.get(m) != 1, " -> ".join([*chain, m])
        state[m] = 1
        for t in sorted(edges[m]):
            visit(t, [*chain, m])
        state[m] = 2

    for m in sorted(mods):
        visit(m, [])
