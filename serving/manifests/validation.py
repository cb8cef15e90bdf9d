"""Offline validation of the rendered objects against the Kubernetes schemas (and small CRD schemas)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from serving.manifests.values import KUBERNETES_VERSION, ManifestError

SCHEMA_DIR = Path(__file__).parent.parent / "deploy" / "k8s" / "schemas"
_CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrule.json",
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): "kustomization.json",
}


def _definitions_validator(ref: str, kubernetes_version: str):
    """A jsonschema validator for one definition of the Kubernetes OpenAPI (strict: no unknown fields)."""
    import importlib.resources

    import jsonschema
    import referencing
    import kubernetes_validate.utils as kv

    version = [v for v in kv.all_versions() if kv.major_minor(v) == kv.major_minor(kubernetes_version)]
    if not version:
        raise ManifestError(f"kubernetes-validate has no schemas for Kubernetes {kubernetes_version}")
    path = importlib.resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{version[-1]}-local-strict/_definitions.json")
    definitions = json.loads(path.read_text())
    registry = referencing.Registry().with_resource(
        "/api/_definitions.json", referencing.Resource.from_contents(definitions))
    schema = {"$ref": f"/api/_definitions.json#/$defs/{ref}"}
    return jsonschema.Draft202012Validator(schema, registry=registry)


def validate_manifests(files: Mapping[str, Sequence[Mapping[str, Any]]],
                       kubernetes_version: str = KUBERNETES_VERSION) -> list[str]:
    """Check every rendered object offline; return the problems found (empty when all are valid).

    Core kinds go through ``kubernetes-validate`` (strict schemas of ``kubernetes_version``). The CRDs
    (InferenceService, ServiceMonitor) and kustomization.yaml are checked against the small JSON schemas
    in ``serving/deploy/k8s/schemas``, and the InferenceService's container and volumes against the core
    Container and Volume definitions. The helm values file is checked for the fields the chart reads.
    """
    try:
        import jsonschema
        import kubernetes_validate
    except ImportError as exc:
        raise ManifestError(f"offline validation needs kubernetes-validate (pip install '.[k8s]'): {exc}") from None

    problems: list[str] = []
    container_validator = volume_validator = None
    for rel, docs in files.items():
        for doc in docs:
            where = f"{rel}: {doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}"
            if rel.startswith("prometheus-adapter/"):
                problems += [f"{rel}: {p}" for p in _check_adapter_values(doc)]
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            if key in _CRD_SCHEMAS:
                schema = json.loads((SCHEMA_DIR / _CRD_SCHEMAS[key]).read_text())
                for error in jsonschema.Draft202012Validator(schema).iter_errors(doc):
                    problems.append(f"{where}: {'.'.join(map(str, error.absolute_path))}: {error.message}")
                if key[1] == "InferenceService":
                    if container_validator is None:
                        container_validator = _definitions_validator("io.k8s.api.core.v1.Container",
                                                                     kubernetes_version)
                        volume_validator = _definitions_validator("io.k8s.api.core.v1.Volume", kubernetes_version)
                    predictor = doc.get("spec", {}).get("predictor", {})
                    container = {k: v for k, v in predictor.get("model", {}).items()
                                 if k not in {"modelFormat", "runtime", "storageUri", "runtimeVersion",
                                              "protocolVersion"}}
                    container.setdefault("name", "kserve-container")
                    for error in container_validator.iter_errors(container):
                        problems.append(f"{where}: predictor.model.{'.'.join(map(str, error.absolute_path))}: "
                                        f"{error.message}")
                    for volume in predictor.get("volumes", []):
                        for error in volume_validator.iter_errors(volume):
                            problems.append(f"{where}: predictor.volumes: {error.message}")
                continue
            try:
                kubernetes_validate.validate(dict(doc), kubernetes_version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                problems.append(f"{where}: {'.'.join(map(str, exc.absolute_path))}: {exc.message}")
            except kubernetes_validate.SchemaNotFoundError as exc:
                problems.append(f"{where}: {exc.message}")
    return problems


def _check_adapter_values(values: Mapping[str, Any]) -> list[str]:
    problems = []
    prometheus = values.get("prometheus", {})
    if not str(prometheus.get("url", "")).startswith(("http://", "https://")) or not isinstance(
            prometheus.get("port"), int):
        problems.append("prometheus.url must be http(s)://... and prometheus.port an integer")
    rules = values.get("rules", {}).get("custom")
    if not isinstance(rules, list) or not rules:
        return problems + ["rules.custom must be a non-empty list"]
    for i, rule in enumerate(rules):
        for key in ("seriesQuery", "metricsQuery", "resources", "name"):
            if key not in rule:
                problems.append(f"rules.custom[{i}] lacks {key}")
        if "<<.LabelMatchers>>" not in rule.get("metricsQuery", "") or "<<.GroupBy>>" not in rule.get(
                "metricsQuery", ""):
            problems.append(f"rules.custom[{i}].metricsQuery must use <<.LabelMatchers>> and <<.GroupBy>>")
        try:
            re.compile(rule.get("name", {}).get("matches", ""))
        except re.error as exc:
            problems.append(f"rules.custom[{i}].name.matches: {exc}")
    return problems
