"""Read what the earlier stages left on disk: the exporter's typed build report (``exporter.artifacts``) and
a repository (``serving.repository.read_repository``): which ONNX variant is served, and how
(``read_served_repository``)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from common.provenance import sha256_file
from exporter.artifacts import ArtifactError, read_report
from loadtest.errors import LoadtestError
from serving.contract import ServedModel
from serving.errors import RepositoryError
from serving.repository import read_repository, model_provenance

log = logging.getLogger(__name__)


def _report(build: Path):
    """The exporter's typed build report (exporter.artifacts owns its schema)."""
    try:
        return read_report(Path(build))
    except ArtifactError as exc:
        raise LoadtestError(str(exc)) from None


def read_build_variants(build: Path) -> list[tuple[str, Path]]:
    """(name, ONNX file) for every variant in ``build/report.json`` whose file exists in ``build``."""
    build = Path(build)
    report, out = _report(build), []
    for name in report.variants:
        path = report.variant_path(name, build)
        if path is None or not path.is_file():
            log.warning("build report variant %s has no ONNX file in %s: skipped", name, build)
            continue
        out.append((name, path))
    if not out:
        raise LoadtestError(f"{build}/report.json lists no variant with an ONNX file in {build}")
    return out


def build_parity(build: Path) -> dict[str, bool | None]:
    """Variant name -> whether it passed the exporter's parity gate."""
    return {name: v.parity.passed for name, v in _report(build).variants.items()}


def selected_variant(build: Path) -> str | None:
    """The variant the exporter selected for serving (None when none passed)."""
    return _report(build).selected


# ------------------------------------------------------------------------------------- repository
# What the load tests need to know about a repository comes from serving.repository.read_repository (the one
# module that knows its layout); ServedRepository is the summary of it that bench and tune use.


@dataclass(frozen=True)
class ServedRepository:
    """What a repository serves: the ONNX file and tokenizer behind it, its contract, and how it is served."""

    path: Path
    onnx: Path
    tokenizer_dir: Path
    labels: tuple[str, ...]
    variant: str | None
    target: str | None
    instances: int
    intra_op_threads: int
    max_batch_size: int
    preferred_batch_sizes: tuple[int, ...]
    max_queue_delay_us: int
    config: Mapping[str, Any] = field(default_factory=dict)  # the RepositoryConfig it was written with
    provenance: Mapping[str, Any] = field(default_factory=dict)
    model: ServedModel | None = None  # the served contract (name, head, labels, text pairs...)

    def summary(self) -> dict[str, Any]:
        """The JSON-able part (for reports)."""
        return {"repository": str(self.path.absolute()), "variant": self.variant, "target": self.target,
                "onnx": str(self.onnx), "instances": self.instances, "intra_op_threads": self.intra_op_threads,
                "max_batch_size": self.max_batch_size, "preferred_batch_sizes": list(self.preferred_batch_sizes),
                "max_queue_delay_us": self.max_queue_delay_us, "config": dict(self.config)}


def read_served_repository(repository: Path, build: Path | None = None,
                           model: str | None = None) -> ServedRepository:
    """Read a repository written by serving.repository (through ``read_repository``); ``model`` picks one
    served model of several (default: the only one, or ``classifier``)."""
    repository = Path(repository)
    try:
        info = read_repository(repository)
        served = info.model(model)
    except RepositoryError as exc:
        raise LoadtestError(f"cannot read the repository: {exc}") from None
    if not info.provenance:
        raise LoadtestError(f"{repository} has no provenance.json: was it written by serving.repository?")
    if not served.onnx_path.is_file() or not (served.tokenizer_dir / "tokenizer.json").is_file():
        raise LoadtestError(f"{repository}: the ONNX file or tokenizer of model '{served.name}' is missing")
    batching, own = served.batching, model_provenance(info.provenance, served.name)
    return ServedRepository(
        path=repository, onnx=served.onnx_path, tokenizer_dir=served.tokenizer_dir,
        labels=tuple(served.contract.labels), variant=_served_variant(own, build),
        target=served.target.value, instances=served.instances, intra_op_threads=served.intra_op_threads,
        max_batch_size=served.max_batch_size, preferred_batch_sizes=tuple(batching.preferred_batch_size),
        max_queue_delay_us=batching.max_queue_delay_microseconds,
        config=own.get("config") or {}, provenance=info.provenance, model=served.contract)


def _served_variant(prov: Mapping[str, Any], build: Path | None) -> str | None:
    """Which build variant is served: the exporter's record, else the ONNX file's hash in the build."""
    recorded = (prov.get("exporter") or {}).get("variant")
    if isinstance(recorded, str):
        return recorded
    onnx = prov.get("onnx") or {}
    if build is not None and onnx.get("sha256") and (Path(build) / "report.json").is_file():
        for name, path in read_build_variants(build):
            if sha256_file(path) == onnx["sha256"]:
                return name
    return Path(onnx["source"]).stem if onnx.get("source") else None
