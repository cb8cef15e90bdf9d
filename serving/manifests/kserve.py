"""The KServe alternative: an InferenceService on the kserve-tritonserver runtime with our image."""
from __future__ import annotations

import math
from typing import Any

from serving.manifests.config import ManifestConfig
from serving.manifests.objects import (
    _meta, _pod_security_context, _probe, _resources, _security_context, admin_key_env, ingress_rules, liveness_probe,
    scheduling,
)
from serving.manifests.values import (
    ADMIN_KEY_ENV, KSERVE_GRPC_PORT, KSERVE_HTTP_PORT, KSERVE_ISVC_LABEL, KSERVE_RUNTIME, NGC_ENTRYPOINT, KServeMode,
    RepositoryScheme,
)
from serving.triton_args import TritonServerConfig

def inference_service(config: ManifestConfig) -> dict[str, Any]:
    """The KServe alternative: an InferenceService on the kserve-tritonserver runtime with our image.

    KServe's storage initializer copies ``storageUri`` to /mnt/models and the runtime starts
    ``tritonserver --model-store=/mnt/models --http-port=8080 --grpc-port=9000``; KServe appends the
    ``args`` below to the runtime's and lets ``image`` replace the runtime image (NGC + tokenizers).
    """
    # the runtime owns the repository and the ports; the admin restriction is ours (serving.triton_args)
    args = TritonServerConfig(exit_timeout_secs=config.exit_timeout_s, metrics_port=config.metrics_port,
                              log_verbose=config.log_verbose, admin_key=f"$({ADMIN_KEY_ENV})").to_args_list()
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"},
        "runtime": KSERVE_RUNTIME,
        "storageUri": config.repo_uri.kserve_uri,
        "image": config.image,
        # the runtime's args start with "tritonserver" (written for the NGC entrypoint, which execs them);
        # serving/docker/Dockerfile replaces that ENTRYPOINT, so name it again
        "command": [NGC_ENTRYPOINT],
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}, admin_key_env(config)],
        "resources": _resources(config),
        "readinessProbe": _probe("/v2/health/ready", KSERVE_HTTP_PORT, 5, 3, timeout=3),
        "livenessProbe": liveness_probe(KSERVE_HTTP_PORT),
        "startupProbe": _probe("/v2/health/live", KSERVE_HTTP_PORT, 10, math.ceil(config.startup_timeout_s / 10)),
        "securityContext": _security_context(config),
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, {"name": "tmp", "mountPath": "/tmp"}],
    }
    predictor: dict[str, Any] = {
        "minReplicas": config.min_replicas if config.autoscale else config.replicas,
        "maxReplicas": config.max_replicas if config.autoscale else config.replicas,
        "terminationGracePeriodSeconds": config.grace_period_s,
        "securityContext": _pod_security_context(),
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": config.tmp_size}}],
        "model": model,
    }
    if config.canary_percent is not None:  # the new revision (a new storageUri) gets this share; the rest stays
        predictor["canaryTrafficPercent"] = config.canary_percent  # on the last revision that took 100 %
    if config.repo_uri.scheme is not RepositoryScheme.PVC and config.credentials_secret:
        predictor["serviceAccountName"] = f"{config.name}-kserve"
    predictor.update(scheduling(config))
    meta = _meta(config, config.name, annotations={
        "serving.kserve.io/deploymentMode": config.kserve_mode.value,
        "prometheus.io/scrape": "true", "prometheus.io/port": str(config.metrics_port),
    })
    return {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta,
            "spec": {"predictor": predictor}}


def kserve_service_account(config: ManifestConfig) -> dict[str, Any]:
    """KServe's storage initializer finds object-store credentials through the secrets of this account."""
    meta = _meta(config, f"{config.name}-kserve")
    if config.service_account_annotations:
        meta["annotations"] = dict(config.service_account_annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta,
            "secrets": [{"name": config.credentials_secret}]}


def kserve_network_policy(config: ManifestConfig) -> dict[str, Any] | None:
    """RawDeployment only (Serverless traffic comes through Knative's activator, another namespace)."""
    if config.kserve_mode is not KServeMode.RAW:
        return None
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": _meta(config, f"{config.name}-kserve"),
            "spec": {"podSelector": {"matchLabels": {KSERVE_ISVC_LABEL: config.name}}, "policyTypes": ["Ingress"],
                     "ingress": ingress_rules(config, [KSERVE_HTTP_PORT, KSERVE_GRPC_PORT], config.metrics_port)}}
