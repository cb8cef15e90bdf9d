"""One builder of tritonserver's command line, used by the local server, the Kubernetes Deployment, the
KServe InferenceService and the Docker image (modelled on PyTriton's ``TritonServerConfig``).

:class:`TritonServerConfig` is an allow-list: each field is one tritonserver flag, ``None`` leaves the
flag out (so KServe's runtime can own ``--model-repository`` and the ports). An admin key turns on the
restricted APIs (Triton >= 2.41 syntax ``--http-restricted-api=<apis>:<header>=<value>``, the same for
``--grpc-restricted-protocol``): shared memory, model repository, logging, trace and statistics answer
403 (HTTP) / UNAVAILABLE (gRPC, measured on 2.51) to a client without the header. Inference, health,
metadata and model config stay open.

This module imports only the standard library: the Docker image copies it and runs it as its entrypoint
(``python3 triton_args.py exec``), which reads the key from ``TRITON_ADMIN_KEY`` (or the file named by
``TRITON_ADMIN_KEY_FILE``) and execs tritonserver.
"""
from __future__ import annotations

import os
import re
import secrets
import sys
from dataclasses import dataclass, fields

RESTRICTED_APIS = ("shared-memory", "model-repository", "logging", "trace", "statistics")
ADMIN_HEADER = "triton-admin-key"
ADMIN_KEY_ENV = "TRITON_ADMIN_KEY"
ADMIN_KEY_FILE_ENV = "TRITON_ADMIN_KEY_FILE"
# Triton's gRPC server looks for the metadata key "triton-grpc-protocol-<header>" (measured on 2.51)
GRPC_HEADER_PREFIX = "triton-grpc-protocol-"
MIN_KEY_CHARS = 16
_KEY = re.compile(r"^[A-Za-z0-9._~-]+$")
_K8S_REF = re.compile(r"^\$\([A-Za-z_][A-Za-z0-9_]*\)$")  # $(VAR): expanded by the kubelet
_HEADER = re.compile(r"^[a-z][a-z0-9-]*$")
_APIS = ("health", "metadata", "inference", "shared-memory", "model-config", "model-repository",
         "statistics", "trace", "logging")


class TritonArgsError(ValueError):
    """A tritonserver argument is invalid (bad admin key, header or API name)."""


def check_admin_key(key: str) -> str:
    """A key of >= 16 URL-safe characters, or a Kubernetes ``$(VAR)`` reference to one."""
    if _K8S_REF.match(key):
        return key
    if len(key) < MIN_KEY_CHARS or not _KEY.match(key):
        raise TritonArgsError(f"admin key must be at least {MIN_KEY_CHARS} characters of A-Z a-z 0-9 . _ ~ - "
                              f"(got {len(key)} characters)")
    return key


def new_admin_key() -> str:
    """A random key (256 bits) for a server whose owner gave none: the admin surface is closed anyway."""
    return secrets.token_urlsafe(32)


def grpc_admin_header(header: str = ADMIN_HEADER) -> str:
    """The gRPC metadata key a client sends the admin key under."""
    return GRPC_HEADER_PREFIX + header


@dataclass
class TritonServerConfig:
    """tritonserver flags; ``None`` omits a flag. Field ``foo_bar`` is flag ``--foo-bar``."""

    model_repository: str | None = None
    backend_directory: str | None = None
    model_control_mode: str | None = "none"
    load_model: str | None = None  # explicit mode: the models loaded at start ("*": every model)
    strict_readiness: bool | None = True
    exit_on_error: bool | None = None
    exit_timeout_secs: int | None = None
    http_address: str | None = None
    http_port: int | None = None
    grpc_address: str | None = None
    grpc_port: int | None = None
    allow_metrics: bool | None = True
    allow_gpu_metrics: bool | None = None
    metrics_address: str | None = None
    metrics_port: int | None = None
    # latency summaries (p50/p90/p95/p99 per model: nv_inference_{request,queue,compute_*}_summary_us) for the
    # dashboard and the p99 alert (docs/METRICS.md); one --metrics-config flag per setting
    metrics_config: tuple[str, ...] | None = ("summary_latencies=true",)
    log_verbose: int | None = None
    # restricted admin APIs: the key (or a $(VAR) reference), the header and the APIs (not a tritonserver flag)
    admin_key: str | None = None
    admin_header: str = ADMIN_HEADER
    restricted_apis: tuple[str, ...] = RESTRICTED_APIS

    _NOT_FLAGS = ("admin_key", "admin_header", "restricted_apis")

    def __post_init__(self) -> None:
        if self.admin_key is not None:
            check_admin_key(self.admin_key)
        if not _HEADER.match(self.admin_header):
            raise TritonArgsError(f"admin header {self.admin_header!r} must be lower-case letters, digits and '-'")
        unknown = [a for a in self.restricted_apis if a not in _APIS]
        if unknown or not self.restricted_apis:
            raise TritonArgsError(f"restricted APIs must be a non-empty subset of {list(_APIS)} (got {unknown})")

    def restriction(self) -> str | None:
        """``<apis>:<header>=<key>``, the value of both restriction flags; None without a key."""
        if self.admin_key is None:
            return None
        return f"{','.join(self.restricted_apis)}:{self.admin_header}={self.admin_key}"

    def to_args_list(self) -> list[str]:
        """The flags, in field order, then the two restriction flags."""
        args = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in self._NOT_FLAGS or value is None:
                continue
            if isinstance(value, tuple):
                args += [f"--{f.name.replace('_', '-')}={item}" for item in value]
                continue
            text = str(value).lower() if isinstance(value, bool) else str(value)
            args.append(f"--{f.name.replace('_', '-')}={text}")
        restriction = self.restriction()
        if restriction is not None:
            args += [f"--http-restricted-api={restriction}", f"--grpc-restricted-protocol={restriction}"]
        return args


def key_from_environment(environ: dict[str, str] | None = None) -> str | None:
    """``TRITON_ADMIN_KEY``, else the contents of the file ``TRITON_ADMIN_KEY_FILE`` names, else None."""
    env = os.environ if environ is None else environ
    if env.get(ADMIN_KEY_ENV):
        return env[ADMIN_KEY_ENV].strip()
    path = env.get(ADMIN_KEY_FILE_ENV)
    if path:
        with open(path, encoding="utf-8") as fh:
            return fh.read().strip()
    return None


# The image's tritonserver: what serving/docker/Dockerfile runs (the repository is mounted at /models).
IMAGE_REPOSITORY = "/models"
IMAGE_EXIT_TIMEOUT_S = 30


def image_command(key: str, extra: list[str]) -> list[str]:
    """The command line of the Docker image's server (NGC entrypoint + tritonserver + flags)."""
    config = TritonServerConfig(model_repository=IMAGE_REPOSITORY, exit_timeout_secs=IMAGE_EXIT_TIMEOUT_S,
                                admin_key=key)
    return ["/opt/nvidia/nvidia_entrypoint.sh", "tritonserver", *config.to_args_list(), *extra]


def main(argv: list[str]) -> int:  # pragma: no cover - the image's entrypoint
    """``triton_args.py exec [EXTRA FLAGS]``: exec the image's tritonserver with the admin key set."""
    if not argv or argv[0] != "exec":
        print("usage: triton_args.py exec [tritonserver flags...]", file=sys.stderr)
        return 2
    try:
        key = key_from_environment()
        if not key:
            raise TritonArgsError(f"set {ADMIN_KEY_ENV} (or {ADMIN_KEY_FILE_ENV}): the admin APIs need a key")
        command = image_command(key, argv[1:])
    except (TritonArgsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.execv(command[0], command)
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
