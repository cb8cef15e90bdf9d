"""`python -m finetune {data,train}`: parse arguments, call one library function, print a table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from common.cli import run_cli, setup_logging
from finetune.errors import FinetuneError

PROG = "python -m finetune"


def _size(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    return number


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own_version = version("triton-textclf")
    except PackageNotFoundError:
        own_version = "unknown"
    parser = argparse.ArgumentParser(prog=PROG, description="Prepare data for and fine-tune a text classifier.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {own_version}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="clean and split the packaged example corpus into train/validation/test.csv")
    data.add_argument("--out", type=Path, required=True, help="output directory (written atomically)")
    data.add_argument("--limit", type=int, help="sample this many rows first (stratified)")
    data.add_argument("--seed", type=int, default=42)
    data.add_argument("--test-size", type=_size, help="rows (>= 1) or fraction (< 1); default 3000, or 0.1 with --limit")
    data.add_argument("--validation-size", type=_size,
                      help="rows (>= 1) or fraction (< 1); default 2000, or 0.1 with --limit")
    data.add_argument("--overwrite", action="store_true", help="replace an existing data directory")

    train = sub.add_parser("train", help="fine-tune a sequence classifier and write a checkpoint with metrics.json")
    train.add_argument("--data", type=Path, required=True, help="directory with train/validation/test.csv")
    train.add_argument("--out", type=Path, required=True, help="checkpoint directory (written atomically)")
    train.add_argument("--base", type=Path, help="base checkpoint directory (default: packaged all-MiniLM-L6-v2)")
    train.add_argument("--epochs", type=float, default=1.0)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides --epochs)")
    train.add_argument("--max-length", type=int, default=128, help="truncate texts to this many tokens")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--eval-batch-size", type=int, default=128)
    train.add_argument("--learning-rate", type=float, default=5e-5)
    train.add_argument("--warmup-ratio", type=float, default=0.1)
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--text-column", default="text")
    train.add_argument("--label-column", default="label")
    train.add_argument("--text-pair-column", default=None, help="column with the second text of a pair (default: none)")
    train.add_argument("--limit-train", type=int, help="train on a random subset of this many rows")
    train.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                       help="auto: bf16 autocast where the hardware does bf16 natively (measured faster, same accuracy)")
    train.add_argument("--no-bf16", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")
    train.add_argument("--no-group-by-length", dest="group_by_length", action="store_false",
                       help="do not batch texts of similar length together")
    train.add_argument("--threads", type=int, help="torch threads (default: the CPUs this process may use)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
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

            config = DataConfig(out=ns.out, limit=ns.limit, seed=ns.seed, test_size=ns.test_size,
                                validation_size=ns.validation_size, overwrite=ns.overwrite)
            _print_split_table(make_splits(config))
            return 0
        from finetune.train import Precision, TrainConfig, train

        config = TrainConfig(
            data=ns.data, out=ns.out, base=ns.base, epochs=ns.epochs, max_steps=ns.max_steps,
            max_length=ns.max_length, batch_size=ns.batch_size, eval_batch_size=ns.eval_batch_size,
            learning_rate=ns.learning_rate, warmup_ratio=ns.warmup_ratio, weight_decay=ns.weight_decay,
            seed=ns.seed, text_column=ns.text_column, label_column=ns.label_column, limit_train=ns.limit_train,
            precision=Precision(ns.precision), group_by_length=ns.group_by_length, threads=ns.threads,
            overwrite=ns.overwrite, text_pair_column=ns.text_pair_column,
        )
        _print_metrics_table(train(config))
        return 0

    return run_cli(run, user_errors=(FinetuneError,), prog=PROG)


if __name__ == "__main__":
    sys.exit(main())
