"""The layout's rules (docs/ARCHITECTURE.md), read from the source's import statements.

Every import counts, module-level or inside a function: a late import still couples two modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
LAYER = {  # higher imports lower, never the reverse; equal layers may not import each other
    "__main__": 4, "cli": 3, "api": 3,
    "index": 2, "export": 2,
    "dataset": 1, "net": 1, "cluster": 1, "store": 1,
    "config": 0, "progress": 0, "__init__": 0, "errors": -1,
}  # fmt: skip
LAZY = {("pipeline", "pipeline.api")}  # the package's `open` is api's, imported on first use (a
# module __getattr__), so `import pipeline` loads nothing of api's layer (tests/test_api.py)
SERVICES_MAY_USE = {"store"}  # the lowest service: others may read and write through it
PURE = ["index/topk.py", "index/distinct.py", "index/stats.py", "net/receptive_field.py",
        "export/deconv.py", "export/tape.py", "export/cone.py"]  # fmt: skip


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Absolute names of everything `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = (
        module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    )
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
GRAPH = {
    name: {i for i in imports(path) if i in MODULES and i != name} for name, path in MODULES.items()
}


def top(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_point_down(name):
    for target in GRAPH[name]:
        a, b = top(name), top(target)
        if a == b or b == "__init__" and target == "pipeline" or (name, target) in LAZY:
            continue
        if LAYER[a] == LAYER[b] == 1 and b in SERVICES_MAY_USE:
            continue
        assert LAYER[a] > LAYER[b], f"{name} imports {target}: {a} may not depend on {b}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_ray_only_under_cluster(name):
    uses_ray = any(i == "ray" or i.startswith("ray.") for i in imports(MODULES[name]))
    assert not uses_ray or top(name) == "cluster", f"{name} imports ray outside pipeline/cluster/"


@pytest.mark.parametrize("rel", PURE)
def test_pure_cores_import_neither_ray_nor_fsspec(rel):
    found = imports(PACKAGE / rel)
    bad = sorted(i for i in found if i.split(".")[0] in {"ray", "fsspec", "pyarrow.fs"})
    assert not bad, f"pipeline/{rel} imports {bad}"


def test_export_never_imports_index():
    for name, targets in GRAPH.items():
        if top(name) == "export":
            assert not {t for t in targets if top(t) == "index"}, name


def test_every_output_path_is_spelled_in_layout():
    """No module but store/layout.py spells a file name under OUT as a string of its own."""
    names = {"manifest.json", "images.parquet", "errors.parquet", "run.json", "_COMMIT.json",
             "report.parquet", "drift.parquet", "export.parquet", "export.json", "filters.png",
             "LATEST", "_LOCK", "partials", "versions"}  # fmt: skip
    for path in PACKAGE.rglob("*.py"):
        if path.name == "layout.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
            and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if id(node) not in docstrings and node.value.rsplit("/", 1)[-1] in names:
                    pytest.fail(
                        f"pipeline/{path.relative_to(PACKAGE)}:{node.lineno} spells "
                        f"{node.value!r}: take it from pipeline.store.layout"
                    )
