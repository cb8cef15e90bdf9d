"""Render every file (a dict of path -> YAML documents) and write them atomically."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from serving.manifests.config import ManifestConfig
from serving.manifests.kserve import inference_service, kserve_network_policy, kserve_service_account
from serving.manifests.locust import locust_objects
from serving.manifests.monitoring import dashboard_config_map, prometheus_rule
from serving.manifests.objects import (
    adapter_values, deployment, hpa, network_policy, pdb, service_account, service_monitor, services,
)
from serving.manifests.values import APP

log = logging.getLogger(__name__)

def _kustomization(resources: Sequence[str]) -> dict[str, Any]:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(resources)}


def render_manifests(config: ManifestConfig) -> dict[str, list[dict[str, Any]]]:
    """Every file to write, keyed by its path relative to the output directory, as lists of YAML documents."""
    files: dict[str, list[dict[str, Any]]] = {}
    if config.create_namespace and config.namespace != "default":
        files["namespace.yaml"] = [{"apiVersion": "v1", "kind": "Namespace",
                                    "metadata": {"name": config.namespace, "labels": {"app.kubernetes.io/part-of": APP}}}]
    files["serviceaccount.yaml"] = [service_account(config)]
    files["deployment.yaml"] = [deployment(config)]
    files["service.yaml"] = services(config)
    files["pdb.yaml"] = [pdb(config)]
    if config.network_policy:
        files["networkpolicy.yaml"] = [network_policy(config)]
    if config.autoscale:
        files["hpa.yaml"] = [hpa(config)]
    if config.service_monitor:
        files["servicemonitor.yaml"] = [service_monitor(config)]
        files["prometheusrule.yaml"] = [prometheus_rule(config)]
    files["grafana-dashboard.yaml"] = [dashboard_config_map(config)]
    files["kustomization.yaml"] = [_kustomization(list(files))]
    if config.autoscale:
        files["prometheus-adapter/values.yaml"] = [adapter_values(config)]
    if config.kserve:
        files.update(_kserve_files(config, files.get("namespace.yaml")))
    if config.locust_image:
        files["locust/locust.yaml"] = locust_objects(config)
        files["locust/kustomization.yaml"] = [_kustomization(["locust.yaml"])]
    return files


def _kserve_files(config: ManifestConfig, namespace: list[dict[str, Any]] | None) -> dict[str, list[dict[str, Any]]]:
    kserve = {"kserve/inferenceservice.yaml": [inference_service(config)]}
    if "serviceAccountName" in kserve["kserve/inferenceservice.yaml"][0]["spec"]["predictor"]:
        kserve["kserve/serviceaccount.yaml"] = [kserve_service_account(config)]
    policy = kserve_network_policy(config) if config.network_policy else None
    if policy is not None:
        kserve["kserve/networkpolicy.yaml"] = [policy]
    resources = [Path(p).name for p in kserve]
    if namespace is not None:
        kserve["kserve/namespace.yaml"] = namespace
        resources.insert(0, "namespace.yaml")
    kserve["kserve/kustomization.yaml"] = [_kustomization(resources)]
    return kserve


def dump_yaml(documents: Sequence[Mapping[str, Any]]) -> str:
    import yaml

    return yaml.safe_dump_all([dict(d) for d in documents], sort_keys=False, default_flow_style=False, width=120)


def write_manifests(config: ManifestConfig, out_dir: Path | str) -> dict[str, list[dict[str, Any]]]:
    """Render and write every file into ``out_dir`` atomically (all files or none); return what was written."""
    from common.atomic import atomic_directory
    from common.provenance import versions

    files = render_manifests(config)
    with atomic_directory(Path(out_dir)) as tmp:
        for rel, docs in files.items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(dump_yaml(docs), encoding="utf-8")
        record = {"config": config.to_json(), "files": sorted(files),
                  "versions": versions(("pyyaml", "kubernetes-validate"))}
        (tmp / "render.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d manifest files to %s", len(files), out_dir)
    return files
