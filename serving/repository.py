"""The one module that owns the Triton model-repository layout (see docs/ARCHITECTURE.md).

STUB: the signatures below are the contract between the exporter and serving; the serving stage
implements them.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from serving.errors import RepositoryError

ENSEMBLE = "classifier"
TOKENIZER = "tokenizer"
ENCODER = "encoder"
POSTPROCESS = "postprocess"


class Target(str, enum.Enum):
    CPU = "cpu"
    GPU = "gpu"


@dataclass
class RepositoryConfig:
    """How the repository is served. Defaults fit the local CPU target."""

    target: Target = Target.CPU
    max_batch_size: int = 64
    max_length: int = 128
    encoder_instances: int = 1
    tokenizer_instances: int = 1
    intra_op_threads: int = 0  # 0: onnxruntime's default
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 2000
    max_queue_size: int = 256
    default_queue_timeout_us: int = 30_000_000
    tensorrt: bool = False  # gpu target: TensorRT execution accelerator on the onnxruntime backend
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.target = Target(self.target)
        if self.max_batch_size < 1:
            raise RepositoryError("max_batch_size must be >= 1")
        if self.max_length < 8:
            raise RepositoryError("max_length must be >= 8")


def write_repository(
    out: Path,
    *,
    onnx_model: Path,
    tokenizer_dir: Path,
    id2label: Mapping[int, str],
    config: RepositoryConfig,
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a complete repository to ``out`` atomically (temp dir, swap at the end); return ``out``."""
    raise NotImplementedError


def validate_repository(path: Path, target: Target | None = None) -> list[str]:
    """Check a repository offline (configs parse, files present, ONNX opset/IR); return model names."""
    raise NotImplementedError
