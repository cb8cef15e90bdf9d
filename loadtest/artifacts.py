"""Read what the earlier stages left on disk: the exporter's build/report.json and a repository's
provenance.json (which ONNX variant is served, with which configuration: ``read_served_repository``)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.provenance import sha256_file
from loadtest.errors import LoadtestError

log = logging.getLogger(__name__)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoadtestError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise LoadtestError(f"{path} is not JSON: {exc}") from exc


def _report(build: Path):
    """The exporter's typed build report (exporter.artifacts owns its schema)."""
    from exporter.artifacts import ArtifactError, read_report

    try:
        return read_report(Path(build))
    except ArtifactError as exc:
        raise LoadtestError(str(exc)) from None


def read_build_variants(build: Path) -> list[tuple[str, Path]]:
    """(name, ONNX file) for every variant in ``build/report.json`` whose file exists in ``build``."""
    build = Path(build)
    out = []
    for name, variant in _report(build).variants.items():
        path = build / variant.file if variant.file else None
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
# Everything the load tests need to know about a repository on disk comes from read_served_repository:
# the ONE place in loadtest that knows the repository's layout (to be replaced by
# serving.repository.read_repository once that exists).


@dataclass(frozen=True)
class ServedRepository:
    """What a repository serves: the ONNX file and tokenizer behind it, its labels, and how it is served."""

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

    def summary(self) -> dict[str, Any]:
        """The JSON-able part (for reports)."""
        return {"repository": str(self.path.absolute()), "variant": self.variant, "target": self.target,
                "onnx": str(self.onnx), "instances": self.instances, "intra_op_threads": self.intra_op_threads,
                "max_batch_size": self.max_batch_size, "preferred_batch_sizes": list(self.preferred_batch_sizes),
                "max_queue_delay_us": self.max_queue_delay_us, "config": dict(self.config)}


def read_provenance(repository: Path) -> dict[str, Any]:
    path = Path(repository) / "provenance.json"
    if not path.is_file():
        raise LoadtestError(f"{path} not found: was the repository written by serving.repository?")
    return _read_json(path)


def _first_file(*candidates: Path | None, name: str = "") -> Path | None:
    for c in candidates:
        if c is not None and (c / name if name else c).is_file():
            return c
    return None


def _serving_model_config(repository: Path):
    """The config of the model that runs the encoder (python per-row model or onnxruntime encoder)."""
    from serving.repository import ENCODER, ENSEMBLE, read_config

    for name in (ENCODER, ENSEMBLE):
        path = Path(repository) / name / "config.pbtxt"
        if path.is_file():
            cfg = read_config(path)
            if cfg.platform != "ensemble":
                return cfg
    raise LoadtestError(f"{repository}: no encoder model config found")


def read_served_repository(repository: Path, build: Path | None = None) -> ServedRepository:
    """Read a repository written by serving.repository: provenance first, the files on disk as fallback."""
    from serving.repository import ENCODER, ENSEMBLE, TOKENIZER, VERSION

    repository = Path(repository)
    prov = read_provenance(repository)
    labels = prov.get("labels")
    if not isinstance(labels, list) or len(labels) < 1:
        raise LoadtestError(f"{repository}/provenance.json has no labels list")
    exporter = prov.get("exporter") or {}
    onnx_info = prov.get("onnx") or {}
    onnx = _first_file(Path(onnx_info["source"]) if onnx_info.get("source") else None,
                       *(repository / m / VERSION / "model.onnx" for m in (ENCODER, ENSEMBLE)))
    tok = _first_file(*(Path(str(exporter[k])) for k in ("tokenizer_dir", "checkpoint") if exporter.get(k)),
                      *(repository / m / VERSION / "tokenizer" for m in (TOKENIZER, ENSEMBLE)), name="tokenizer.json")
    if onnx is None or tok is None:
        raise LoadtestError(f"cannot find the served ONNX file or tokenizer for {repository}")
    enc = _serving_model_config(repository)
    params = {k: v.string_value for k, v in enc.parameters.items()}
    return ServedRepository(
        path=repository, onnx=onnx, tokenizer_dir=tok, labels=tuple(str(x) for x in labels),
        variant=_served_variant(prov, onnx_info.get("sha256"), build), target=prov.get("target"),
        instances=sum(g.count for g in enc.instance_group) or 1,
        intra_op_threads=int(params.get("intra_op_threads", "0") or 0), max_batch_size=enc.max_batch_size,
        preferred_batch_sizes=tuple(enc.dynamic_batching.preferred_batch_size),
        max_queue_delay_us=enc.dynamic_batching.max_queue_delay_microseconds,
        config=prov.get("config") or {}, provenance=prov)


def _served_variant(prov: Mapping[str, Any], digest: str | None, build: Path | None) -> str | None:
    """Which build variant is served: the exporter's record, else the ONNX file's hash in the build."""
    exporter = prov.get("exporter") or {}
    for key in ("variant", "selected", "selected_variant"):
        if isinstance(exporter.get(key), str):
            return exporter[key]
    if build is not None and digest and (Path(build) / "report.json").is_file():
        for name, path in read_build_variants(build):
            if sha256_file(path) == digest:
                return name
    source = (prov.get("onnx") or {}).get("source")
    return Path(source).stem if source else None
