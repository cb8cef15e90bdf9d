"""Provenance recorded beside every artifact: file hashes and library versions."""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

DEFAULT_PACKAGES = (
    "torch", "transformers", "tokenizers", "datasets", "optimum", "optimum-onnx", "onnx",
    "onnxruntime", "onnxruntime-gpu", "numpy", "nvidia-pytriton", "tritonclient", "locust",
)


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_tree(root: Path | str) -> dict[str, str]:
    """SHA-256 of every file below ``root``, keyed by its path relative to ``root``."""
    root = Path(root)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def versions(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, str]:
    """Installed versions of the given distributions (absent ones are left out), plus Python's."""
    found = {"python": platform.python_version()}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found
