"""Read what the earlier stages left on disk: the exporter's build/report.json and a repository's
provenance.json (which ONNX variant is served, with which configuration)."""
from __future__ import annotations

import json
import logging
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


def read_provenance(repository: Path) -> dict[str, Any]:
    path = Path(repository) / "provenance.json"
    if not path.is_file():
        raise LoadtestError(f"{path} not found: was the repository written by serving.repository?")
    return _read_json(path)


def served_variant(repository: Path, build: Path | None = None) -> str | None:
    """Which build variant a repository serves: the exporter's record, else the ONNX file's hash."""
    prov = read_provenance(repository)
    exporter = prov.get("exporter") or {}
    for key in ("variant", "selected", "selected_variant"):
        if isinstance(exporter.get(key), str):
            return exporter[key]
    onnx = Path(repository) / "encoder" / "1" / "model.onnx"
    digest = (prov.get("onnx") or {}).get("sha256") or (sha256_file(onnx) if onnx.is_file() else None)
    if build is not None and digest and (Path(build) / "report.json").is_file():
        for name, path in read_build_variants(build):
            if sha256_file(path) == digest:
                return name
    source = (prov.get("onnx") or {}).get("source")
    return Path(source).stem if source else None


def served_summary(repository: Path, build: Path | None = None) -> dict[str, Any]:
    """The served variant and the encoder's serving configuration, from the repository on disk."""
    from serving.repository import ENCODER, read_config

    prov = read_provenance(repository)
    enc = read_config(Path(repository) / ENCODER / "config.pbtxt")
    params = {k: v.string_value for k, v in enc.parameters.items()}
    instances = sum(g.count for g in enc.instance_group) or 1
    batching = enc.dynamic_batching
    return {
        "repository": str(Path(repository).absolute()),
        "variant": served_variant(repository, build),
        "target": prov.get("target"),
        "encoder_instances": instances,
        "encoder_intra_op_threads": int(params.get("intra_op_threads", "0") or 0),
        "max_batch_size": enc.max_batch_size,
        "preferred_batch_sizes": list(batching.preferred_batch_size),
        "max_queue_delay_us": batching.max_queue_delay_microseconds,
        "config": prov.get("config"),
    }
