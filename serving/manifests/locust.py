"""Distributed Locust in the cluster (master + workers) aimed at the triton Service.

Not exposed cluster-wide: the master's web UI binds 127.0.0.1 inside its pod (reach it with ``kubectl
port-forward deploy/<name>-locust-master 8089``), its Service carries only the worker port, and a
NetworkPolicy lets only the worker pods reach that port.
"""
from __future__ import annotations

from typing import Any

from serving.manifests.config import ManifestConfig
from serving.manifests.values import LOCUST_MASTER_PORT, LOCUST_WEB_PORT


def _selectors(config: ManifestConfig) -> tuple[dict[str, str], dict[str, str]]:
    master = {"app.kubernetes.io/name": "locust", "app.kubernetes.io/instance": f"{config.name}-locust",
              "app.kubernetes.io/component": "master"}
    return master, {**master, "app.kubernetes.io/component": "worker"}


def _container(config: ManifestConfig, args: list[str], ports: list[dict]) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": "locust", "image": config.locust_image, "imagePullPolicy": "IfNotPresent", "args": args,
        "env": [{"name": "LOCUST_LOCUSTFILE", "value": "/app/loadtest/locustfile.py"},
                {"name": "HOME", "value": "/tmp"}],
        "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                            "runAsNonRoot": True, "runAsUser": 1000, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
    if ports:
        c["ports"] = ports
    return c


def _deployment(config: ManifestConfig, name: str, replicas: int, selector: dict, c: dict) -> dict[str, Any]:
    pod = {"automountServiceAccountToken": False,
           "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
           "containers": [c], "volumes": [{"name": "tmp", "emptyDir": {}}]}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": config.namespace, "labels": dict(selector)},
            "spec": {"replicas": replicas, "selector": {"matchLabels": dict(selector)},
                     "template": {"metadata": {"labels": dict(selector)}, "spec": pod}}}


def locust_objects(config: ManifestConfig) -> list[dict[str, Any]]:
    """Master (web UI on its loopback), N workers, the master's Service (worker port) and its NetworkPolicy."""
    assert config.locust_image is not None
    host = (f"grpc://{config.service_host}:{config.grpc_port}" if "Grpc" in config.locust_user_class
            else f"http://{config.service_host}:{config.http_port}")
    sel_master, sel_worker = _selectors(config)
    master_name = f"{config.name}-locust-master"
    master = _deployment(config, master_name, 1, sel_master, _container(
        config, ["--master", f"--host={host}", f"--master-bind-port={LOCUST_MASTER_PORT}",
                 "--web-host=127.0.0.1", f"--web-port={LOCUST_WEB_PORT}",
                 f"--expect-workers={config.locust_workers}", config.locust_user_class],
        [{"name": "master", "containerPort": LOCUST_MASTER_PORT}]))
    workers = _deployment(config, f"{config.name}-locust-worker", config.locust_workers, sel_worker, _container(
        config, ["--worker", f"--master-host={master_name}", f"--master-port={LOCUST_MASTER_PORT}",
                 config.locust_user_class], []))
    meta = {"name": master_name, "namespace": config.namespace, "labels": dict(sel_master)}
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta,
               "spec": {"selector": dict(sel_master), "ports": [
                   {"name": "master", "port": LOCUST_MASTER_PORT, "targetPort": "master"}]}}
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": dict(meta),
              "spec": {"podSelector": {"matchLabels": dict(sel_master)}, "policyTypes": ["Ingress"],
                       "ingress": [{"from": [{"podSelector": {"matchLabels": dict(sel_worker)}}],
                                    "ports": [{"protocol": "TCP", "port": LOCUST_MASTER_PORT}]}]}}
    return [master, workers, service, policy]
