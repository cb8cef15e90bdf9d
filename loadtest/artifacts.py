"""Read what the earlier stages left on disk: the exporter's build/report.json and a repository's
provenance.json (which ONNX variant is served, with which configuration: ``read_served_repository``)."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
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
