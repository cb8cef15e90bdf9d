"""`ManifestConfig`: every value the rendered manifests depend on, validated in ``__post_init__``."""
from __future__ import annotations

import dataclasses
import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any

from serving.manifests.values import (
    _DNS_LABEL, _DNS_SUBDOMAIN, _LABEL_KEY, _LABEL_VALUE, batched_models, KServeMode, ManifestError, RepositoryUri,
    RepositoryScheme,
    ServiceType, _parse_pairs, check_image, estimate_shm_bytes, parse_cpu, parse_quantity,
)
from serving.repository import RepositoryConfig, Target


@dataclass
class ManifestConfig:
    """Every value the rendered manifests depend on. Validated in ``__post_init__``."""

    image: str = field(metadata={
        "help": "image built from serving/docker/Dockerfile, REGISTRY/NAME:TAG or @sha256 digest"})
    repository_uri: str = field(metadata={
        "help": "s3://BUCKET/PATH (or s3://[https://]HOST:PORT/BUCKET/PATH), gs://BUCKET/PATH, or pvc://CLAIM/PATH "
                "(mounted read-only)"})
    replicas: int = field(default=1, metadata={"help": "pods (with autoscaling: the default --min-replicas)"})
    name: str = field(default="triton", metadata={"help": "name of the Deployment, Service, HPA..."})
    namespace: str = field(default="triton", metadata={"help": "namespace"})
    create_namespace: bool = field(default=True, metadata={
        "help": "render a Namespace object (--no-namespace-object: the namespace exists already)"})
    gpus_per_pod: int = field(default=1, metadata={"help": "nvidia.com/gpu limit per pod"})
    shm_size: str = field(default="1Gi", metadata={"help": "sizeLimit of the in-memory /dev/shm"})
    tmp_size: str = field(default="8Gi", metadata={
        "help": "sizeLimit of /tmp, where Triton copies an s3/gs repository"})
    cpu: str = field(default="4", metadata={"help": "CPU request = limit per pod"})
    memory: str = field(default="16Gi", metadata={"help": "memory request = limit per pod, /dev/shm included"})
    # autoscaling (autoscaling/v2 HPA on the prometheus-adapter metric HPA_METRIC)
    autoscale: bool = field(default=True, metadata={
        "help": "a HorizontalPodAutoscaler (--no-autoscale: fixed --replicas)"})
    min_replicas: int | None = field(default=None, metadata={"help": "HPA minimum (default: --replicas)"})
    max_replicas: int | None = field(default=None, metadata={"help": "HPA maximum (default: 2 x minimum)"})
    target_queue_us: int = field(default=20_000, metadata={
        "help": "HPA target: mean Triton queue time per request in us, per pod"})
    # Triton and the pod lifecycle
    http_port: int = field(default=8000, metadata={"help": "Triton's HTTP port in the pod and the Service"})
    grpc_port: int = field(default=8001, metadata={"help": "Triton's gRPC port in the pod and the Service"})
    metrics_port: int = field(default=8002, metadata={"help": "Triton's metrics port in the pod and the Service"})
    exit_timeout_s: int = field(default=30, metadata={
        "help": "Triton's --exit-timeout-secs; the grace period is longer"})
    pre_stop_sleep_s: int = field(default=5, metadata={
        "help": "seconds the preStop hook sleeps so endpoints drop the pod before Triton stops"})
    grace_period_s: int | None = field(default=None, metadata={
        "help": "terminationGracePeriodSeconds (default: pre-stop sleep + exit timeout + 15)"})
    startup_timeout_s: int = field(default=900, metadata={
        "help": "seconds the startup probe allows for downloading and loading models"})
    log_verbose: int = field(default=0, metadata={"help": "Triton's --log-verbose level"})
    # exposure, identity, scheduling
    service_type: ServiceType = field(default=ServiceType.CLUSTER_IP, metadata={"help": "type of the Service"})
    credentials_secret: str | None = field(default="triton-repository-credentials", metadata={
        "help": "Secret with the object-store credentials ('' for none: workload identity/IRSA)"})
    service_account_annotations: dict[str, str] = field(default_factory=dict, metadata={
        "help": "annotation on the ServiceAccount, e.g. eks.amazonaws.com/role-arn=arn:..."})
    node_selector: dict[str, str] = field(default_factory=dict, metadata={"help": "node selector for the pods"})
    read_only_root_fs: bool = field(default=True, metadata={
        "help": "make the container's root filesystem read-only (--writable-root-fs: do not)"})
    # monitoring
    service_monitor: bool = field(default=True, metadata={
        "help": "a ServiceMonitor (--no-service-monitor: no prometheus-operator in the cluster; pods keep scrape "
                "annotations)"})
    service_monitor_labels: dict[str, str] = field(default_factory=dict, metadata={
        "help": "label the Prometheus' serviceMonitorSelector wants, e.g. release=kube-prometheus-stack"})
    prometheus_url: str = field(default="http://prometheus-operated.monitoring.svc", metadata={
        "help": "Prometheus for prometheus-adapter (http(s)://HOST, no path)"})
    prometheus_port: int = field(default=9090, metadata={"help": "port of that Prometheus"})
    # alternatives and extras
    kserve: bool = field(default=True, metadata={"help": "also render the KServe InferenceService alternative"})
    kserve_mode: KServeMode = field(default=KServeMode.RAW, metadata={"help": "KServe deployment mode"})
    canary_percent: int | None = field(default=None, metadata={
        "help": "KServe canary: the share of traffic (0-100) the InferenceService's new revision gets "
                "(spec.predictor.canaryTrafficPercent; Serverless mode); re-render with a new --repository-uri "
                "to roll a new version out, 100 promotes it, 0 rolls back (docs/KUBERNETES.md)"})
    locust_image: str | None = field(default=None, metadata={
        "help": "image from serving/deploy/k8s/locust.Dockerfile: renders distributed Locust in locust/"})
    locust_workers: int = field(default=2, metadata={"help": "Locust worker pods"})
    locust_user_class: str = field(default="TritonHttpUser", metadata={"help": "TritonHttpUser or TritonGrpcUser"})
    repository: RepositoryConfig = field(default_factory=lambda: RepositoryConfig(target=Target.GPU), metadata={
        "help": "the repository the image serves (on the command line: --target, --max-batch-size, --max-length, "
                "--encoder-instances, --max-batch-tokens)"})
    # security (docs/SECURITY.md)
    gateway_image: str | None = field(default=None, metadata={
        "help": "image of the gateway (serving/docker/Dockerfile.gateway): with one, every pod runs the OpenAI / "
                "text-embeddings-inference gateway beside tritonserver (needs a pvc:// repository)"})
    gateway_port: int = field(default=8080, metadata={"help": "the gateway's port in the pod and the Service"})
    gateway_cpu: str = field(default="1", metadata={"help": "CPU request = limit of the gateway container"})
    gateway_secret: str = field(default="textclf-gateway", metadata={
        "help": "Secret whose key 'api-key' holds the gateway's API key (Authorization: Bearer)"})
    admin_secret: str = field(default="triton-admin", metadata={
        "help": "Secret whose key 'admin-key' holds the key of Triton's restricted admin APIs"})
    network_policy: bool = field(default=True, metadata={
        "help": "render NetworkPolicies (inference from the namespace/ingress, metrics from monitoring)"})
    ingress_namespace: str | None = field(default=None, metadata={
        "help": "namespace of the ingress controller / gateway allowed to reach the inference ports"})
    monitoring_namespace: str = field(default="monitoring", metadata={
        "help": "namespace of Prometheus, the only one allowed to scrape the metrics port"})
    require_digest: bool = field(default=False, metadata={
        "help": "refuse images not pinned by @sha256 digest"})

    def __post_init__(self) -> None:
        self.service_type = _enum(ServiceType, self.service_type, "service type")
        self.kserve_mode = _enum(KServeMode, self.kserve_mode, "KServe deployment mode")
        for image in (self.image, self.locust_image, self.gateway_image):
            if image is not None:
                check_image(image)
                if self.require_digest and "@" not in image:
                    raise ManifestError(f"image {image!r} is not pinned by digest (NAME@sha256:...; require_digest)")
        self.repo_uri = RepositoryUri.parse(self.repository_uri)
        self._check_names()
        self._check_numbers()
        self._check_resources()
        self._check_autoscaling()
        self._check_identity()
        self._check_canary()

    def _check_canary(self) -> None:
        if self.canary_percent is None:
            return
        if not 0 <= self.canary_percent <= 100:
            raise ManifestError(f"canary percent must be in 0..100, got {self.canary_percent}")
        if not self.kserve or self.kserve_mode is not KServeMode.SERVERLESS:
            raise ManifestError("a canary (canaryTrafficPercent) needs the KServe InferenceService in Serverless "
                                "mode (--kserve-mode Serverless): KServe splits traffic between Knative revisions")

    def _check_names(self) -> None:
        if not _DNS_LABEL.match(self.name) or len(self.name) > 40:
            raise ManifestError(f"name {self.name!r} must be a DNS label (a-z, 0-9, '-'; starts with a letter) "
                                "of at most 40 characters")
        if not _DNS_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise ManifestError(f"namespace {self.namespace!r} must be a DNS label of at most 63 characters")
        for what, ns in (("ingress namespace", self.ingress_namespace),
                         ("monitoring namespace", self.monitoring_namespace)):
            if ns is not None and (not _DNS_LABEL.match(ns) or len(ns) > 63):
                raise ManifestError(f"{what} {ns!r} must be a DNS label of at most 63 characters")
        if self.gateway_image is not None and not _DNS_SUBDOMAIN.match(self.gateway_secret or ""):
            raise ManifestError(f"gateway secret {self.gateway_secret!r} is not a valid Secret name")
        if not _DNS_SUBDOMAIN.match(self.admin_secret or ""):
            raise ManifestError(f"admin secret {self.admin_secret!r} is not a valid Secret name")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.locust_user_class):
            raise ManifestError(f"locust user class {self.locust_user_class!r} is not a Python class name")

    def _check_numbers(self) -> None:
        for what, value in (("replicas", self.replicas), ("exit timeout", self.exit_timeout_s),
                            ("startup timeout", self.startup_timeout_s), ("target queue time", self.target_queue_us),
                            ("locust workers", self.locust_workers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ManifestError(f"{what} must be an integer >= 1 (got {value!r})")
        if not isinstance(self.gpus_per_pod, int) or self.gpus_per_pod < 0:
            raise ManifestError(f"gpus per pod must be an integer >= 0 (got {self.gpus_per_pod!r})")
        if self.gpus_per_pod == 0 and self.repository.target is Target.GPU:
            raise ManifestError("gpus per pod is 0 but the repository target is gpu (it runs on CUDA): "
                                "give --gpus-per-pod >= 1 or --target cpu")
        if self.pre_stop_sleep_s < 0 or self.log_verbose < 0:
            raise ManifestError("pre-stop sleep and log verbosity must be >= 0")
        ports = (self.http_port, self.grpc_port, self.metrics_port, self.gateway_port)
        if len(set(ports)) != 4 or not all(1024 <= p <= 65535 for p in ports):
            raise ManifestError(f"http/grpc/metrics/gateway ports must be distinct and in 1024-65535 (got {ports})")
        if self.gateway_image is not None and self.repo_uri.scheme is not RepositoryScheme.PVC:
            raise ManifestError("the gateway reads the repository's contracts and tokenizers from a volume: give a "
                                "pvc:// repository URI, or no --gateway-image")

    def _check_resources(self) -> None:
        if self.grace_period_s is None:
            self.grace_period_s = self.pre_stop_sleep_s + self.exit_timeout_s + 15
        if self.grace_period_s <= self.pre_stop_sleep_s + self.exit_timeout_s:
            raise ManifestError(
                f"termination grace period {self.grace_period_s}s must exceed the pre-stop sleep plus Triton's "
                f"--exit-timeout-secs ({self.pre_stop_sleep_s}+{self.exit_timeout_s}s), or in-flight requests are cut")
        # resources: /dev/shm (medium Memory) is charged to the container's memory limit
        self.shm_bytes = parse_quantity(self.shm_size, "shm size")
        self.memory_bytes = parse_quantity(self.memory, "memory")
        parse_quantity(self.tmp_size, "tmp size")
        parse_cpu(self.cpu)
        floor = estimate_shm_bytes(self.repository)
        if self.shm_bytes < floor:
            raise ManifestError(f"shm size {self.shm_size} is below {math.ceil(floor / 2**20)}Mi, the floor for "
                                f"{self.repository.instances} python-backend instance(s) at max_batch_size "
                                f"{self.repository.max_batch_size} x max_length {self.repository.max_length}")
        if self.memory_bytes <= self.shm_bytes:
            raise ManifestError(f"memory {self.memory} must exceed shm size {self.shm_size}: /dev/shm in memory "
                                "counts against the container's memory limit")

    def _check_autoscaling(self) -> None:
        if self.min_replicas is None:
            self.min_replicas = self.replicas
        if self.max_replicas is None:
            self.max_replicas = max(2 * self.min_replicas, self.replicas)
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ManifestError(f"replicas must satisfy 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        if self.autoscale and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ManifestError(f"replicas {self.replicas} must lie within min {self.min_replicas} and "
                                f"max {self.max_replicas}")
        queues = len(batched_models(self.repository.target))
        floor_us = queues * self.repository.max_queue_delay_us
        if self.autoscale and self.target_queue_us <= floor_us:
            raise ManifestError(
                f"target queue time {self.target_queue_us} us is not above the dynamic-batching floor of {floor_us} us "
                f"({queues} batched models x max_queue_delay_us {self.repository.max_queue_delay_us}): "
                "the HPA would scale to the maximum on an idle server")

    def _check_identity(self) -> None:
        if self.credentials_secret == "":
            self.credentials_secret = None
        if self.credentials_secret is not None and not _DNS_SUBDOMAIN.match(self.credentials_secret):
            raise ManifestError(f"credentials secret {self.credentials_secret!r} is not a valid Secret name")
        self.service_account_annotations = _parse_pairs(self.service_account_annotations, "annotation")
        self.node_selector = _parse_pairs(self.node_selector, "node selector")
        self.service_monitor_labels = _parse_pairs(self.service_monitor_labels, "label")
        for what, pairs, check_value in (("annotation", self.service_account_annotations, False),
                                         ("node selector", self.node_selector, True),
                                         ("label", self.service_monitor_labels, True)):
            for key, value in pairs.items():
                if not _LABEL_KEY.match(key) or (check_value and not _LABEL_VALUE.match(value)):
                    raise ManifestError(f"{what} {key}={value} is not a valid Kubernetes key/value")
        if not re.match(r"^https?://[^\s/]+$", self.prometheus_url):
            raise ManifestError(f"prometheus URL {self.prometheus_url!r} must be http(s)://HOST without a path")

    @property
    def service_host(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["repository"] = {k: (v.value if isinstance(v, enum.Enum) else v)
                              for k, v in dataclasses.asdict(self.repository).items()}
        return {k: (v.value if isinstance(v, enum.Enum) else v) for k, v in data.items()}


def _enum(cls: type[enum.Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(m.value for m in cls)
        raise ManifestError(f"{what} {value!r} is not one of {choices}") from None
