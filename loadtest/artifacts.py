"""Read what the earlier stages left on disk: the exporter's build/report.json and a repository's
provenance.json (which ONNX variant is served, with which configuration)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

from common.provenance import sha256_file
from loadtest.errors import LoadtestError

log = logging.getLogger(__name__)

_FILE_KEYS = ("path", "file", "onnx", "onnx_path", "model", "model_path")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise LoadtestError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise LoadtestError(f"{path} is not JSON: {exc}") from exc


def _variant_entries(report: Any) -> list[tuple[str, Mapping[str, Any]]]:
    variants = report.get("variants") if isinstance(report, Mapping) else None
    if isinstance(variants, Mapping):
        return [(str(k), v) for k, v in variants.items() if isinstance(v, Mapping)]
    if isinstance(variants, list):
        return [(str(v.get("name") or v.get("variant") or i), v) for i, v in enumerate(variants)
                if isinstance(v, Mapping)]
    return []


def _variant_file(build: Path, entry: Mapping[str, Any]) -> Path | None:
    for key in _FILE_KEYS:
        value = entry.get(key)
        if isinstance(value, str) and value.endswith(".onnx"):
            path = Path(value)
            for candidate in (path, build / path, build / path.name):
                if candidate.is_file():
                    return candidate
    return None


def read_build_variants(build: Path) -> list[tuple[str, Path]]:
    """(name, ONNX file) for every variant in ``build/report.json`` whose file exists in ``build``."""
    build = Path(build)
    report = _read_json(build / "report.json")
    out = []
    for name, entry in _variant_entries(report):
        path = _variant_file(build, entry)
        if path is None:
            log.warning("build report variant %s has no ONNX file in %s: skipped", name, build)
            continue
        out.append((name, path))
    if not out:
        raise LoadtestError(f"{build}/report.json lists no variant with an ONNX file in {build}")
    return out


def build_parity(build: Path) -> dict[str, bool | None]:
    """Variant name -> whether it passed the exporter's parity gate (None when the report does not say)."""
    out: dict[str, bool | None] = {}
    for name, entry in _variant_entries(_read_json(Path(build) / "report.json")):
        parity = entry.get("parity")
        passed = parity.get("passed") if isinstance(parity, Mapping) else entry.get("passed")
        out[name] = passed if isinstance(passed, bool) else None
    return out


def selected_variant(build: Path) -> str | None:
    """The variant the exporter selected for serving, when its report says."""
    report = _read_json(Path(build) / "report.json")
    for key in ("selected", "selected_variant", "serve", "served_variant"):
        value = report.get(key) if isinstance(report, Mapping) else None
        if isinstance(value, str):
            return value
        if isinstance(value, Mapping) and isinstance(value.get("name") or value.get("variant"), str):
            return value.get("name") or value.get("variant")
    return None


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
