"""The gateway container (docs/GATEWAY.md) in the tritonserver pod: ``python -m serving gateway`` from the
image serving/docker/Dockerfile.gateway, forwarding to Triton's gRPC port on the pod's loopback, reading the
contracts and tokenizers from the same read-only repository volume, its API key from one key of a Secret."""
from __future__ import annotations

from typing import Any

from serving.gateway.config import API_KEY_ENV
from serving.manifests.config import ManifestConfig
from serving.manifests.values import PVC_MOUNT

GATEWAY_SECRET_KEY = "api-key"


def gateway_enabled(config: ManifestConfig) -> bool:
    return config.gateway_image is not None


def gateway_container(config: ManifestConfig, security_context: dict[str, Any]) -> dict[str, Any]:
    """The gateway's container; it binds the pod's address (the Service and the NetworkPolicy guard it)."""
    args = ["python", "-m", "serving", "gateway", "--repository", config.repo_uri.triton_path,
            "--triton-url", f"127.0.0.1:{config.grpc_port}", "--host", "0.0.0.0", "--port", str(config.gateway_port)]
    probe = {"httpGet": {"path": "/health", "port": "gateway"}, "timeoutSeconds": 3, "successThreshold": 1}
    return {
        "name": "gateway",
        "image": config.gateway_image,
        "imagePullPolicy": "IfNotPresent",
        "args": args,
        "ports": [{"name": "gateway", "containerPort": config.gateway_port, "protocol": "TCP"}],
        "env": [{"name": "HOME", "value": "/tmp"},
                {"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": config.gateway_secret,
                                                                      "key": GATEWAY_SECRET_KEY}}}],
        "resources": {"requests": {"cpu": config.gateway_cpu, "memory": "512Mi"},
                      "limits": {"cpu": config.gateway_cpu, "memory": "512Mi"}},
        # /health answers 503 until tritonserver is ready: readiness follows it; liveness only asks that the
        # gateway answers at all (a TCP connect), so a slow model start never restarts it
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"tcpSocket": {"port": "gateway"}, "periodSeconds": 10, "failureThreshold": 3,
                          "timeoutSeconds": 3, "successThreshold": 1},
        "securityContext": security_context,
        "volumeMounts": [{"name": "model-repository", "mountPath": PVC_MOUNT, "readOnly": True},
                         {"name": "tmp", "mountPath": "/tmp"}],
    }


def gateway_service_port(config: ManifestConfig) -> dict[str, Any]:
    return {"name": "gateway", "port": config.gateway_port, "targetPort": "gateway", "protocol": "TCP"}
