"""`python -m exporter build CHECKPOINT`: a thin argparse front over exporter.build.build."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from common.cli import run_cli, setup_logging
from exporter.config import Budgets, BuildConfig, Target, parse_precisions
from exporter.errors import ExporterError

PROG = "python -m exporter"


def parser() -> argparse.ArgumentParser:
    d, b = BuildConfig, Budgets()
    p = argparse.ArgumentParser(prog=PROG, description="Export a fine-tuned classifier to gated ONNX variants "
                                "and write the fastest passing one into a Triton model repository.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("build", help="export, optimise, convert, gate, report, write the repository")
    s.add_argument("checkpoint", type=Path, help="Hugging Face sequence-classification checkpoint directory")
    s.add_argument("--out", type=Path, default=Path("build"), help="build directory (default: build/)")
    s.add_argument("--repository", type=Path, default=Path("model_repository"),
                   help="Triton repository to write the selected variant into (default: model_repository/)")
    s.add_argument("--no-repository", action="store_true", help="only build and report")
    s.add_argument("--target", default="cpu", help="cpu (local, default) or gpu (Triton onnxruntime backend, fp16)")
    s.add_argument("--precisions", default="fp32,fp16,int8", help="comma list of fp32, fp16, int8 (default: all)")
    s.add_argument("--eval-data", type=Path, default=None,
                   help="held-out CSV (text,label); default <metrics.json data_dir>/test.csv")
    s.add_argument("--eval-size", type=int, default=d.eval_size, help=f"rows of eval data used (default {d.eval_size})")
    s.add_argument("--calibration-size", type=int, default=d.calibration_size,
                   help=f"training rows for static int8 calibration (default {d.calibration_size})")
    s.add_argument("--max-length", type=int, default=d.max_length, help=f"token truncation (default {d.max_length})")
    s.add_argument("--batch-size", type=int, default=d.batch_size, help=f"parity/throughput batch (default {d.batch_size})")
    s.add_argument("--max-accuracy-drop", type=float, default=b.int8_max_accuracy_drop,
                   help=f"int8 budget: accuracy drop in points (default {b.int8_max_accuracy_drop})")
    s.add_argument("--int8-min-agreement", type=float, default=b.int8_min_agreement,
                   help=f"int8 budget: label agreement fraction (default {b.int8_min_agreement})")
    s.add_argument("--fp32-max-abs", type=float, default=b.fp32_max_abs, help=f"fp32 budget (default {b.fp32_max_abs})")
    s.add_argument("--fp16-max-abs", type=float, default=b.fp16_max_abs, help=f"fp16 budget (default {b.fp16_max_abs})")
    s.add_argument("--fp16-min-agreement", type=float, default=b.fp16_min_agreement,
                   help=f"fp16 budget: label agreement fraction (default {b.fp16_min_agreement})")
    s.add_argument("--speed-seconds", type=float, default=d.speed_seconds,
                   help=f"timing budget per variant (default {d.speed_seconds})")
    s.add_argument("--max-exclusion-rounds", type=int, default=d.max_exclusion_rounds,
                   help=f"int8: retries excluding sensitive nodes (default {d.max_exclusion_rounds})")
    s.add_argument("--exhaustive-int8", action="store_true",
                   help="run the int8 exclusion search even for a variant already slower than a passing one")
    for name in ("tokenizer", "text_column", "label_column", "text_pair_column"):
        s.add_argument(f"--{name.replace('_', '-')}", default=None, help=d.__dataclass_fields__[name].metadata["help"])
    s.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _config(args: argparse.Namespace) -> BuildConfig:
    try:
        target = Target(args.target)
    except ValueError:
        raise ExporterError(f"unknown target {args.target!r} (known: cpu, gpu)") from None
    budgets = Budgets(fp32_max_abs=args.fp32_max_abs, fp16_max_abs=args.fp16_max_abs,
                      fp16_min_agreement=args.fp16_min_agreement, int8_max_accuracy_drop=args.max_accuracy_drop,
                      int8_min_agreement=args.int8_min_agreement)
    return BuildConfig(
        checkpoint=args.checkpoint, out=args.out, repository=None if args.no_repository else args.repository,
        target=target, precisions=parse_precisions(args.precisions), eval_data=args.eval_data,
        eval_size=args.eval_size, calibration_size=args.calibration_size, max_length=args.max_length,
        batch_size=args.batch_size, budgets=budgets, speed_seconds=args.speed_seconds,
        max_exclusion_rounds=args.max_exclusion_rounds, exhaustive_int8=args.exhaustive_int8,
        tokenizer=args.tokenizer, text_column=args.text_column, label_column=args.label_column,
        text_pair_column=args.text_pair_column,
    )


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging(args.verbose)
    # PyTorch's OpenMP threads spin while waiting; on a shared 2-core machine that turned a 1 ms batch-1
    # forward into 25-500 ms (measured here). Passive waiting keeps the reference timings honest. Only
    # effective before torch is first imported, which this CLI does lazily.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def run() -> int:
        from exporter.build import build
        from exporter.report import markdown

        result = build(_config(args))
        print(markdown(result.report))
        if result.exit_code:
            print(f"{PROG}: no variant passed its parity gate (report: {result.out / 'report.md'})", file=sys.stderr)
        return result.exit_code

    return run_cli(run, user_errors=(ExporterError,), prog=PROG)
