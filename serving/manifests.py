"""Kubernetes manifests for the GPU Triton deployment, rendered from one validated config.

``python -m serving manifests --image REGISTRY/IMAGE:TAG --repository-uri s3://bucket/repo --out DIR``
writes one YAML file per kind plus a ``kustomization.yaml`` (``kubectl apply -k DIR``):

- ``deployment.yaml``   the NGC-based tritonserver pods (GPU limits, /dev/shm in memory, probes, security)
- ``service.yaml``      ClusterIP Service (http 8000, grpc 8001, metrics 8002) + a headless one for gRPC
                        client-side balancing
- ``hpa.yaml``          autoscaling/v2 HPA on a Triton queue-time pods metric (via prometheus-adapter)
- ``pdb.yaml``, ``serviceaccount.yaml``, ``servicemonitor.yaml`` (prometheus-operator), ``namespace.yaml``
- ``prometheus-adapter/values.yaml``  helm values with the rule that makes the HPA's metric
- ``kserve/``           the KServe ``InferenceService`` alternative (apply instead of the above, not with it)
- ``locust/``           distributed Locust (master + workers) aimed at the Service, when ``--locust-image``
- ``render.json``       the config that rendered the files (provenance)

Manifests are Python dicts dumped with ``yaml.safe_dump``; nothing is a string template. Every object
comes from :class:`ManifestConfig`, whose ``__post_init__`` refuses bad values with :class:`ManifestError`.
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from serving.errors import ServingError
from serving.repository import ENCODER, ENSEMBLE, POSTPROCESS, TOKENIZER, RepositoryConfig, Target

log = logging.getLogger(__name__)

DEFAULT_OUT = Path("build/k8s")
APP = "triton-textclf"
KUBERNETES_VERSION = "1.30"  # oldest minor the manifests are validated against (tests also check the newest)

# Triton's metrics (https://github.com/triton-inference-server/server/blob/main/docs/user_guide/metrics.md)
QUEUE_METRIC = "nv_inference_queue_duration_us"
SUCCESS_METRIC = "nv_inference_request_success"
HPA_METRIC = "triton_queue_us_per_request"
# models with a dynamic-batching queue; each can add up to max_queue_delay_us of queueing to a request
BATCHED_MODELS = (TOKENIZER, ENCODER, POSTPROCESS)

KSERVE_HTTP_PORT = 8080  # the kserve-tritonserver ClusterServingRuntime passes --http-port=8080
KSERVE_RUNTIME = "kserve-tritonserver"
LOCUST_WEB_PORT = 8089
LOCUST_MASTER_PORT = 5557
NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"  # in every NGC image; execs its arguments
TRITON_UID = 1000  # the NGC tritonserver image creates user triton-server with uid/gid 1000

GCS_KEY_DIR = "/var/secrets/google"
GCS_KEY_FILE = "key.json"
PVC_MOUNT = "/mnt/model-repository"


class ManifestError(ServingError):
    """A manifest value is invalid (bad image reference, replica count, repository URI, quantity...)."""


class RepositoryScheme(str, enum.Enum):
    S3 = "s3"
    GS = "gs"
    PVC = "pvc"


class ServiceType(str, enum.Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


class KServeMode(str, enum.Enum):
    RAW = "RawDeployment"
    SERVERLESS = "Serverless"


# --------------------------------------------------------------------------------------------- values

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_HOST_PORT = re.compile(r"^[A-Za-z0-9.-]+:[0-9]{1,5}$")
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_CPU = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m)?$")
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SUFFIXES = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}

# The image reference grammar of distribution/reference (docker), without IPv6 hosts.
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$"
)


def parse_quantity(value: str, what: str = "quantity") -> int:
    """Bytes in a Kubernetes memory quantity (``1Gi``, ``512Mi``, ``2G``, ``1048576``)."""
    match = _QUANTITY.match(str(value).strip())
    if not match:
        raise ManifestError(f"{what} {value!r} is not a Kubernetes quantity like 1Gi, 512Mi or 2G")
    return int(float(match.group(1)) * _SUFFIXES[match.group(2)])


def parse_cpu(value: str) -> float:
    """Cores in a Kubernetes CPU quantity (``4``, ``500m``, ``1.5``)."""
    match = _CPU.match(str(value).strip())
    if not match or float(match.group(1)) <= 0:
        raise ManifestError(f"cpu {value!r} is not a positive CPU quantity like 4, 1.5 or 500m")
    return float(match.group(1)) / (1000 if match.group(2) else 1)


def check_image(image: str) -> str:
    """Validate a container image reference; it must pin a tag (not ``latest``) or a digest."""
    match = _IMAGE.match(image or "")
    first, slash, _ = (match.group("name") if match else "").partition("/")
    is_domain = slash and ("." in first or ":" in first or first == "localhost")
    if match and not is_domain and not re.fullmatch(_PATH_COMPONENT, first):
        match = None  # docker reads a first component without '.', ':' or localhost as a (lowercase) path
    if not match or len(match.group("name")) > 255:
        raise ManifestError(f"image {image!r} is not a valid image reference (REGISTRY/NAME:TAG or NAME@sha256:...)")
    if not match.group("tag") and not match.group("digest"):
        raise ManifestError(f"image {image!r} has no tag: pin a version tag or a digest (not the implicit latest)")
    if match.group("tag") == "latest" and not match.group("digest"):
        raise ManifestError(f"image {image!r} uses the 'latest' tag: pin a version tag or a digest")
    return image


@dataclass(frozen=True)
class RepositoryUri:
    """Where the pods read the Triton model repository from.

    ``s3://bucket/path`` (also Triton's ``s3://[https://]host:port/bucket/path`` form for MinIO and other
    S3-compatible stores), ``gs://bucket/path`` (Triton reads both directly), or ``pvc://CLAIM/path``: a
    PersistentVolumeClaim mounted read-only.
    """

    scheme: RepositoryScheme
    location: str  # bucket, or claim name
    path: str  # inside the bucket or the volume, no leading/trailing slash ('' for the root)
    endpoint: str = ""  # s3 only: 'host:port' or 'https://host:port' of an S3-compatible store

    @classmethod
    def parse(cls, uri: str) -> "RepositoryUri":
        uri = (uri or "").strip()
        scheme, sep, rest = uri.partition("://")
        if not sep or scheme not in {s.value for s in RepositoryScheme}:
            raise ManifestError(
                f"repository URI {uri!r} must start with s3://, gs:// or pvc:// (got scheme {scheme!r})"
                if sep else f"repository URI {uri!r} must be s3://BUCKET/PATH, gs://BUCKET/PATH or pvc://CLAIM/PATH")
        if any(c.isspace() for c in rest) or "?" in rest or "#" in rest:
            raise ManifestError(f"repository URI {uri!r} has spaces, '?' or '#'")
        endpoint = ""
        if scheme == "s3":
            https = rest.startswith("https://")
            if https:
                rest = rest[len("https://"):]
            first = rest.split("/", 1)[0]
            if _HOST_PORT.match(first):
                endpoint = ("https://" if https else "") + first
                rest = rest[len(first) + 1:] if "/" in rest else ""
            elif https:
                raise ManifestError(f"repository URI {uri!r}: s3://https:// must be followed by HOST:PORT/BUCKET")
        location, _, path = rest.partition("/")
        parts = [p for p in path.split("/") if p]
        if any(p in {".", ".."} for p in parts):
            raise ManifestError(f"repository URI {uri!r} must not contain '.' or '..' path segments")
        pattern = {"s3": _S3_BUCKET, "gs": _GCS_BUCKET, "pvc": _DNS_SUBDOMAIN}[scheme]
        if not location or not pattern.match(location) or len(location) > 253:
            kind = "PersistentVolumeClaim name" if scheme == "pvc" else "bucket name"
            raise ManifestError(f"repository URI {uri!r}: {location!r} is not a valid {kind}")
        return cls(RepositoryScheme(scheme), location, "/".join(parts), endpoint)

    @property
    def uri(self) -> str:
        """The URI in the form a user writes it (and KServe's storageUri takes it)."""
        host = f"{self.endpoint}/" if self.endpoint else ""
        return f"{self.scheme.value}://{host}{self.location}" + (f"/{self.path}" if self.path else "")

    @property
    def triton_path(self) -> str:
        """What ``tritonserver --model-repository=`` gets inside the pod."""
        if self.scheme is RepositoryScheme.PVC:
            return PVC_MOUNT + (f"/{self.path}" if self.path else "")
        return self.uri

    @property
    def kserve_uri(self) -> str:
        """KServe's storageUri: it has no host:port form for S3 (the endpoint goes on the credentials)."""
        if self.scheme is RepositoryScheme.S3:
            return f"s3://{self.location}" + (f"/{self.path}" if self.path else "")
        return self.uri


def estimate_shm_bytes(repo: RepositoryConfig) -> int:
    """A floor for /dev/shm: python-backend stubs each map a region and move whole batches through it.

    Each python-backend instance (tokenizer, postprocess, and on the cpu target the encoder) maps its own
    region (python backend ``shm-default-byte-size``, 1 MiB by default) and grows it for the tensors of a
    batch in flight: tokenizer outputs are 3 INT64 [max_batch_size, max_length] tensors. Twice that, for
    input and output copies, is the floor we demand of ``--shm-size``.
    """
    instances = repo.tokenizer_instances + 1 + (repo.encoder_instances if repo.target is Target.CPU else 0)
    batch_tensors = 3 * repo.max_batch_size * repo.max_length * 8
    return instances * 2 * (2**20 + batch_tensors)


def _parse_pairs(values: Iterable[str] | Mapping[str, str], what: str) -> dict[str, str]:
    if isinstance(values, Mapping):
        pairs = dict(values)
    else:
        pairs = {}
        for item in values:
            key, sep, value = item.partition("=")
            if not sep:
                raise ManifestError(f"{what} {item!r} must be KEY=VALUE")
            pairs[key] = value
    return pairs


# --------------------------------------------------------------------------------------------- config

@dataclass
class ManifestConfig:
    """Every value the rendered manifests depend on. Validated in ``__post_init__``."""

    image: str
    repository_uri: str
    replicas: int = 1
    name: str = "triton"
    namespace: str = "triton"
    create_namespace: bool = True
    gpus_per_pod: int = 1
    shm_size: str = "1Gi"
    tmp_size: str = "8Gi"  # emptyDir for /tmp: Triton copies s3/gs repositories here
    cpu: str = "4"
    memory: str = "16Gi"
    # autoscaling (autoscaling/v2 HPA on the prometheus-adapter metric HPA_METRIC)
    autoscale: bool = True
    min_replicas: int | None = None  # default: replicas
    max_replicas: int | None = None  # default: 2 x min_replicas
    target_queue_us: int = 20_000
    # Triton and the pod lifecycle
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    exit_timeout_s: int = 30
    pre_stop_sleep_s: int = 5
    grace_period_s: int | None = None  # default: pre_stop_sleep_s + exit_timeout_s + 15
    startup_timeout_s: int = 900
    log_verbose: int = 0
    # exposure, identity, scheduling
    service_type: ServiceType = ServiceType.CLUSTER_IP
    credentials_secret: str | None = "triton-repository-credentials"
    service_account_annotations: dict[str, str] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    read_only_root_fs: bool = True
    # monitoring
    service_monitor: bool = True
    service_monitor_labels: dict[str, str] = field(default_factory=dict)
    prometheus_url: str = "http://prometheus-operated.monitoring.svc"
    prometheus_port: int = 9090
    # alternatives and extras
    kserve: bool = True
    kserve_mode: KServeMode = KServeMode.RAW
    locust_image: str | None = None
    locust_workers: int = 2
    locust_user_class: str = "TritonHttpUser"
    repository: RepositoryConfig = field(default_factory=lambda: RepositoryConfig(target=Target.GPU))

    def __post_init__(self) -> None:
        self.service_type = _enum(ServiceType, self.service_type, "service type")
        self.kserve_mode = _enum(KServeMode, self.kserve_mode, "KServe deployment mode")
        check_image(self.image)
        self.repo_uri = RepositoryUri.parse(self.repository_uri)
        if not _DNS_LABEL.match(self.name) or len(self.name) > 40:
            raise ManifestError(f"name {self.name!r} must be a DNS label (a-z, 0-9, '-'; starts with a letter) "
                                "of at most 40 characters")
        if not _DNS_LABEL.match(self.namespace) or len(self.namespace) > 63:
            raise ManifestError(f"namespace {self.namespace!r} must be a DNS label of at most 63 characters")
        for what, value in (("replicas", self.replicas), ("exit timeout", self.exit_timeout_s),
                            ("startup timeout", self.startup_timeout_s), ("target queue time", self.target_queue_us),
                            ("locust workers", self.locust_workers)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ManifestError(f"{what} must be an integer >= 1 (got {value!r})")
        if not isinstance(self.gpus_per_pod, int) or self.gpus_per_pod < 0:
            raise ManifestError(f"gpus per pod must be an integer >= 0 (got {self.gpus_per_pod!r})")
        if self.gpus_per_pod == 0 and self.repository.target is Target.GPU:
            raise ManifestError("gpus per pod is 0 but the repository target is gpu (its encoder is KIND_GPU): "
                                "give --gpus-per-pod >= 1 or --target cpu")
        if self.pre_stop_sleep_s < 0 or self.log_verbose < 0:
            raise ManifestError("pre-stop sleep and log verbosity must be >= 0")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if len(set(ports)) != 3 or not all(1024 <= p <= 65535 for p in ports):
            raise ManifestError(f"http/grpc/metrics ports must be distinct and in 1024-65535 (got {ports})")
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
                                f"{self.repository.tokenizer_instances} tokenizer instance(s) at max_batch_size "
                                f"{self.repository.max_batch_size} x max_length {self.repository.max_length}")
        if self.memory_bytes <= self.shm_bytes:
            raise ManifestError(f"memory {self.memory} must exceed shm size {self.shm_size}: /dev/shm in memory "
                                "counts against the container's memory limit")
        # autoscaling
        if self.min_replicas is None:
            self.min_replicas = self.replicas
        if self.max_replicas is None:
            self.max_replicas = max(2 * self.min_replicas, self.replicas)
        if self.min_replicas < 1 or self.max_replicas < self.min_replicas:
            raise ManifestError(f"replicas must satisfy 1 <= min ({self.min_replicas}) <= max ({self.max_replicas})")
        if self.autoscale and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise ManifestError(f"replicas {self.replicas} must lie within min {self.min_replicas} and "
                                f"max {self.max_replicas}")
        floor_us = len(BATCHED_MODELS) * self.repository.max_queue_delay_us
        if self.autoscale and self.target_queue_us <= floor_us:
            raise ManifestError(
                f"target queue time {self.target_queue_us} us is not above the dynamic-batching floor of {floor_us} us "
                f"({len(BATCHED_MODELS)} batched models x max_queue_delay_us {self.repository.max_queue_delay_us}): "
                "the HPA would scale to the maximum on an idle server")
        # identity and labels
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
        if self.locust_image is not None:
            check_image(self.locust_image)
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.locust_user_class):
            raise ManifestError(f"locust user class {self.locust_user_class!r} is not a Python class name")

    # derived names
    @property
    def headless_name(self) -> str:
        return f"{self.name}-headless"

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


