"""Kubernetes manifests for the GPU Triton deployment, rendered from one validated config.

``python -m serving manifests --image REGISTRY/IMAGE:TAG --repository-uri s3://bucket/repo --out DIR``
writes one YAML file per kind plus a ``kustomization.yaml`` (``kubectl apply -k DIR``):

- ``deployment.yaml``   the NGC-based tritonserver pods (GPU limits, /dev/shm in memory, probes, security,
                        admin APIs restricted to the key of a Secret)
- ``service.yaml``      ClusterIP Service (http 8000, grpc 8001, metrics 8002) + a headless one for gRPC
                        client-side balancing
- ``networkpolicy.yaml`` inference ports from the namespace (and an ingress namespace), metrics from the
                        monitoring namespace, nothing else
- ``hpa.yaml``          autoscaling/v2 HPA on a Triton queue-time pods metric (via prometheus-adapter)
- ``pdb.yaml``, ``serviceaccount.yaml``, ``servicemonitor.yaml`` (prometheus-operator), ``namespace.yaml``
- ``prometheus-adapter/values.yaml``  helm values with the rule that makes the HPA's metric
- ``kserve/``           the KServe ``InferenceService`` alternative (apply instead of the above, not with it)
- ``locust/``           distributed Locust (master + workers) aimed at the Service, when ``--locust-image``
- ``render.json``       the config that rendered the files (provenance)

Manifests are Python dicts dumped with ``yaml.safe_dump``; nothing is a string template. Every object
comes from :class:`ManifestConfig`, whose ``__post_init__`` refuses bad values with :class:`ManifestError`.
The package's modules follow the sections: ``values`` (constants, parsers), ``config``, ``objects`` (core
kinds), ``kserve``, ``locust``, ``render`` (files, writing), ``validation`` (offline schemas), ``cli``.
tritonserver's flags come from :mod:`serving.triton_args`, the builder the local server uses too.
"""
from __future__ import annotations

from serving.manifests.cli import add_arguments, config_from_args, main, run
from serving.manifests.config import ManifestConfig
from serving.manifests.kserve import inference_service, kserve_network_policy, kserve_service_account
from serving.manifests.locust import locust_objects
from serving.manifests.objects import (
    adapter_rule, adapter_values, deployment, hpa, liveness_probe, network_policy, pdb, service_account,
    service_monitor, services, triton_args,
)
from serving.manifests.render import dump_yaml, render_manifests, write_manifests
from serving.manifests.validation import SCHEMA_DIR, validate_manifests
from serving.manifests.values import (
    ADMIN_SECRET_KEY, APP, BATCHED_MODELS, batched_models, DEFAULT_OUT, GCS_KEY_DIR, GCS_KEY_FILE, HPA_METRIC, KSERVE_HTTP_PORT,
    KSERVE_RUNTIME, KUBERNETES_VERSION, LOCUST_MASTER_PORT, LOCUST_WEB_PORT, NGC_ENTRYPOINT, PVC_MOUNT, QUEUE_METRIC,
    SUCCESS_METRIC, TRITON_UID, KServeMode, ManifestError, RepositoryScheme, RepositoryUri, ServiceType,
    check_image, estimate_shm_bytes, parse_cpu, parse_quantity,
)

__all__ = [
    "ADMIN_SECRET_KEY", "APP", "BATCHED_MODELS", "batched_models", "DEFAULT_OUT", "GCS_KEY_DIR", "GCS_KEY_FILE", "HPA_METRIC",
    "KSERVE_HTTP_PORT", "KSERVE_RUNTIME", "KUBERNETES_VERSION", "LOCUST_MASTER_PORT", "LOCUST_WEB_PORT",
    "NGC_ENTRYPOINT", "PVC_MOUNT", "QUEUE_METRIC", "SCHEMA_DIR", "SUCCESS_METRIC", "TRITON_UID", "KServeMode",
    "ManifestConfig", "ManifestError", "RepositoryScheme", "RepositoryUri", "ServiceType", "add_arguments",
    "adapter_rule", "adapter_values", "check_image", "config_from_args", "deployment", "dump_yaml",
    "estimate_shm_bytes", "hpa", "inference_service", "kserve_network_policy", "kserve_service_account",
    "liveness_probe", "locust_objects", "main", "network_policy", "parse_cpu", "parse_quantity", "pdb",
    "render_manifests", "run", "service_account", "service_monitor", "services", "triton_args",
    "validate_manifests", "write_manifests",
]
