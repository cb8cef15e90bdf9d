"""Import shape (issue 19 item 1): inside each package no module reaches itself through its imports, and no
function imports the project's own code (only optional heavy third-party dependencies are imported lazily).

Read with the standard library's ``ast``: imports at module level and inside functions both count as edges,
relative imports are resolved, ``from pkg import mod`` counts as an import of ``pkg.mod`` (and of ``pkg``; the
parent packages Python initialises on the way to a submodule are not counted)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN = ("common", "exporter", "finetune", "loadtest", "serving")
# Packages held to "no import circle" (every package).
ACYCLIC = ("common", "exporter", "finetune", "loadtest", "serving")
# Packages held to "no own-package import inside a function" (serving and finetune still have some).
EAGER = ("common", "exporter", "loadtest")


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of ``package`` under ``root``."""
    found = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The dotted names one import statement of ``module`` names (a ``from`` import: the module and
    module.name for each name, since a name may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _function_imports(tree: ast.AST) -> set[int]:
    """ids of the import nodes that sit inside a function body."""
    inner = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inner.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    return inner


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    """module -> the modules of ``package`` it imports, at any level (module, class or function body)."""
    mods = modules(root, package)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = _imported(node, module, path.name == "__init__.py")
                graph[module].update(n for n in names if n in mods and n != module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            nxt = next((w for w in edges if w not in index or w in on_stack), None)
            if nxt is not None and nxt not in index:
                index[nxt] = low[nxt] = len(index)
                stack.append(nxt)
                on_stack.add(nxt)
                work.append((nxt, iter(sorted(graph[nxt]))))
                continue
            if nxt is not None:
                low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def function_level_imports(root: Path, package: str, own: tuple[str, ...] = OWN) -> list[str]:
    """"path:line module" for each import of one of the ``own`` packages made inside a function of
    ``package``. Heavy third-party dependencies (torch, transformers, onnxruntime, ...) may stay lazy."""
    found = []
    for module, path in modules(root, package).items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        inner = _function_imports(tree)
        for node in ast.walk(tree):
            if id(node) not in inner:
                continue
            names = _imported(node, module, path.name == "__init__.py")
            if any(n.split(".")[0] in own for n in names):
                found.append(f"{path.relative_to(root).as_posix()}:{node.lineno} {names[0]}")
    return sorted(found)


@pytest.mark.parametrize("package", ACYCLIC)
def test_no_import_circle(package):
    found = circles(import_graph(ROOT, package))
    assert not found, f"{package}: modules that reach themselves through their imports: {found}"


@pytest.mark.parametrize("package", EAGER)
def test_no_own_package_import_inside_a_function(package):
    found = function_level_imports(ROOT, package)
    assert not found, f"{package}: imports of the project's own code inside functions (move them to the top): {found}"


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checks_find_a_circle_and_a_lazy_import(tmp_path):
    """A synthetic package: a -> b at module level, b -> c inside a function, c -> a relatively (a circle
    of three); d imports torch lazily (allowed) and e imports only from the leaf."""
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from pkg import b\n",
        "pkg/b.py": "def f():\n    from pkg.c import g\n    return g\n",
        "pkg/c.py": "from .a import b as _\n",
        "pkg/d.py": "def h():\n    import torch\n    return torch\n",
        "pkg/e.py": "from pkg.sub.leaf import X\n",
        "pkg/sub/__init__.py": "from . import leaf\n",
        "pkg/sub/leaf.py": "X = 1\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.a"} and graph["pkg.e"] == {"pkg.sub.leaf"}
    assert graph["pkg.sub"] == {"pkg.sub.leaf"}
    assert circles(graph) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert function_level_imports(tmp_path, "pkg", own=("pkg",)) == ["pkg/b.py:2 pkg.c"]
    (tmp_path / "pkg/c.py").write_text("X = 2\n")  # the loop broken: no circle left
    assert circles(import_graph(tmp_path, "pkg")) == []
