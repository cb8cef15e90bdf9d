"""The core Kubernetes objects: Deployment, Services, ServiceAccount, HPA, PDB, ServiceMonitor, NetworkPolicy,
and the prometheus-adapter values."""
from __future__ import annotations

import json
import math
from typing import Any

from serving.contract import DEFAULT_CLASSIFIER, http_infer_body, infer_path
from serving.manifests.config import ManifestConfig
from serving.manifests.values import (
    ADMIN_KEY_ENV, ADMIN_SECRET_KEY, APP, GCS_KEY_DIR, GCS_KEY_FILE, HPA_METRIC, NGC_ENTRYPOINT, PVC_MOUNT,
    QUEUE_METRIC, S3_SECRET_KEYS, SUCCESS_METRIC, TRITON_UID, RepositoryScheme, batched_models,
)
from serving.triton_args import TritonServerConfig
from serving.manifests.gateway import gateway_container, gateway_enabled, gateway_service_port

NAMESPACE_LABEL = "kubernetes.io/metadata.name"  # set by Kubernetes on every namespace (1.22+)
from serving.repository import ENSEMBLE

def _labels(config: ManifestConfig, component: str = "inference-server") -> dict[str, str]:
    return {**_selector(config), "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": APP,
            "app.kubernetes.io/managed-by": "serving.manifests"}


def _selector(config: ManifestConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tritonserver", "app.kubernetes.io/instance": config.name}


def _meta(config: ManifestConfig, name: str, component: str = "inference-server", **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": config.namespace, "labels": _labels(config, component), **extra}


def triton_config(config: ManifestConfig) -> TritonServerConfig:
    """tritonserver's flags in the pod; the admin key is the kubelet-expanded ``$(TRITON_ADMIN_KEY)``."""
    return TritonServerConfig(
        model_repository=config.repo_uri.triton_path, exit_timeout_secs=config.exit_timeout_s,
        http_port=config.http_port, grpc_port=config.grpc_port, metrics_port=config.metrics_port,
        allow_gpu_metrics=bool(config.gpus_per_pod), log_verbose=config.log_verbose,
        admin_key=f"$({ADMIN_KEY_ENV})",
    )


def triton_args(config: ManifestConfig) -> list[str]:
    """tritonserver's command line inside the pod (every flag the probes and Services rely on is explicit)."""
    return ["tritonserver", *triton_config(config).to_args_list()]


def admin_key_env(config: ManifestConfig) -> dict[str, Any]:
    """The admin key from one key of the operator's Secret (never the whole Secret)."""
    return {"name": ADMIN_KEY_ENV,
            "valueFrom": {"secretKeyRef": {"name": config.admin_secret, "key": ADMIN_SECRET_KEY}}}


def _security_context(config: ManifestConfig) -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": config.read_only_root_fs,
        "runAsNonRoot": True,
        "runAsUser": TRITON_UID,
        "runAsGroup": TRITON_UID,
        "capabilities": {"drop": ["ALL"]},
    }


def _pod_security_context() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": TRITON_UID, "runAsGroup": TRITON_UID, "fsGroup": TRITON_UID,
            "seccompProfile": {"type": "RuntimeDefault"}}


def _resources(config: ManifestConfig) -> dict[str, Any]:
    amounts: dict[str, Any] = {"cpu": config.cpu, "memory": config.memory}
    if config.gpus_per_pod:
        amounts["nvidia.com/gpu"] = config.gpus_per_pod  # extended resources: requests must equal limits
    return {"requests": dict(amounts), "limits": dict(amounts)}  # Guaranteed QoS