# --------------------------------------------------------------------------------------------- objects

def _labels(config: ManifestConfig, component: str = "inference-server") -> dict[str, str]:
    return {**_selector(config), "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": APP,
            "app.kubernetes.io/managed-by": "serving.manifests"}


def _selector(config: ManifestConfig) -> dict[str, str]:
    return {"app.kubernetes.io/name": "tritonserver", "app.kubernetes.io/instance": config.name}


def _meta(config: ManifestConfig, name: str, component: str = "inference-server", **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": config.namespace, "labels": _labels(config, component), **extra}


def triton_args(config: ManifestConfig) -> list[str]:
    """tritonserver's command line inside the pod (every flag the probes and Services rely on is explicit)."""
    args = [
        "tritonserver",
        f"--model-repository={config.repo_uri.triton_path}",
        "--model-control-mode=none",
        "--strict-readiness=true",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        f"--http-port={config.http_port}",
        f"--grpc-port={config.grpc_port}",
        f"--metrics-port={config.metrics_port}",
        "--allow-metrics=true",
        f"--allow-gpu-metrics={'true' if config.gpus_per_pod else 'false'}",
        f"--log-verbose={config.log_verbose}",
    ]
    return args


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


def _credentials(config: ManifestConfig) -> tuple[list[dict], list[dict], list[dict], list[dict]]:
    """(env, envFrom, volumes, volumeMounts) that give Triton access to the repository."""
    env: list[dict] = []
    env_from: list[dict] = []
    volumes: list[dict] = []
    mounts: list[dict] = []
    uri = config.repo_uri
    if uri.scheme is RepositoryScheme.PVC:
        volumes.append({"name": "model-repository",
                        "persistentVolumeClaim": {"claimName": uri.location, "readOnly": True}})
        mounts.append({"name": "model-repository", "mountPath": PVC_MOUNT, "readOnly": True})
    elif config.credentials_secret and uri.scheme is RepositoryScheme.S3:
        # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION (and AWS_SESSION_TOKEN)
        env_from.append({"secretRef": {"name": config.credentials_secret}})
    elif config.credentials_secret and uri.scheme is RepositoryScheme.GS:
        volumes.append({"name": "gcs-credentials", "secret": {"secretName": config.credentials_secret,
                                                              "items": [{"key": GCS_KEY_FILE, "path": GCS_KEY_FILE}]}})
        mounts.append({"name": "gcs-credentials", "mountPath": GCS_KEY_DIR, "readOnly": True})
        env.append({"name": "GOOGLE_APPLICATION_CREDENTIALS", "value": f"{GCS_KEY_DIR}/{GCS_KEY_FILE}"})
    return env, env_from, volumes, mounts


def _probe(path: str, port: str | int, period: int, failures: int, timeout: int = 5) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": timeout,
            "failureThreshold": failures, "successThreshold": 1}


