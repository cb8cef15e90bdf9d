"""`python -m exporter build CHECKPOINT`: a thin argparse front over exporter.build.build."""
from __future__ import annotations

import argparse
import os
import sys

from common.cli import command_parser, prog_name, run_cli, setup_logging
from common.dataclass_cli import Flag, add_config_arguments, config_from_args
from exporter.config import Budgets, BuildConfig
from exporter.errors import ExporterError
from exporter.memory import freeze_imports
from exporter.tasks import resolve

PROG = "python -m exporter"
BUDGET_FLAGS = {"int8_max_accuracy_drop": Flag(names=("--max-accuracy-drop", "--int8-max-accuracy-drop"))}


def parser() -> argparse.ArgumentParser:
    p, sub = command_parser(PROG, "Export a fine-tuned classifier to gated ONNX variants and write the fastest "
                                  "passing one into a Triton model repository.", verbose=False)
    s = sub.add_parser("build", help="export, optimise, convert, gate, report, write the repository")
    add_config_arguments(s, BuildConfig, flags={"checkpoint": Flag(positional=True),
                                                  "exhaustive": Flag(names=("--exhaustive", "--exhaustive-int8"))},
                         exclude={"budgets"})
    s.add_argument("--no-repository", dest="repository", action="store_const", const=None,
                   help="only build and report")
    add_config_arguments(s.add_argument_group("parity budgets"), Budgets, flags=BUDGET_FLAGS)
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _config(args: argparse.Namespace) -> BuildConfig:
    return config_from_args(BuildConfig, args, budgets=config_from_args(Budgets, args))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    # PyTorch's OpenMP threads spin while waiting; on a shared 2-core machine that turned a 1 ms batch-1
    # forward into 25-500 ms (measured here). Passive waiting keeps the reference timings honest. Only
    # effective before torch is first imported, which this CLI does lazily.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def run() -> int:
        config = _config(args)
        flow = resolve(config)
        freeze_imports()  # after the OMP setting above: it imports torch
        result = flow.build(config)
        print(flow.summary(result.report))
        if result.exit_code:
            print(f"{prog_name(PROG)}: no variant passed its parity gate (report: {result.out / 'report.md'})",
                  file=sys.stderr)
        return result.exit_code

    return run_cli(run, user_errors=(ExporterError,), prog=prog_name(PROG))