def _credentials(config: ManifestConfig) -> tuple[list[dict], list[dict], list[dict]]:
    """(env, volumes, volumeMounts) that give Triton access to the repository: one secretKeyRef per key."""
    env: list[dict] = []
    volumes: list[dict] = []
    mounts: list[dict] = []
    uri = config.repo_uri
    if uri.scheme is RepositoryScheme.PVC:
        volumes.append({"name": "model-repository",
                        "persistentVolumeClaim": {"claimName": uri.location, "readOnly": True}})
        mounts.append({"name": "model-repository", "mountPath": PVC_MOUNT, "readOnly": True})
    elif config.credentials_secret and uri.scheme is RepositoryScheme.S3:
        env += [{"name": key, "valueFrom": {"secretKeyRef": {"name": config.credentials_secret, "key": key,
                                                             **({"optional": True} if optional else {})}}}
                for key, optional in S3_SECRET_KEYS]
    elif config.credentials_secret and uri.scheme is RepositoryScheme.GS:
        volumes.append({"name": "gcs-credentials", "secret": {"secretName": config.credentials_secret,
                                                              "items": [{"key": GCS_KEY_FILE, "path": GCS_KEY_FILE}]}})
        mounts.append({"name": "gcs-credentials", "mountPath": GCS_KEY_DIR, "readOnly": True})
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_KEY_DIR}/{GCS_KEY_FILE}"})
    return env, volumes, mounts


def _probe(path: str, port: str | int, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures, "successThreshold": 1}


# One-row inference, like the local supervisor's canary: /v2/health/live stays green when a python-backend
# stub dies, every request then fails with 500 "Stub process ... is not healthy". Exit 1 on that answer or
# on a refused connection; a slow answer or 503 (queue full) is load, not death: exit 0.
_LIVENESS_SCRIPT = """import sys, urllib.error as e, urllib.request as u
r = u.Request({url!r}, data={body!r}, headers={{"Content-Type": "application/json"}})
try:
    u.urlopen(r, timeout={timeout}).read()
except e.HTTPError as x:
    sys.exit({marker!r} in x.read().decode("utf-8", "replace"))
except OSError as x:
    sys.exit(isinstance(getattr(x, "reason", x), ConnectionRefusedError))
"""
LIVENESS_TEXT = "liveness probe"


def liveness_probe(port: int, period: int = 10, failures: int = 3, timeout: int = 5) -> dict[str, Any]:
    """An exec probe (python3 is in the image for the python backend) that runs one tiny inference."""
    from serving.supervisor import UNHEALTHY_STUB

    script = _LIVENESS_SCRIPT.format(
        url=f"http://127.0.0.1:{port}{infer_path(DEFAULT_CLASSIFIER)}", timeout=max(1, timeout - 1),
        body=json.dumps(http_infer_body([LIVENESS_TEXT])).encode(), marker=UNHEALTHY_STUB)
    return {"exec": {"command": ["python3", "-c", script]}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures, "successThreshold": 1}


def _triton_container(config: ManifestConfig) -> tuple[dict[str, Any], list[dict]]:
    """The tritonserver container and the credential volumes it mounts."""
    env, cred_volumes, cred_mounts = _credentials(config)
    container: dict[str, Any] = {
        "name": "tritonserver",
        "image": config.image,
        "imagePullPolicy": "IfNotPresent",
        # the NGC entrypoint sets up CUDA compatibility libraries, then execs its arguments
        "command": [NGC_ENTRYPOINT],
        "args": triton_args(config),
        "ports": [
            {"name": "http", "containerPort": config.http_port, "protocol": "TCP"},
            {"name": "grpc", "containerPort": config.grpc_port, "protocol": "TCP"},
            {"name": "metrics", "containerPort": config.metrics_port, "protocol": "TCP"},
        ],
        "env": [{"name": "HOME", "value": "/tmp"}, admin_key_env(config), *env],
        "resources": _resources(config),
        # Triton starts its endpoints only after every model loaded (model-control-mode none): the startup
        # probe gives the repository download, the ONNX Runtime session build (and TensorRT) time to finish.
        "startupProbe": _probe("/v2/health/live", "http", 10, math.ceil(config.startup_timeout_s / 10)),
        "livenessProbe": liveness_probe(config.http_port),
        "readinessProbe": _probe("/v2/health/ready", "http", 5, 3, timeout=3),
        # let endpoints controllers drop the pod before Triton stops taking requests
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(config.pre_stop_sleep_s)]}}}
        if config.pre_stop_sleep_s else None,
        "securityContext": _security_context(config),
        "volumeMounts": [
            {"name": "dshm", "mountPath": "/dev/shm"},
            {"name": "tmp", "mountPath": "/tmp"},
            *cred_mounts,
        ],
    }
    return {k: v for k, v in container.items() if v is not None}, cred_volumes


