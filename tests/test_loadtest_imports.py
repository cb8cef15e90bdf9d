"""loadtest/'s import graph (issue 22): no import circle between its modules, and no project-internal import
inside a function (lazy imports of heavy third-party packages such as torch, locust or onnxruntime stay
allowed). Read from the source with ast; nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "loadtest"
PROJECT = ("common", "exporter", "finetune", "loadtest", "serving")


def _modules(package: str = PACKAGE) -> dict[str, ast.Module]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return out


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [base, *(f"{base}.{a.name}" for a in node.names)]


def import_graph(modules: dict[str, ast.Module]) -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in the file)."""
    return {name: {m for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for m in _imported(node) if m in modules and m != name} for name, tree in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def inner_project_imports(modules: dict[str, ast.Module]) -> list[str]:
    """"module:line name" of every project-internal import inside a function."""
    out = []
    for name, tree in modules.items():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)) and (
                        getattr(node, "level", 0) or any(m.split(".")[0] in PROJECT for m in _imported(node) if m)):
                    out.append(f"{name}:{node.lineno} {_imported(node)[0]}")
    return sorted(set(out))


def test_no_import_circle_in_loadtest():
    assert cycles(import_graph(_modules())) == []


def test_no_project_import_inside_a_function_in_loadtest():
    assert inner_project_imports(_modules()) == []


def test_the_checks_can_fail():
    """The checks find a circle and a function-level import when there is one."""
    a = ast.parse("import pkg.b\n")
    b = ast.parse("def f():\n    from pkg.a import x\n    import torch\n")
    mods = {"pkg.a": a, "pkg.b": b}
    assert cycles(import_graph(mods)) == [["pkg.a", "pkg.b"]]
    assert inner_project_imports({"loadtest.b": ast.parse("def f():\n    from serving import x\n    import torch\n")}) \
        == ["loadtest.b:2 serving"]
