"""``python -m serving manifests``: flags, the config they make, and the command body."""
from __future__ import annotations

import argparse
from pathlib import Path

from serving.errors import ServingError
from serving.manifests.config import ManifestConfig
from serving.manifests.render import render_manifests, write_manifests
from serving.manifests.validation import validate_manifests
from serving.manifests.values import DEFAULT_OUT, KUBERNETES_VERSION, KServeMode, ManifestError, ServiceType
from serving.repository import RepositoryConfig, Target

_DEFAULTS = ManifestConfig.__dataclass_fields__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m serving manifests``."""
    _add_pod_arguments(parser)
    _add_cluster_arguments(parser)
    _add_security_arguments(parser)
    _add_repository_arguments(parser)


def _add_pod_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = _DEFAULTS
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


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = _DEFAULTS
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


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    for name in ("admin_secret", "ingress_namespace", "monitoring_namespace"):
        parser.add_argument(f"--{name.replace('_', '-')}", default=_DEFAULTS[name].default,
                            help=_DEFAULTS[name].metadata["help"])
    parser.add_argument("--no-network-policy", dest="network_policy", action="store_false",
                        help="do not render NetworkPolicies (the cluster has no policy engine, or its own)")
    parser.add_argument("--require-digest", action="store_true", help=_DEFAULTS["require_digest"].metadata["help"])


def _add_repository_arguments(parser: argparse.ArgumentParser) -> None:
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
        locust_user_class=args.locust_user_class, repository=repository, admin_secret=args.admin_secret,
        network_policy=args.network_policy, ingress_namespace=args.ingress_namespace,
        monitoring_namespace=args.monitoring_namespace, require_digest=args.require_digest,
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
