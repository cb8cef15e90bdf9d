"""``python -m serving manifests``: flags, the config they make, and the command body."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from common.dataclass_cli import Flag, add_config_arguments
from common.dataclass_cli import config_from_args as config_of
from serving.errors import RepositoryError, ServingError
from serving.manifests.config import ManifestConfig
from serving.manifests.render import render_manifests, write_manifests
from serving.manifests.validation import validate_manifests
from serving.manifests.values import DEFAULT_OUT, KUBERNETES_VERSION, ManifestError
from serving.repository import RepositoryConfig

# CLI-only spellings kept from before the flags were generated (docs/KUBERNETES.md, README.md use them).
FLAGS = {
    "create_namespace": Flag(names=("--namespace-object",)),  # --no-namespace-object
    "exit_timeout_s": Flag(names=("--exit-timeout-secs", "--exit-timeout")),  # Triton's own spelling first
    "service_account_annotations": Flag(names=("--service-account-annotation",)),
    "service_monitor_labels": Flag(names=("--service-monitor-label",)),
}
REPOSITORY_FIELDS = ("target", "max_batch_size", "max_length", "encoder_instances", "max_batch_tokens")


@dataclass
class OutputOptions:
    """What ``python -m serving manifests`` does with the rendered objects (not part of the manifests)."""

    validate: bool = field(default=False, metadata={
        "help": f"also validate every object offline (kubernetes-validate, Kubernetes {KUBERNETES_VERSION})"})
    out: Path = field(default=DEFAULT_OUT, metadata={"help": "output directory"})


def _repository_flags() -> dict[str, Flag]:
    """The repository's flags default to ManifestConfig's repository (the GPU target), not RepositoryConfig's."""
    default = next(f for f in dataclasses.fields(ManifestConfig) if f.name == "repository").default_factory()
    shm = "(sizes the /dev/shm floor)"
    helps = {"target": "repository target the image serves", "max_batch_size": f"the repository's max_batch_size {shm}",
             "max_length": f"the repository's max_length {shm}"}
    return {name: Flag(default=getattr(default, name), help=helps.get(name)) for name in REPOSITORY_FIELDS}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m serving manifests``, generated from :class:`ManifestConfig` (and the repository's)."""
    add_config_arguments(parser, ManifestConfig, flags=FLAGS, exclude={"repository"})
    parser.add_argument("--writable-root-fs", dest="read_only_root_fs", action="store_false",
                        default=argparse.SUPPRESS, help="same as --no-read-only-root-fs")
    add_config_arguments(parser.add_argument_group("repository"), RepositoryConfig, flags=_repository_flags(),
                         include=REPOSITORY_FIELDS)
    add_config_arguments(parser, OutputOptions)


def config_from_args(args: argparse.Namespace) -> ManifestConfig:
    """The :class:`ManifestConfig` of parsed flags (its ``__post_init__`` validates)."""
    try:
        repository = config_of(RepositoryConfig, argparse.Namespace(
            **{name: getattr(args, name) for name in REPOSITORY_FIELDS}))
    except RepositoryError as exc:
        raise ManifestError(str(exc)) from None
    return config_of(ManifestConfig, args, repository=repository)


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

    prog = "python -m serving manifests"
    # exit_on_error=False: a flag's own error (a KEY=VALUE without '=') is one line and exit 2, like the config's
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0], exit_on_error=False)
    add_arguments(parser)
    setup_logging()
    return run_cli(lambda: run(parser.parse_args(argv)), user_errors=(ServingError, argparse.ArgumentError),
                   prog=prog)
