"""Values the manifests are made of: constants, enums, and parsers/checkers of user input."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from serving.errors import ServingError
from serving.repository import ENSEMBLE, RepositoryConfig, Target

DEFAULT_OUT = Path("build/k8s")
APP = "triton-textclf"
KUBERNETES_VERSION = "1.30"  # oldest minor the manifests are validated against (tests also check the newest)

# Triton's metrics (https://github.com/triton-inference-server/server/blob/main/docs/user_guide/metrics.md)
QUEUE_METRIC = "nv_inference_queue_duration_us"
SUCCESS_METRIC = "nv_inference_request_success"
HPA_METRIC = "triton_queue_us_per_request"
# models with a dynamic-batching queue; each can add up to max_queue_delay_us of queueing to a request
BATCHED_MODELS = (ENSEMBLE,)  # the one served model (both targets)


def batched_models(target: Target) -> tuple[str, ...]:
    """The models whose queues a request waits in: the one served model on either target."""
    Target(target)
    return BATCHED_MODELS

KSERVE_HTTP_PORT = 8080  # the kserve-tritonserver ClusterServingRuntime passes --http-port=8080
KSERVE_GRPC_PORT = 9000  # ... and --grpc-port=9000
KSERVE_RUNTIME = "kserve-tritonserver"
LOCUST_WEB_PORT = 8089
LOCUST_MASTER_PORT = 5557
NGC_ENTRYPOINT = "/opt/nvidia/nvidia_entrypoint.sh"  # in every NGC image; execs its arguments
TRITON_UID = 1000  # the NGC tritonserver image creates user triton-server with uid/gid 1000

GCS_KEY_DIR = "/var/secrets/google"
GCS_KEY_FILE = "key.json"
PVC_MOUNT = "/mnt/model-repository"

# the admin key of the restricted APIs: one key of a Secret the operator creates (docs/SECURITY.md)
ADMIN_SECRET_KEY = "admin-key"
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"  # the container env var; args reference it as $(TRITON_ADMIN_KEY)
# per-key secretKeyRef for S3 credentials: (env var = Secret key, optional)
S3_SECRET_KEYS = (("AWS_ACCESS_KEY_ID", False), ("AWS_SECRET_ACCESS_KEY", False),
                  ("AWS_DEFAULT_REGION", True), ("AWS_SESSION_TOKEN", True))
KSERVE_ISVC_LABEL = "serving.kserve.io/inferenceservice"  # KServe labels the predictor pods with it


class ManifestError(ServingError):
    """A manifest value is invalid (bad image reference, replica count, repository URI, quantity...)."""


class ServiceType(str, enum.Enum):
    """The Kubernetes Service type in front of tritonserver."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"


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


class RepositoryScheme(str, enum.Enum):
    """Where the cluster reads the model repository from (the URI scheme of ``--repository-uri``)."""

    S3 = "s3"
    GS = "gs"
    PVC = "pvc"


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

    Each python-backend instance (every instance of the one model, either target) maps its own region (python
    backend ``shm-default-byte-size``, 1 MiB by default) and grows it for the tensors of a batch in flight,
    counted as 3 INT64 [max_batch_size, max_length] tensors. Twice that, for input and output copies, is the
    floor we demand of ``--shm-size``.
    """
    instances = repo.instances
    batch_tensors = 3 * repo.max_batch_size * repo.max_length * 8
    return instances * 2 * (2**20 + batch_tensors)


class KServeMode(str, enum.Enum):
    """KServe's deployment mode of the InferenceService."""

    RAW = "RawDeployment"
    SERVERLESS = "Serverless"


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