def deployment(config: ManifestConfig) -> dict[str, Any]:
    env, env_from, cred_volumes, cred_mounts = _credentials(config)
    env = [{"name": "HOME", "value": "/tmp"}, *env]
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
        "env": env,
        "resources": _resources(config),
        # Triton starts its endpoints only after every model loaded (model-control-mode none): the startup
        # probe gives the repository download, the ONNX Runtime session build (and TensorRT) time to finish.
        "startupProbe": _probe("/v2/health/live", "http", 10, math.ceil(config.startup_timeout_s / 10)),
        "livenessProbe": _probe("/v2/health/live", "http", 10, 3),
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
    if env_from:
        container["envFrom"] = env_from
    container = {k: v for k, v in container.items() if v is not None}
    pod_spec: dict[str, Any] = {
        "serviceAccountName": config.name,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": config.grace_period_s,
        "securityContext": _pod_security_context(),
        "containers": [container],
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
    if config.gpus_per_pod:
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if config.node_selector:
        pod_spec["nodeSelector"] = dict(config.node_selector)
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
            "spec": pod_spec,
        },
    }
    if not config.autoscale:
        spec = {"replicas": config.replicas, **spec}
    # With an HPA, spec.replicas stays out of the manifest (Kubernetes' advice): a re-apply would reset it.
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(config, config.name), "spec": spec}


