"""`python -m serving {up,gateway,classify,embed,rerank,entities,models,rollback,health,validate,manifests}`: thin
commands over the serving library."""
from __future__ import annotations

import argparse
import enum
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import command_parser, prog_name, run_cli, setup_logging
from common.dataclass_cli import Flag, add_config_arguments, config_from_args
from serving.contract import DEFAULT_CLASSIFIER, DEFAULT_EMBEDDER, DEFAULT_RERANKER, DEFAULT_TAGGER, Protocol
from serving.errors import ServingError
from serving.repository import Target

PROG = "python -m serving"
# `serving up` serves the exporter's default repository on Triton's standard ports; ServerConfig (a library
# type) has no default repository and picks free ports (0), which suits tests and embedding.
UP_FLAGS = {"repository": Flag(default=Path("model_repository")), "http_port": Flag(default=8000),
            "grpc_port": Flag(default=8001), "metrics_port": Flag(default=8002)}


class Output(str, enum.Enum):
    TABLE = "table"
    JSON = "json"


@dataclass
class ClassifyConfig:
    """`serving classify`: texts, where to send them, how to print the answers."""

    texts: list[str] = field(metadata={"help": "texts to classify; '-' reads one text per line from stdin"})
    url: str | None = field(default=None, metadata={"help": "host:port (default 127.0.0.1:8000 http, :8001 grpc)"})
    protocol: Protocol = field(default=Protocol.HTTP, metadata={"help": "wire protocol"})
    model: str = field(default=DEFAULT_CLASSIFIER, metadata={"help": "served model name"})
    timeout_s: float = field(default=30.0, metadata={"help": "seconds per request"})
    output: Output = field(default=Output.TABLE, metadata={"help": "print a table or JSON"})
    pairs: list[str] | None = field(default=None, metadata={
        "help": "text pairs: the second text of each text, in order (--pair once per text)"})

    def __post_init__(self) -> None:
        try:
            self.protocol = Protocol(self.protocol)
        except ValueError:
            raise ServingError(f"protocol must be http or grpc, got {self.protocol!r}") from None
        if not self.texts:
            raise ServingError("give at least one text (or '-' to read lines from stdin)")
        if self.pairs is not None and len(self.pairs) != len(self.texts):
            raise ServingError(f"{len(self.texts)} texts but {len(self.pairs)} --pair values (give one per text)")
        self.output = Output(self.output)
        if self.url is None:
            self.url = f"127.0.0.1:{self.protocol.default_port}"