def scheduling(config: ManifestConfig) -> dict[str, Any]:
    """A pod spec's GPU toleration and node selector (the Deployment's and KServe's predictor's)."""
    spec: dict[str, Any] = {}
    if config.gpus_per_pod:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if config.node_selector:
        spec["nodeSelector"] = dict(config.node_selector)
    return spec


def _pod_spec(config: ManifestConfig) -> dict[str, Any]:
    container, cred_volumes = _triton_container(config)
    pod_spec: dict[str, Any] = {
        "serviceAccountName": config.name,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": config.grace_period_s,
        "securityContext": _pod_security_context(),
        "containers": [container, *([gateway_container(config, _security_context(config))]
                                    if gateway_enabled(config) else [])],
        "volumes": [
            # Docker's and the kubelet's default /dev/shm is 64 MB: too small for python-backend stubs
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": config.shm_size}},
            {"name": "tmp", "emptyDir": {"sizeLimit": config.tmp_size}},
            *cred_volumes,
        ],
        "topologySpreadConstraints": [{
            "maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": _selector(config)},
        }],
    }
    pod_spec.update(scheduling(config))
    return pod_spec


def deployment(config: ManifestConfig) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": {"matchLabels": _selector(config)},
        # a new GPU pod must be ready before an old one goes: capacity never dips during a rollout
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        "revisionHistoryLimit": 5,
        "template": {
            "metadata": {
                "labels": _labels(config),
                "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(config.metrics_port),
                                "prometheus.io/path": "/metrics"},
            },
            "spec": _pod_spec(config),
        },
    }
    if not config.autoscale:
        spec = {"replicas": config.replicas, **spec}
    # With an HPA, spec.replicas stays out of the manifest (Kubernetes' advice): a re-apply would reset it.
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(config, config.name), "spec": spec}


def ingress_rules(config: ManifestConfig, ports: list[str | int], metrics_port: str | int) -> list[dict[str, Any]]:
    """NetworkPolicy ingress: inference ``ports`` from this namespace (and the ingress namespace), the
    metrics port from the monitoring namespace only."""
    peers: list[dict[str, Any]] = [{"podSelector": {}}]  # any pod of this namespace
    if config.ingress_namespace:
        peers.append({"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: config.ingress_namespace}}})
    return [
        {"from": peers, "ports": [{"protocol": "TCP", "port": p} for p in ports]},
        {"from": [{"namespaceSelector": {"matchLabels": {NAMESPACE_LABEL: config.monitoring_namespace}}}],
         "ports": [{"protocol": "TCP", "port": metrics_port}]},
    ]


def network_policy(config: ManifestConfig) -> dict[str, Any]:
    """Only these sources reach the tritonserver pods; everything else is dropped (Ingress policy)."""
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": _meta(config, config.name),
            "spec": {"podSelector": {"matchLabels": _selector(config)}, "policyTypes": ["Ingress"],
                     "ingress": ingress_rules(config, ["http", "grpc", *(["gateway"] if gateway_enabled(config)
                                                                          else [])], "metrics")}}


def services(config: ManifestConfig) -> list[dict[str, Any]]:
    ports = [
        {"name": "http", "port": config.http_port, "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": config.grpc_port, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "metrics", "port": config.metrics_port, "targetPort": "metrics", "protocol": "TCP"},
    ]
    if gateway_enabled(config):
        ports.append(gateway_service_port(config))
    main = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(config, config.name),
            "spec": {"type": config.service_type.value, "selector": _selector(config), "ports": ports}}
    # gRPC keeps one HTTP/2 connection per client: a ClusterIP balances connections, not requests. The
    # headless Service gives clients (dns:/// resolver + round_robin) or a mesh every pod's address.
    headless = {"apiVersion": "v1", "kind": "Service",
                "metadata": _meta(config, f"{config.name}-headless", component="inference-server-headless"),
                "spec": {"clusterIP": "None", "selector": _selector(config),
                         "ports": [{k: v for k, v in p.items()} for p in ports[:2]]}}
    return [main, headless]


