"""`python -m serving {up,classify,health,validate,manifests}`: thin commands over the serving library."""
from __future__ import annotations

import argparse
import enum
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from serving.errors import ServingError

PROG = "python -m serving"


class Output(str, enum.Enum):
    TABLE = "table"
    JSON = "json"


@dataclass
class ClassifyConfig:
    texts: list[str]
    url: str
    protocol: str
    model: str
    timeout_s: float
    output: Output

    def __post_init__(self) -> None:
        if self.protocol not in ("http", "grpc"):
            raise ServingError(f"protocol must be http or grpc, got {self.protocol!r}")
        if not self.texts:
            raise ServingError("give at least one text (or '-' to read lines from stdin)")
        self.output = Output(self.output)


def _add_up(sub) -> None:
    p = sub.add_parser("up", help="run tritonserver locally on a model repository until Ctrl-C / SIGTERM")
    p.add_argument("--repository", type=Path, default=Path("model_repository"))
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--http-port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-file", type=Path, default=None, help="server log (default: a temporary file)")
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for every model")
    p.add_argument("--exit-timeout", type=int, default=10, help="seconds tritonserver may take to stop")
    p.add_argument("--no-supervise", action="store_true",
                   help="do not restart a broken server (dead stub / process); see docs/RELIABILITY.md")
    p.add_argument("--check-interval", type=float, default=2.0, help="seconds between supervisor checks")
    p.add_argument("--skip-verify", action="store_true",
                   help="serve a repository that differs from the hashes in its provenance.json (know why)")
    p.add_argument("--admin-key", default=None,
                   help="key of the restricted admin APIs (default: $TRITON_ADMIN_KEY, else random; docs/SECURITY.md)")


def _run_up(args) -> int:
    from serving.server import ServerConfig, serve_forever
    from serving.supervisor import SupervisorConfig, supervise_forever

    config = ServerConfig(
        repository=args.repository, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
        metrics_port=args.metrics_port, log_file=args.log_file, startup_timeout_s=args.startup_timeout,
        exit_timeout_s=args.exit_timeout, admin_key=args.admin_key, skip_verify=args.skip_verify,
    )

    def ready(server) -> None:
        print(f"tritonserver ready in {server.start_seconds:.1f} s (Ctrl-C to stop)", flush=True)
        print(f"  HTTP     http://{server.http_url}", flush=True)
        print(f"  gRPC     {server.grpc_url}", flush=True)
        print(f"  metrics  {server.metrics_url}", flush=True)
        print(f"  log      {server.log_path}", flush=True)
        print(f"  pid      {server.process.pid}", flush=True)
        print(f"  admin    restricted (header {server.admin_header}; key from --admin-key/$TRITON_ADMIN_KEY, "
              "else random)", flush=True)
        if not args.no_supervise:
            print(f"  supervisor  on (checks every {args.check_interval:g} s; --no-supervise to opt out)", flush=True)

    if args.no_supervise:
        return serve_forever(config, on_ready=ready)
    return supervise_forever(config, SupervisorConfig(check_interval_s=args.check_interval), on_ready=ready)


def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify texts with a running server")
    p.add_argument("texts", nargs="+", help="texts to classify; '-' reads one text per line from stdin")
    p.add_argument("--url", default=None, help="host:port (default 127.0.0.1:8000 http, :8001 grpc)")
    p.add_argument("--protocol", choices=["http", "grpc"], default="http")
    p.add_argument("--model", default="classifier")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _run_classify(args) -> int:
    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    url = args.url or ("127.0.0.1:8001" if args.protocol == "grpc" else "127.0.0.1:8000")
    config = ClassifyConfig(texts, url, args.protocol, args.model, args.timeout,
                            Output.JSON if args.json else Output.TABLE)
    from serving.client import TextClassifier

    with TextClassifier(config.url, protocol=config.protocol, model=config.model,
                        timeout_s=config.timeout_s) as client:
        predictions = client.classify(config.texts)
    if config.output is Output.JSON:
        print(json.dumps([{"text": t, **p.to_dict()} for t, p in zip(config.texts, predictions)], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    labels = list(predictions[0].probabilities) if predictions else []
    table = Table(title=f"{config.model} @ {config.url} ({config.protocol})")
    table.add_column("text", overflow="fold", max_width=60)
    table.add_column("label", style="bold")
    for label in labels:
        table.add_column(label, justify="right")
    for text, p in zip(config.texts, predictions):
        table.add_row(text, p.label, *(f"{p.probabilities[label]:.3f}" for label in labels))
    Console().print(table)
    return 0


def _add_health(sub) -> None:
    p = sub.add_parser("health", help="exit 0 if the server and the model are ready")
    p.add_argument("--url", default="127.0.0.1:8000", help="HTTP host:port")
    p.add_argument("--model", default="classifier")
    p.add_argument("--timeout", type=float, default=5.0)


def _run_health(args) -> int:
    from serving.client import TextClassifier

    with TextClassifier(args.url, protocol="http", model=args.model, timeout_s=args.timeout, retries=0) as client:
        ready = client.is_ready()
    print(f"{args.url}: {args.model} {'ready' if ready else 'NOT ready'}")
    return 0 if ready else 1


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a model repository offline")
    p.add_argument("repository", type=Path)
    p.add_argument("--target", choices=["cpu", "gpu"], default=None)


def _run_validate(args) -> int:
    from serving.repository import Target, validate_repository

    models = validate_repository(args.repository, Target(args.target) if args.target else None)
    print(f"{args.repository}: valid ({', '.join(models)})")
    return 0


def _manifests():
    try:
        from serving import manifests
    except ImportError:
        return None
    return manifests


def build_parser(with_manifests: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_up, _add_classify, _add_health, _add_validate):
        add(sub)
    manifests = _manifests() if with_manifests else None
    if manifests is not None:
        manifests.add_arguments(sub.add_parser("manifests", help="write Kubernetes manifests"))
    return parser


RUNNERS = {"up": _run_up, "classify": _run_classify, "health": _run_health, "validate": _run_validate}


def main(argv: list[str] | None = None) -> int:
    from common.cli import run_cli, setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        if args.command == "manifests":
            return int(_manifests().run(args))
        return RUNNERS[args.command](args)

    return run_cli(run, user_errors=(ServingError,), prog=PROG)