@dataclass
class EmbedConfig(ClassifyConfig):
    """`serving embed`: texts, where to send them, how to print the vectors."""

    texts: list[str] = field(metadata={"help": "texts to embed; '-' reads one text per line from stdin"})
    model: str = field(default=DEFAULT_EMBEDDER, metadata={"help": "served embedding model name"})
    show: int = field(default=4, metadata={"help": "table: leading values of each vector shown"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.show < 0:
            raise ServingError(f"--show must be >= 0, got {self.show}")


@dataclass
class EntitiesConfig(ClassifyConfig):
    """`serving entities`: texts to a tagger (token classification), the entities printed."""

    model: str = field(default=DEFAULT_TAGGER, metadata={"help": "served tagger (token classification) name"})


@dataclass
class RerankConfig:
    """`serving rerank`: a query, its documents, where to send them, how many to print."""

    query: str = field(metadata={"help": "the query"})
    documents: list[str] = field(metadata={"help": "documents to rank; '-' reads one document per line from stdin"})
    url: str | None = field(default=None, metadata={"help": "host:port (default 127.0.0.1:8000 http, :8001 grpc)"})
    protocol: Protocol = field(default=Protocol.HTTP, metadata={"help": "wire protocol"})
    model: str = field(default=DEFAULT_RERANKER, metadata={"help": "served reranker name"})
    top_k: int | None = field(default=None, metadata={"help": "print only the best K documents (default: all)"})
    timeout_s: float = field(default=30.0, metadata={"help": "seconds per request"})
    output: Output = field(default=Output.TABLE, metadata={"help": "print a table or JSON"})

    def __post_init__(self) -> None:
        try:
            self.protocol = Protocol(self.protocol)
        except ValueError:
            raise ServingError(f"protocol must be http or grpc, got {self.protocol!r}") from None
        if not self.documents:
            raise ServingError("give at least one document (or '-' to read lines from stdin)")
        if self.top_k is not None and self.top_k < 1:
            raise ServingError(f"--top-k must be >= 1, got {self.top_k}")
        self.output = Output(self.output)
        if self.url is None:
            self.url = f"127.0.0.1:{self.protocol.default_port}"


@dataclass
class HealthConfig:
    """`serving health`: which server and model to ask."""

    url: str = field(default="127.0.0.1:8000", metadata={"help": "HTTP host:port"})
    model: str = field(default=DEFAULT_CLASSIFIER, metadata={"help": "served model name"})
    timeout_s: float = field(default=5.0, metadata={"help": "seconds to wait for the answer"})


@dataclass
class ValidateConfig:
    """`serving validate`: the repository to check, optionally against a target."""

    repository: Path = field(metadata={"help": "model repository directory"})
    target: Target | None = field(default=None, metadata={"help": "also check it fits this target"})


@dataclass
class ServerAdminConfig:
    """A running server's repository API: where it is and its admin key (the API is restricted)."""

    url: str = field(default="127.0.0.1:8000", metadata={"help": "HTTP host:port"})
    admin_key: str | None = field(default=None, repr=False, metadata={
        "help": "the server's admin key (default: $TRITON_ADMIN_KEY)"})
    output: Output = field(default=Output.TABLE, metadata={"help": "print a table or JSON"})
    timeout_s: float = field(default=30.0, metadata={"help": "seconds per call"})

    def __post_init__(self) -> None:
        self.output = Output(self.output)
        if self.admin_key is None:
            from serving.triton_args import key_from_environment

            self.admin_key = key_from_environment()
        if not self.admin_key:
            raise ServingError("the repository API needs the server's admin key: --admin-key KEY or "
                               "$TRITON_ADMIN_KEY")


@dataclass
class ModelsConfig:
    """`serving models`: the served models of a repository on disk (task, head, labels, versions), or with
    --url those of a running server (state, version served, versions kept; needs the admin key)."""

    repository: Path = field(default=Path("model_repository"), metadata={"help": "model repository directory"})
    url: str | None = field(default=None, metadata={"help": "ask this running server (HTTP host:port) instead"})
    admin_key: str | None = field(default=None, repr=False, metadata={
        "help": "the server's admin key, with --url (default: $TRITON_ADMIN_KEY)"})
    output: Output = field(default=Output.TABLE, metadata={"help": "print a table or JSON"})
    timeout_s: float = field(default=30.0, metadata={"help": "seconds per call, with --url"})

    def __post_init__(self) -> None:
        self.output = Output(self.output)

    def server(self) -> ServerAdminConfig:
        return ServerAdminConfig(self.url, self.admin_key, self.output, self.timeout_s)


@dataclass
class RollbackConfig(ServerAdminConfig):
    """`serving rollback`: the model to return to its previous version (or to --version)."""

    model: str = field(default=DEFAULT_CLASSIFIER, metadata={"help": "served model"})
    version: int | None = field(default=None, metadata={"help": "serve this version (default: the one before "
                                                                "the version served now)"})
    timeout_s: float = field(default=300.0, metadata={"help": "seconds the load may take"})


def _add_up(sub) -> None:
    from serving.server import ServerConfig
    from serving.supervisor import SupervisorConfig

    p = sub.add_parser("up", help="run tritonserver locally on a model repository until Ctrl-C / SIGTERM")
    add_config_arguments(p, ServerConfig, flags=UP_FLAGS, exclude={"extra_args"})
    p.add_argument("--no-supervise", action="store_true",
                   help="do not restart a broken server (dead stub / process); see docs/RELIABILITY.md")
    add_config_arguments(p.add_argument_group("supervisor"), SupervisorConfig)
    _add_gateway_beside(p.add_argument_group("gateway (OpenAI and text-embeddings-inference routes, docs/GATEWAY.md)"))


def _add_gateway_beside(group) -> None:
    from serving.gateway.config import GatewayConfig

    group.add_argument("--gateway-port", type=int, default=None, metavar="PORT",
                       help="also run the gateway on this port (same --host), supervised with tritonserver "
                            "(default: no gateway)")
    add_config_arguments(group, GatewayConfig, include={"api_key"})


def _gateway_beside(args, server):
    """The gateway process `up` runs beside ``server`` (None without --gateway-port)."""
    if args.gateway_port is None:
        return None
    from serving.gateway.config import GatewayConfig
    from serving.gateway.process import GatewayProcess

    config = GatewayConfig(repository=args.repository, triton_url=server.grpc_url, host=args.host,
                           port=args.gateway_port, api_key=args.api_key)
    return GatewayProcess(config).start()


def _add_gateway(sub) -> None:
    from serving.gateway.config import GatewayConfig

    p = sub.add_parser("gateway", help="serve OpenAI and text-embeddings-inference routes in front of a running "
                                       "tritonserver (docs/GATEWAY.md)")
    add_config_arguments(p, GatewayConfig, flags={"repository": Flag(default=Path("model_repository"))})


def _run_gateway(args) -> int:
    from serving.gateway.config import GatewayConfig
    from serving.gateway.process import run_gateway

    return run_gateway(config_from_args(GatewayConfig, args))


def monitoring_pointers() -> dict[str, str]:
    """Where the Grafana dashboard, the alert rules and the metrics docs are (``serving up`` prints them)."""
    from serving.manifests.monitoring import DASHBOARD_FILE, RULES_FILE, STATIC_DIR

    docs = Path(__file__).resolve().parent.parent / "docs" / "METRICS.md"
    return {"dashboard": str(STATIC_DIR / DASHBOARD_FILE), "alerts": str(STATIC_DIR / RULES_FILE),
            "docs": str(docs) if docs.is_file() else "docs/METRICS.md in the source tree"}


def _run_up(args) -> int:
    from serving.server import ServerConfig, serve_forever
    from serving.supervisor import SupervisorConfig, supervise_forever

    config = config_from_args(ServerConfig, args)
    supervisor = None if args.no_supervise else config_from_args(SupervisorConfig, args)
    gateway = []

    def ready(server) -> None:
        gateway.extend(g for g in [_gateway_beside(args, server)] if g is not None)
        print(f"tritonserver ready in {server.start_seconds:.1f} s (Ctrl-C to stop)", flush=True)
        print(f"  HTTP     http://{server.http_url}", flush=True)
        print(f"  gRPC     {server.grpc_url}", flush=True)
        print(f"  metrics  {server.metrics_url}  (textclf_* per model, beside Triton's nv_*)", flush=True)
        for key, where in monitoring_pointers().items():
            print(f"  {key:<8} {where}", flush=True)
        print(f"  log      {server.log_path}", flush=True)
        print(f"  pid      {server.process.pid}", flush=True)
        print(f"  admin    restricted (header {server.admin_header}; key from --admin-key/$TRITON_ADMIN_KEY, "
              "else random)", flush=True)
        if supervisor is not None:
            print(f"  supervisor  on (checks every {supervisor.check_interval_s:g} s; --no-supervise to opt out)",
                  flush=True)
            if supervisor.watch_repository:
                print("  versions    a build into the repository is verified and served; go back with "
                      "`python -m serving rollback MODEL --admin-key KEY`", flush=True)
        for g in gateway:
            print(f"  gateway  {g.url} (pid {g.process.pid}; key {'required' if g.config.api_key else 'none'})",
                  flush=True)

    try:
        if supervisor is None:
            return serve_forever(config, on_ready=ready)
        return supervise_forever(config, supervisor, on_ready=ready)
    finally:
        for g in gateway:
            g.stop()


def _add_classify(sub) -> None:
    p = sub.add_parser("classify", help="classify texts with a running server")
    p.add_argument("texts", nargs="+", help=ClassifyConfig.__dataclass_fields__["texts"].metadata["help"])
    add_config_arguments(p, ClassifyConfig, exclude={"texts", "pairs"})
    p.add_argument("--pair", dest="pairs", action="append", metavar="TEXT",
                   help=ClassifyConfig.__dataclass_fields__["pairs"].metadata["help"])
    p.add_argument("--json", dest="output", action="store_const", const=Output.JSON, help="same as --output json")


def _run_classify(args) -> int:
    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    config = config_from_args(ClassifyConfig, args, texts=texts, pairs=args.pairs)
    from serving.client import TextClassifier
    from serving.contract import Head

    with TextClassifier(config.url, protocol=config.protocol, model=config.model,
                        timeout_s=config.timeout_s) as client:
        if client.served_model().head is Head.REGRESSION:
            return _print_scores(config, client.score(config.texts, config.pairs))
        predictions = client.classify(config.texts, config.pairs)
    if config.output is Output.JSON:
        print(json.dumps([{"text": t, **p.to_dict()} for t, p in zip(config.texts, predictions)], indent=2))
        return 0
    from rich.console import Console

    console = Console()
    console.print(classify_table(config, predictions, console.width))
    return 0


TOP_SHOWN = 3  # probabilities shown in one column when a column per label does not fit the terminal


def classify_table(config: ClassifyConfig, predictions, width: int):
    """The predictions as a table that fits ``width`` columns: one column per label when they fit beside
    the text and the label, else the top three probabilities in one column (the label always shows)."""
    from rich.table import Table

    labels = list(predictions[0].probabilities) if predictions else []
    per_label = 24 + max((len(p.label) for p in predictions), default=5) + sum(max(len(x), 5) + 3 for x in labels)
    table = Table(title=f"{config.model} @ {config.url} ({config.protocol.value})")
    table.add_column("text", overflow="fold", max_width=60, min_width=8)
    table.add_column("label", style="bold", overflow="fold", min_width=5)
    if per_label <= width:
        for label in labels:
            table.add_column(label, justify="right")
        for text, p in zip(config.texts, predictions):
            table.add_row(text, p.label, *(f"{p.probabilities[label]:.3f}" for label in labels))
        return table
    table.add_column("score", justify="right")
    table.add_column(f"top {TOP_SHOWN}", overflow="fold")
    for text, p in zip(config.texts, predictions):
        top = sorted(p.probabilities.items(), key=lambda kv: -kv[1])[:TOP_SHOWN]
        table.add_row(text, p.label, f"{p.score:.3f}", ", ".join(f"{k} {v:.3f}" for k, v in top))
    return table


def _add_embed(sub) -> None:
    p = sub.add_parser("embed", help="embed texts with a running server (an embedding model)")
    p.add_argument("texts", nargs="+", help=EmbedConfig.__dataclass_fields__["texts"].metadata["help"])
    add_config_arguments(p, EmbedConfig, exclude={"texts", "pairs"})
    p.add_argument("--json", dest="output", action="store_const", const=Output.JSON, help="same as --output json")


def _run_embed(args) -> int:
    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    config = config_from_args(EmbedConfig, args, texts=texts)
    import numpy as np

    from serving.client import Embedder

    with Embedder(config.url, protocol=config.protocol, model=config.model, timeout_s=config.timeout_s) as client:
        vectors = client.embed(config.texts)
    if config.output is Output.JSON:
        print(json.dumps([{"text": t, "embedding": [float(x) for x in v]} for t, v in zip(config.texts, vectors)]))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.model} @ {config.url} ({config.protocol.value})")
    for name, justify in (("text", "left"), ("dim", "right"), ("norm", "right"), ("first values", "left")):
        table.add_column(name, justify=justify, overflow="fold", max_width=60 if name == "text" else None)
    for text, v in zip(config.texts, vectors):
        head = " ".join(f"{x:+.4f}" for x in v[:config.show]) + (" ..." if len(v) > config.show else "")
        table.add_row(text, str(len(v)), f"{float(np.linalg.norm(v)):.4f}", head)
    Console().print(table)
    return 0


def _print_scores(config: ClassifyConfig, scores: list[float]) -> int:
    """A regression model's answers: one score per text."""
    if config.output is Output.JSON:
        print(json.dumps([{"text": t, "score": x} for t, x in zip(config.texts, scores)], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.model} @ {config.url} ({config.protocol.value})")
    table.add_column("text", overflow="fold", max_width=60)
    table.add_column("score", justify="right", style="bold")
    for text, score in zip(config.texts, scores):
        table.add_row(text, f"{score:.4f}")
    Console().print(table)
    return 0


def _add_entities(sub) -> None:
    p = sub.add_parser("entities", help="entities of texts from a running server (a tagger: token classification)")
    p.add_argument("texts", nargs="+", help="texts to tag; '-' reads one text per line from stdin")
    add_config_arguments(p, EntitiesConfig, exclude={"texts", "pairs"})
    p.add_argument("--json", dest="output", action="store_const", const=Output.JSON, help="same as --output json")


def _run_entities(args) -> int:
    texts = [line.rstrip("\n") for line in sys.stdin] if args.texts == ["-"] else args.texts
    config = config_from_args(EntitiesConfig, args, texts=texts)
    from serving.client import Tagger

    with Tagger(config.url, protocol=config.protocol, model=config.model, timeout_s=config.timeout_s) as client:
        rows = client.entities(config.texts)
    if config.output is Output.JSON:
        print(json.dumps([{"text": t, "entities": row} for t, row in zip(config.texts, rows)], ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.model} @ {config.url} ({config.protocol.value})")
    for name, justify in (("text", "right"), ("entity", "left"), ("word", "left"), ("start", "right"),
                          ("end", "right"), ("score", "right")):
        table.add_column(name, justify=justify, overflow="fold", max_width=40 if name in ("word",) else None)
    for i, row in enumerate(rows):
        for e in row:
            table.add_row(str(i), e.get("entity_group", e.get("entity", "")), e["word"], str(e["start"]),
                          str(e["end"]), f"{e['score']:.4f}")
    Console().print(table)
    return 0


def _add_rerank(sub) -> None:
    p = sub.add_parser("rerank", help="rank documents for a query with a running server (a reranker)")
    p.add_argument("query", help=RerankConfig.__dataclass_fields__["query"].metadata["help"])
    p.add_argument("documents", nargs="+", help=RerankConfig.__dataclass_fields__["documents"].metadata["help"])
    add_config_arguments(p, RerankConfig, exclude={"query", "documents"})
    p.add_argument("--json", dest="output", action="store_const", const=Output.JSON, help="same as --output json")


def _run_rerank(args) -> int:
    docs = [line.rstrip("\n") for line in sys.stdin] if args.documents == ["-"] else args.documents
    config = config_from_args(RerankConfig, args, query=args.query, documents=docs)
    from serving.client import Reranker

    with Reranker(config.url, protocol=config.protocol, model=config.model, timeout_s=config.timeout_s) as client:
        ranked = client.rerank(config.query, config.documents, config.top_k)
    if config.output is Output.JSON:
        print(json.dumps([{**r.to_dict(), "text": config.documents[r.index]} for r in ranked], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{config.model} @ {config.url} ({config.protocol.value}): {config.query}")
    for name, justify in (("rank", "right"), ("index", "right"), ("score", "right"), ("document", "left")):
        table.add_column(name, justify=justify, overflow="fold", max_width=60 if name == "document" else None)
    for i, r in enumerate(ranked, 1):
        table.add_row(str(i), str(r.index), f"{r.score:.4f}", config.documents[r.index])
    Console().print(table)
    return 0


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list a repository's served models (task, head, labels, version), or "
                                      "with --url a running server's (versions served and kept)")
    add_config_arguments(p, ModelsConfig)
    p.add_argument("--json", dest="output", action="store_const", const=Output.JSON, help="same as --output json")


def served_models(repository: Path) -> list[dict]:
    """Each served model of ``repository``: name, task, head, labels and the versions on disk."""
    from serving.repository import read_repository

    info = read_repository(repository)
    rows = []
    for name, model in sorted(info.models.items()):
        c = model.contract
        rows.append({"name": name, "task": c.task, "head": c.head.value, "labels": list(c.labels),
                     "text_pair": c.text_pair, "version": str(model.version),
                     "versions": [str(v) for v in model.versions]})
    return rows


def _run_models(args) -> int:
    config = config_from_args(ModelsConfig, args)
    if config.url is not None:
        return _server_models(config.server())
    rows = served_models(config.repository)
    if config.output is Output.JSON:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=str(config.repository))
    for name in ("model", "task", "head", "labels", "version", "kept"):
        table.add_column(name, overflow="fold", max_width=40 if name == "labels" else None)
    for r in rows:
        table.add_row(r["name"], r["task"], r["head"], ", ".join(r["labels"]) or "-", r["version"],
                      ",".join(r["versions"]))
    Console().print(table)
    return 0


def _server_models(config: ServerAdminConfig) -> int:
    from serving.control import ModelControl

    models = ModelControl(config.url, config.admin_key, timeout_s=config.timeout_s).models()
    if config.output is Output.JSON:
        print(json.dumps([m.to_dict() for m in models], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"models @ {config.url}")
    for column in ("model", "state", "served version", "versions kept"):
        table.add_column(column)
    for m in models:
        table.add_row(m.name, m.state, ",".join(map(str, m.served)) or "-", ",".join(map(str, m.available)) or "-")
    Console().print(table)
    return 0


def _add_health(sub) -> None:
    add_config_arguments(sub.add_parser("health", help="exit 0 if the server and the model are ready"), HealthConfig)


def _run_health(args) -> int:
    from serving.client import TextClassifier

    config = config_from_args(HealthConfig, args)
    with TextClassifier(config.url, protocol="http", model=config.model, timeout_s=config.timeout_s,
                        retries=0) as client:
        ready = client.is_ready()
    print(f"{config.url}: {config.model} {'ready' if ready else 'NOT ready'}")
    return 0 if ready else 1


def _add_rollback(sub) -> None:
    p = sub.add_parser("rollback", help="serve the previous version of a model (a load; the old one answers "
                                        "until the new one is ready)")
    add_config_arguments(p, RollbackConfig, flags={"model": Flag(positional=True)}, exclude={"output"})


def _run_rollback(args) -> int:
    from serving.control import ModelControl

    config = config_from_args(RollbackConfig, args)
    control = ModelControl(config.url, config.admin_key, timeout_s=config.timeout_s)
    if config.version is None:
        old, new = control.rollback(config.model)
    else:
        old, new = max(control.served_versions(config.model), default=0), config.version
        control.serve_version(config.model, config.version)
    print(f"{config.model}: version {old} -> {new} (served now: {list(control.served_versions(config.model))})")
    return 0


def _add_validate(sub) -> None:
    p = sub.add_parser("validate", help="check a model repository offline")
    add_config_arguments(p, ValidateConfig, flags={"repository": Flag(positional=True)})


def _run_validate(args) -> int:
    from serving.repository import validate_repository

    config = config_from_args(ValidateConfig, args)
    models = validate_repository(config.repository, config.target)
    print(f"{config.repository}: valid ({', '.join(models)})")
    return 0


def _manifests():
    try:
        from serving import manifests
    except ImportError:
        return None
    return manifests


def build_parser(with_manifests: bool = True) -> argparse.ArgumentParser:
    parser, sub = command_parser(PROG, __doc__)
    for add in (_add_up, _add_gateway, _add_classify, _add_embed, _add_rerank, _add_entities, _add_models, _add_rollback,
                _add_health, _add_validate):
        add(sub)
    manifests = _manifests() if with_manifests else None
    if manifests is not None:
        manifests.add_arguments(sub.add_parser("manifests", help="write Kubernetes manifests"))
    return parser


RUNNERS = {"up": _run_up, "gateway": _run_gateway, "classify": _run_classify, "embed": _run_embed,
           "rerank": _run_rerank, "entities": _run_entities, "models": _run_models, "rollback": _run_rollback,
           "health": _run_health, "validate": _run_validate}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    def run() -> int:
        if args.command == "manifests":
            return int(_manifests().run(args))
        return RUNNERS[args.command](args)

    return run_cli(run, user_errors=(ServingError,), prog=prog_name(PROG))