def service_account(config: ManifestConfig) -> dict[str, Any]:
    meta = _meta(config, config.name)
    if config.service_account_annotations:  # e.g. eks.amazonaws.com/role-arn, iam.gke.io/gcp-service-account
        meta["annotations"] = dict(config.service_account_annotations)
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta, "automountServiceAccountToken": False}


def hpa(config: ManifestConfig) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": _meta(config, config.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": config.name},
            "minReplicas": config.min_replicas,
            "maxReplicas": config.max_replicas,
            "metrics": [{
                "type": "Pods",
                "pods": {"metric": {"name": HPA_METRIC},
                         "target": {"type": "AverageValue", "averageValue": str(config.target_queue_us)}},
            }],
            "behavior": {
                # GPU pods take minutes to start: add capacity at once, give it back slowly
                "scaleUp": {"stabilizationWindowSeconds": 0, "selectPolicy": "Max",
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60},
                                         {"type": "Percent", "value": 100, "periodSeconds": 60}]},
                "scaleDown": {"stabilizationWindowSeconds": 300, "selectPolicy": "Min",
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
            },
        },
    }


def pdb(config: ManifestConfig) -> dict[str, Any]:
    # maxUnavailable (not minAvailable) so a single-replica deployment can still be drained
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(config, config.name),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _selector(config)}}}


def service_monitor(config: ManifestConfig) -> dict[str, Any]:
    meta = _meta(config, config.name)
    meta["labels"].update(config.service_monitor_labels)  # e.g. release=kube-prometheus-stack
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": meta,
        "spec": {
            # the main Service only (the headless one has another component label): one scrape per pod
            "selector": {"matchLabels": {**_selector(config), "app.kubernetes.io/component": "inference-server"}},
            "namespaceSelector": {"matchNames": [config.namespace]},
            "endpoints": [{"port": "metrics", "path": "/metrics", "interval": "15s", "scheme": "http"}],
        },
    }


def adapter_rule(config: ManifestConfig) -> dict[str, Any]:
    """prometheus-adapter rule: mean queue time (us) per ``classifier`` request, per pod, over one minute.

    Queue time of the batched model (the one served model on either target) divided by its successful
    requests.
    """
    matchers = "<<.LabelMatchers>>"
    queued = "|".join(batched_models(config.repository.target))
    query = (
        f"sum by (<<.GroupBy>>) (rate({QUEUE_METRIC}{{{matchers},model=~\"{queued}\"}}[1m]))"
        f" / clamp_min(sum by (<<.GroupBy>>) (rate({SUCCESS_METRIC}{{{matchers},model=\"{ENSEMBLE}\"}}[1m])), 0.001)"
    )
    return {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{QUEUE_METRIC}$", "as": HPA_METRIC},
        "metricsQuery": query,
    }


def adapter_values(config: ManifestConfig) -> dict[str, Any]:
    """Values for the prometheus-community/prometheus-adapter helm chart."""
    return {
        "prometheus": {"url": config.prometheus_url, "port": config.prometheus_port, "path": ""},
        "metricsRelistInterval": "1m",
        "rules": {"default": False, "custom": [adapter_rule(config)]},
    }
