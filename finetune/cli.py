"""`python -m finetune {data,train}`: parse arguments, call one library function, print a table."""
from __future__ import annotations

import argparse
import sys

from common.cli import command_parser, prog_name, run_cli, setup_logging
from common.dataclass_cli import add_config_arguments, config_from_args
from finetune.errors import FinetuneError

PROG = "python -m finetune"


def build_parser() -> argparse.ArgumentParser:
    from finetune.data import DataConfig
    from finetune.train import Precision, TrainConfig

    parser, sub = command_parser(PROG, "Prepare data for and fine-tune a text classifier.")

    data = sub.add_parser("data", help="clean and split the packaged example corpus into train/validation/test.csv")
    add_config_arguments(data, DataConfig)

    train = sub.add_parser("train", help="fine-tune a sequence classifier and write a checkpoint with metrics.json")
    add_config_arguments(train, TrainConfig)
    train.add_argument("--no-bf16", dest="precision", action="store_const", const=Precision.FP32,
                       help="same as --precision fp32")
    return parser


def _print_split_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    labels = sorted({label for counts in result.counts.values() for label in counts})
    table = Table(title=f"rows per split and label -> {result.out}")
    table.add_column("split")
    for label in labels:
        table.add_column(label, justify="right")
    table.add_column("total", justify="right")
    for split, counts in result.counts.items():
        table.add_row(split, *(str(counts.get(label, 0)) for label in labels), str(sum(counts.values())))
    Console().print(table)
    s = result.stats
    print(f"cleaned {s.rows} rows: {s.changed} texts repaired, dropped {s.empty} empty and {s.duplicates} duplicate "
          f"texts ({s.conflicting} of them with another label)")


def _print_metrics_table(result) -> None:
    from rich.console import Console
    from rich.table import Table

    metrics = result.metrics
    table = Table(title=f"fine-tuned checkpoint -> {result.out}")
    table.add_column("split")
    table.add_column("rows", justify="right")
    table.add_column("accuracy", justify="right")
    table.add_column("macro-F1", justify="right")
    for label in result.labels:
        table.add_column(f"F1 {label}", justify="right")
    for split in ("validation", "test"):
        m = metrics[split]
        table.add_row(split, str(m["rows"]), f"{m['accuracy']:.4f}", f"{m['macro_f1']:.4f}",
                      *(f"{m['per_class_f1'][label]:.4f}" for label in result.labels))
    console = Console()
    console.print(table)
    cm = Table(title="test confusion matrix (rows: truth, columns: predicted)")
    cm.add_column("")
    for label in result.labels:
        cm.add_column(label, justify="right")
    for label, row in zip(result.labels, metrics["test"]["confusion_matrix"]["matrix"]):
        cm.add_row(label, *(str(v) for v in row))
    console.print(cm)
    args = metrics["args"]
    print(f"trained {args['steps']} steps on {args['train_rows']} rows in {metrics['train_seconds']:.1f} s "
          f"({args['precision_used']}, {args['threads']} threads)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    setup_logging(ns.verbose)

    def run() -> int:
        if ns.command == "data":
            from finetune.data import DataConfig, make_splits

            _print_split_table(make_splits(config_from_args(DataConfig, ns)))
            return 0
        from finetune.train import TrainConfig, train

        _print_metrics_table(train(config_from_args(TrainConfig, ns)))
        return 0

    return run_cli(run, user_errors=(FinetuneError,), prog=prog_name(PROG))


if __name__ == "__main__":
    sys.exit(main())
