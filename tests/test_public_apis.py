"""The project uses its dependencies' public APIs only: no module imports or reaches into torch's C bindings
(``torch._C``) or protobuf's ``internal`` package (issue 19 item 2). Checked over the source with ``ast``."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "exporter", "serving", "loadtest", "finetune", "scripts")
PRIVATE = ("torch._C", "google.protobuf.internal")


def _private(name: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in PRIVATE)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` of an attribute chain over a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def private_uses(source: str) -> list[str]:
    """The private modules ``source`` imports (``import``/``from``) or reaches as an attribute chain."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _private(a.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [f"{node.module}.{a.name}" for a in node.names
                      if _private(node.module) or _private(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Attribute) and (name := _dotted(node)) and _private(name):
            found.append(name)
    return found


@pytest.mark.parametrize("source", [
    "import torch._C", "from torch import _C", "from google.protobuf.internal.encoder import _VarintBytes",
    "from google.protobuf import internal", "import torch\nx = getattr(torch._C, 'Graph')",
    "def f():\n    import google.protobuf.internal.encoder as e\n",
])
def test_the_scan_finds_private_uses(source):
    assert private_uses(source)


def test_public_uses_pass_the_scan():
    assert private_uses("import torch\nfrom google.protobuf import text_format\nimport torch.onnx\nx = torch.C") == []


def test_no_module_uses_torch_c_or_protobuf_internals():
    files = [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(files) > 50
    offenders = {str(p.relative_to(ROOT)): uses for p in files if (uses := private_uses(p.read_text(encoding="utf-8")))}
    assert offenders == {}