def services(config: ManifestConfig) -> list[dict[str, Any]]:
    ports = [
        {"name": "http", "port": config.http_port, "targetPort": "http", "protocol": "TCP"},
        {"name": "grpc", "port": config.grpc_port, "targetPort": "grpc", "protocol": "TCP"},
        {"name": "metrics", "port": config.metrics_port, "targetPort": "metrics", "protocol": "TCP"},
    ]
    main = {"apiVersion": "v1", "kind": "Service", "metadata": _meta(config, config.name),
            "spec": {"type": config.service_type.value, "selector": _selector(config), "ports": ports}}
    # gRPC keeps one HTTP/2 connection per client: a ClusterIP balances connections, not requests. The
    # headless Service gives clients (dns:/// resolver + round_robin) or a mesh every pod's address.
    headless = {"apiVersion": "v1", "kind": "Service",
                "metadata": _meta(config, config.headless_name, component="inference-server-headless"),
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

    Queue time is summed over the batched composing models (the ensemble itself is left out so nothing is
    counted twice) and divided by the ensemble's successful requests.
    """
    matchers = "<<.LabelMatchers>>"
    query = (
        f"sum by (<<.GroupBy>>) (rate({QUEUE_METRIC}{{{matchers},model!=\"{ENSEMBLE}\"}}[1m]))"
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


def inference_service(config: ManifestConfig) -> dict[str, Any]:
    """The KServe alternative: an InferenceService on the kserve-tritonserver runtime with our image.

    KServe's storage initializer copies ``storageUri`` to /mnt/models and the runtime starts
    ``tritonserver --model-store=/mnt/models --http-port=8080 --grpc-port=9000``; KServe appends the
    ``args`` below to the runtime's and lets ``image`` replace the runtime image (NGC + tokenizers).
    """
    args = [
        "--model-control-mode=none",
        "--strict-readiness=true",
        f"--exit-timeout-secs={config.exit_timeout_s}",
        f"--metrics-port={config.metrics_port}",
        "--allow-metrics=true",
        f"--log-verbose={config.log_verbose}",
    ]
    model: dict[str, Any] = {
        "modelFormat": {"name": "triton"},
        "runtime": KSERVE_RUNTIME,
        "storageUri": config.repo_uri.kserve_uri,
        "image": config.image,
        # the runtime's args start with "tritonserver" (written for the NGC entrypoint, which execs them);
        # serving/docker/Dockerfile replaces that ENTRYPOINT, so name it again
        "command": [NGC_ENTRYPOINT],
        "args": args,
        "env": [{"name": "HOME", "value": "/tmp"}],
        "resources": _resources(config),
        "readinessProbe": _probe("/v2/health/ready", KSERVE_HTTP_PORT, 5, 3, timeout=3),
        "livenessProbe": _probe("/v2/health/live", KSERVE_HTTP_PORT, 10, 3),
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
    if config.repo_uri.scheme is not RepositoryScheme.PVC and config.credentials_secret:
        predictor["serviceAccountName"] = f"{config.name}-kserve"
    if config.gpus_per_pod:
        predictor["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    if config.node_selector:
        predictor["nodeSelector"] = dict(config.node_selector)
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


def locust_objects(config: ManifestConfig) -> list[dict[str, Any]]:
    """Distributed Locust in the cluster: one master (web UI) and N workers, aimed at the Service."""
    assert config.locust_image is not None
    host = (f"grpc://{config.service_host}:{config.grpc_port}" if "Grpc" in config.locust_user_class
            else f"http://{config.service_host}:{config.http_port}")
    sel_master = {"app.kubernetes.io/name": "locust", "app.kubernetes.io/instance": f"{config.name}-locust",
                  "app.kubernetes.io/component": "master"}
    sel_worker = {**sel_master, "app.kubernetes.io/component": "worker"}
    common_env = [{"name": "LOCUST_LOCUSTFILE", "value": "/app/loadtest/locustfile.py"},
                  {"name": "HOME", "value": "/tmp"}]

    def container(name: str, args: list[str], ports: list[dict]) -> dict[str, Any]:
        c = {"name": name, "image": config.locust_image, "imagePullPolicy": "IfNotPresent", "args": args,
             "env": list(common_env), "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                                                    "limits": {"cpu": "1", "memory": "1Gi"}},
             "securityContext": {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                                 "runAsNonRoot": True, "runAsUser": 1000, "capabilities": {"drop": ["ALL"]}},
             "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}]}
        if ports:
            c["ports"] = ports
        return c

    def deploy(name: str, replicas: int, selector: dict, c: dict) -> dict[str, Any]:
        return {"apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": name, "namespace": config.namespace, "labels": dict(selector)},
                "spec": {"replicas": replicas, "selector": {"matchLabels": dict(selector)},
                         "template": {"metadata": {"labels": dict(selector)},
                                      "spec": {"automountServiceAccountToken": False,
                                               "securityContext": {"runAsNonRoot": True,
                                                                   "seccompProfile": {"type": "RuntimeDefault"}},
                                               "containers": [c],
                                               "volumes": [{"name": "tmp", "emptyDir": {}}]}}}}

    master_name = f"{config.name}-locust-master"
    master = deploy(master_name, 1, sel_master, container(
        "locust", ["--master", f"--host={host}", f"--master-bind-port={LOCUST_MASTER_PORT}",
                   f"--expect-workers={config.locust_workers}", config.locust_user_class],
        [{"name": "web", "containerPort": LOCUST_WEB_PORT}, {"name": "master", "containerPort": LOCUST_MASTER_PORT}]))
    workers = deploy(f"{config.name}-locust-worker", config.locust_workers, sel_worker, container(
        "locust", ["--worker", f"--master-host={master_name}", f"--master-port={LOCUST_MASTER_PORT}",
                   config.locust_user_class], []))
    service = {"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": master_name, "namespace": config.namespace, "labels": dict(sel_master)},
               "spec": {"selector": dict(sel_master), "ports": [
                   {"name": "web", "port": LOCUST_WEB_PORT, "targetPort": "web"},
                   {"name": "master", "port": LOCUST_MASTER_PORT, "targetPort": "master"}]}}
    return [master, workers, service]


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
    if config.autoscale:
        files["hpa.yaml"] = [hpa(config)]
    if config.service_monitor:
        files["servicemonitor.yaml"] = [service_monitor(config)]
    files["kustomization.yaml"] = [_kustomization(list(files))]
    if config.autoscale:
        files["prometheus-adapter/values.yaml"] = [adapter_values(config)]
    if config.kserve:
        kserve = {"kserve/inferenceservice.yaml": [inference_service(config)]}
        if "serviceAccountName" in kserve["kserve/inferenceservice.yaml"][0]["spec"]["predictor"]:
            kserve["kserve/serviceaccount.yaml"] = [kserve_service_account(config)]
        resources = [Path(p).name for p in kserve]
        if "namespace.yaml" in files:
            kserve["kserve/namespace.yaml"] = files["namespace.yaml"]
            resources.insert(0, "namespace.yaml")
        kserve["kserve/kustomization.yaml"] = [_kustomization(resources)]
        files.update(kserve)
    if config.locust_image:
        files["locust/locust.yaml"] = locust_objects(config)
        files["locust/kustomization.yaml"] = [_kustomization(["locust.yaml"])]
    return files


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


# --------------------------------------------------------------------------------------------- validation

SCHEMA_DIR = Path(__file__).parent / "deploy" / "k8s" / "schemas"
_CRD_SCHEMAS = {
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor.json",
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


# --------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m serving manifests``."""
    defaults = ManifestConfig.__dataclass_fields__
    parser.add_argument("--image", required=True,
                        help="image built from serving/docker/Dockerfile, REGISTRY/NAME:TAG or @sha256 digest")
    parser.add_argument("--repository-uri", required=True,
                        help="s3://BUCKET/PATH (or s3://[https://]HOST:PORT/BUCKET/PATH), gs://BUCKET/PATH, "
                             "or pvc://CLAIM/PATH (mounted read-only)")
    parser.add_argument("--replicas", type=int, default=1,
                        help="pods (with autoscaling: the default --min-replicas) (default 1)")
    parser.add_argument("--name", default="triton", help="name of the Deployment, Service, HPA... (default triton)")
    parser.add_argument("--namespace", default="triton", help="namespace (default triton)")
    parser.add_argument("--no-namespace-object", dest="create_namespace", action="store_false",
                        help="do not render a Namespace object (the namespace exists already)")
    parser.add_argument("--gpus-per-pod", type=int, default=1, help="nvidia.com/gpu limit per pod (default 1)")
    parser.add_argument("--shm-size", default="1Gi", help="sizeLimit of the in-memory /dev/shm (default 1Gi)")
    parser.add_argument("--tmp-size", default=defaults["tmp_size"].default,
                        help="sizeLimit of /tmp, where Triton copies an s3/gs repository (default 8Gi)")
    parser.add_argument("--cpu", default=defaults["cpu"].default, help="CPU request = limit per pod (default 4)")
    parser.add_argument("--memory", default=defaults["memory"].default,
                        help="memory request = limit per pod, /dev/shm included (default 16Gi)")
    parser.add_argument("--no-autoscale", dest="autoscale", action="store_false",
                        help="fixed --replicas, no HorizontalPodAutoscaler")
    parser.add_argument("--min-replicas", type=int, default=None, help="HPA minimum (default --replicas)")
    parser.add_argument("--max-replicas", type=int, default=None, help="HPA maximum (default 2 x minimum)")
    parser.add_argument("--target-queue-us", type=int, default=defaults["target_queue_us"].default,
                        help="HPA target: mean Triton queue time per request in us, per pod (default 20000)")
    parser.add_argument("--exit-timeout-secs", dest="exit_timeout_s", type=int,
                        default=defaults["exit_timeout_s"].default,
                        help="Triton's --exit-timeout-secs; the grace period is longer (default 30)")
    parser.add_argument("--startup-timeout", dest="startup_timeout_s", type=int,
                        default=defaults["startup_timeout_s"].default,
                        help="seconds the startup probe allows for downloading and loading models (default 900)")
    parser.add_argument("--service-type", default="ClusterIP", choices=[s.value for s in ServiceType])
    parser.add_argument("--credentials-secret", default=defaults["credentials_secret"].default,
                        help="Secret with the object-store credentials ('' for none: workload identity/IRSA)")
    parser.add_argument("--service-account-annotation", action="append", default=[], metavar="KEY=VALUE",
                        help="annotation on the ServiceAccount, e.g. eks.amazonaws.com/role-arn=arn:... (repeat)")
    parser.add_argument("--node-selector", action="append", default=[], metavar="KEY=VALUE",
                        help="node selector for the pods (repeat)")
    parser.add_argument("--writable-root-fs", dest="read_only_root_fs", action="store_false",
                        help="do not make the container's root filesystem read-only")
    parser.add_argument("--no-service-monitor", dest="service_monitor", action="store_false",
                        help="no ServiceMonitor (no prometheus-operator in the cluster; pods keep scrape annotations)")
    parser.add_argument("--service-monitor-label", action="append", default=[], metavar="KEY=VALUE",
                        help="label the Prometheus' serviceMonitorSelector wants, e.g. release=kube-prometheus-stack")
    parser.add_argument("--prometheus-url", default=defaults["prometheus_url"].default,
                        help="Prometheus for prometheus-adapter (default http://prometheus-operated.monitoring.svc)")
    parser.add_argument("--no-kserve", dest="kserve", action="store_false", help="no KServe InferenceService")
    parser.add_argument("--kserve-mode", default=KServeMode.RAW.value, choices=[m.value for m in KServeMode])
    parser.add_argument("--locust-image", default=None,
                        help="image from serving/deploy/k8s/locust.Dockerfile: renders distributed Locust in locust/")
    parser.add_argument("--locust-workers", type=int, default=defaults["locust_workers"].default)
    parser.add_argument("--locust-user-class", default=defaults["locust_user_class"].default,
                        help="TritonHttpUser or TritonGrpcUser (default TritonHttpUser)")
    parser.add_argument("--target", default=Target.GPU.value, choices=[t.value for t in Target],
                        help="repository target the image serves (default gpu)")
    parser.add_argument("--max-batch-size", type=int, default=RepositoryConfig.max_batch_size,
                        help="the repository's max_batch_size (sizes the /dev/shm floor)")
    parser.add_argument("--max-length", type=int, default=RepositoryConfig.max_length,
                        help="the repository's max_length (sizes the /dev/shm floor)")
    parser.add_argument("--tokenizer-instances", type=int, default=RepositoryConfig.tokenizer_instances)
    parser.add_argument("--validate", action="store_true",
                        help=f"also validate every object offline (kubernetes-validate, Kubernetes {KUBERNETES_VERSION})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")


def config_from_args(args: argparse.Namespace) -> ManifestConfig:
    from serving.errors import RepositoryError

    try:
        repository = RepositoryConfig(target=Target(args.target), max_batch_size=args.max_batch_size,
                                      max_length=args.max_length, tokenizer_instances=args.tokenizer_instances)
    except RepositoryError as exc:
        raise ManifestError(str(exc)) from None
    return ManifestConfig(
        image=args.image, repository_uri=args.repository_uri, replicas=args.replicas, name=args.name,
        namespace=args.namespace, create_namespace=args.create_namespace, gpus_per_pod=args.gpus_per_pod,
        shm_size=args.shm_size, tmp_size=args.tmp_size, cpu=args.cpu, memory=args.memory,
        autoscale=args.autoscale, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        target_queue_us=args.target_queue_us, exit_timeout_s=args.exit_timeout_s,
        startup_timeout_s=args.startup_timeout_s, service_type=args.service_type,
        credentials_secret=args.credentials_secret, service_account_annotations=args.service_account_annotation,
        node_selector=args.node_selector, read_only_root_fs=args.read_only_root_fs,
        service_monitor=args.service_monitor, service_monitor_labels=args.service_monitor_label,
        prometheus_url=args.prometheus_url, kserve=args.kserve, kserve_mode=args.kserve_mode,
        locust_image=args.locust_image, locust_workers=args.locust_workers,
        locust_user_class=args.locust_user_class, repository=repository,
    )


def run(args: argparse.Namespace) -> int:
    """Body of ``python -m serving manifests``: validate, (optionally) schema-check, write, print a table."""
    config = config_from_args(args)
    files = render_manifests(config)
    if args.validate:
        problems = validate_manifests(files)
        if problems:
            raise ManifestError(f"{len(problems)} invalid object(s); first: {problems[0]}")
    write_manifests(config, args.out)
    lines = ["| file | objects |", "| --- | --- |"]
    for rel, docs in files.items():
        lines.append(f"| {rel} | {', '.join(d.get('kind', 'values') + '/' + d.get('metadata', {}).get('name', '-') for d in docs)} |")
    print("\n".join(lines))
    print(f"\nwrote {args.out}/ ; apply with: kubectl apply -k {args.out}"
          + (f"   (or the KServe alternative: kubectl apply -k {args.out}/kserve)" if config.kserve else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry for tests (``python -m serving manifests`` is the public one)."""
    from common.cli import run_cli, setup_logging

    parser = argparse.ArgumentParser(prog="python -m serving manifests", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    setup_logging()
    return run_cli(lambda: run(args), user_errors=(ServingError,), prog="python -m serving manifests")
