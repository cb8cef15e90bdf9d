"""`python -m loadtest {run,bench,tune,soak}`: parse, build a config, call one library function, print a table."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from common.cli import run_cli, setup_logging
from loadtest.errors import LoadtestError

PROG = "python -m loadtest"


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from exc


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    from rich.console import Console
    from rich.table import Table

    from loadtest.report import fmt

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(c) for c in row))
    Console(file=sys.stdout, width=160).print(table)


def _run(args: argparse.Namespace) -> int:
    from loadtest.run import RunConfig, run_loadtest

    cfg = RunConfig(
        users=args.users, spawn_rate=args.spawn_rate, duration=args.duration, protocol=args.protocol,
        texts_per_request=args.texts_per_request, start_server=args.start_server, repository=args.repository,
        host=args.host, texts=args.texts, out=args.out, processes=args.processes, request_rate=args.request_rate,
        fail_on_error=args.fail_on_error,
    )
    s = run_loadtest(cfg)
    lat = s["latency_ms"]
    rows = [(n["name"], n["requests"], n["failures"], n["requests_per_s"], n["latency_ms"]["p50"],
             n["latency_ms"]["p95"], n["latency_ms"]["p99"]) for n in s["per_name"]]
    rows.append(("total", s["requests"], s["failures"], s["requests_per_s"], lat["p50"], lat["p95"], lat["p99"]))
    _print_table(f"Locust {s['protocol']}: {s['users']} users, {s['duration_s']:g} s ({s['texts_per_s']:.1f} texts/s)",
                 ("request", "count", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"), rows)
    for f in s["top_failures"][:3]:
        print(f"failure x{f['occurrences']}: {f['error']}")
    print(f"reports: {s['out']}")
    if cfg.fail_on_error and s["failures"] > 0:
        print(f"{PROG}: error: {s['failures']} of {s['requests']} requests failed", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    from loadtest.bench import BenchConfig, run_bench

    cfg = BenchConfig(
        checkpoint=args.checkpoint, build=None if args.no_build else args.build, repository=args.repository,
        texts=args.texts, n_texts=args.n_texts, threads=args.threads, batch_size=args.batch_size,
        concurrency=args.concurrency, texts_per_request=args.texts_per_request,
        single_text_concurrency=args.single_text_concurrency, served_seconds=args.served_seconds,
        open_loop_seconds=args.open_loop_seconds, protocols=tuple(args.protocols.split(",")), bf16=args.bf16,
        pipeline_batch1=not args.no_batch1, served=not args.no_served, out=args.out,
    )
    result = run_bench(cfg)
    header, rows = result["table"]
    _print_table(f"bench: {result['machine']['n_texts']} texts, {cfg.threads} thread(s)", header, rows)
    for line in result["goal_lines"]:
        print(line)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"reports: {result['out']}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from loadtest.tune import TuneConfig, parse_ints, parse_layouts, run_tune

    cfg = TuneConfig(
        repository=args.repository, texts=args.texts, duration_per_trial=args.duration_per_trial,
        concurrency=args.concurrency, texts_per_request=args.texts_per_request, protocol=args.protocol,
        layouts=parse_layouts(args.layouts), queue_delays_us=parse_ints(args.queue_delays_us, "--queue-delays-us"),
        max_batch_sizes=parse_ints(args.max_batch_sizes, "--max-batch-sizes", 1), apply=not args.no_apply,
        out=args.out,
    )
    s = run_tune(cfg)
    header, rows = s["table"]
    _print_table("tune trials", header, rows)
    print(f"best: trial {s['best']['trial']} ({s['best']['seq_per_s']:.1f} seq/s)"
          + (f", written into {s['repository']}" if s["applied"] else ", not applied (--no-apply)"))
    print(f"reports: {s['out']}")
    return 0


def _soak(args: argparse.Namespace) -> int:
    from loadtest.soak import SoakConfig, run_soak

    cfg = SoakConfig(
        repository=args.repository, duration=args.duration, saturation_duration=args.saturation_duration,
        saturation_users=args.saturation_users, users=args.users, load_fraction=args.load_fraction,
        protocol=args.protocol, texts_per_request=args.texts_per_request, texts=args.texts, warmup=args.warmup,
        window=args.window, max_p99_drift=args.max_p99_drift, max_rss_growth=args.max_rss_growth, out=args.out,
    )
    s = run_soak(cfg)
    p99, rss, soak = s["p99_ms"], s["rss_mb"], s["soak"]
    _print_table(f"soak: {soak['duration_s']:g} s at {cfg.load_fraction:.0%} of {s['saturation']['requests_per_s']:.1f} req/s",
                 ("measure", "value"),
                 [("requests", soak["requests"]), ("failures", soak["failures"]), ("req/s", soak["requests_per_s"]),
                  ("p99 ms first window", p99["first"]), ("p99 ms last window", p99["last"]),
                  ("p99 drift %", None if p99["drift"] is None else 100 * p99["drift"]),
                  ("RSS MiB first window", rss["first"]), ("RSS MiB last window", rss["last"]),
                  ("RSS growth %", None if rss["growth"] is None else 100 * rss["growth"])])
    print(f"reports: {s['out']}")
    if not s["passed"]:
        print(f"{PROG}: error: soak failed: {'; '.join(s['reasons'])}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Load tests and benchmarks of the served classifier.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="headless Locust run: CSV/HTML reports, summary.json, a plot")
    run.add_argument("--users", type=int, default=32)
    run.add_argument("--spawn-rate", type=float, default=8.0)
    run.add_argument("--duration", default="60s", help="e.g. 60s, 5m")
    run.add_argument("--protocol", choices=["http", "grpc"], default="http")
    run.add_argument("--texts-per-request", type=int, default=1)
    run.add_argument("--start-server", action="store_true", help="start a local tritonserver on --repository")
    run.add_argument("--repository", type=Path, default=Path("model_repository"))
    run.add_argument("--host", help="server URL: http://HOST:PORT (http) or HOST:PORT (grpc)")
    run.add_argument("--texts", type=Path, help="CSV with a text column (default data/test.csv, else the corpus)")
    run.add_argument("--out", type=Path, help="report directory (default results/loadtest-<time>/)")
    run.add_argument("--processes", type=int, help="Locust worker processes (distributed mode; -1: one per core)")
    run.add_argument("--request-rate", type=float, default=0.0, help="requests/s per user (0: closed loop)")
    run.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="PyTorch pipeline vs ONNX Runtime vs served, side by side")
    bench.add_argument("--checkpoint", type=Path, default=Path("finetuned_model"))
    bench.add_argument("--build", type=Path, default=Path("build"))
    bench.add_argument("--no-build", action="store_true", help="skip the in-process ONNX Runtime variants")
    bench.add_argument("--repository", type=Path, default=Path("model_repository"))
    bench.add_argument("--no-served", action="store_true", help="skip the served deployment")
    bench.add_argument("--texts", type=Path)
    bench.add_argument("--n-texts", type=int, default=512)
    bench.add_argument("--threads", type=int, default=2, help="thread budget of every in-process backend")
    bench.add_argument("--batch-size", type=int, default=32, help="in-process batch size")
    bench.add_argument("--concurrency", type=_csv_ints, default=(1, 4, 16, 32))
    bench.add_argument("--texts-per-request", type=int, default=8, help="texts per served request")
    bench.add_argument("--single-text-concurrency", type=int, default=16,
                       help="concurrency of the 1-text-per-request served point")
    bench.add_argument("--served-seconds", type=float, default=10.0, help="measured seconds per served point")
    bench.add_argument("--open-loop-seconds", type=float, default=15.0)
    bench.add_argument("--protocols", default="http,grpc")
    bench.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                       help="PyTorch bf16 autocast: auto = only with AMX")
    bench.add_argument("--no-batch1", action="store_true", help="skip the batch-1 pipeline")
    bench.add_argument("--out", type=Path)
    bench.set_defaults(func=_bench)

    tune = sub.add_parser("tune", help="sweep the served configuration and write the best into the repository")
    tune.add_argument("--repository", type=Path, default=Path("model_repository"))
    tune.add_argument("--texts", type=Path)
    tune.add_argument("--duration-per-trial", default="10s")
    tune.add_argument("--concurrency", type=int, default=16)
    tune.add_argument("--texts-per-request", type=int, default=8)
    tune.add_argument("--protocol", choices=["http", "grpc"], default="grpc")
    tune.add_argument("--layouts", default="1x2,2x1,1x1", help="encoder INSTANCESxINTRA_OP_THREADS list")
    tune.add_argument("--queue-delays-us", default="500,8000", help="max_queue_delay values to try (stage 2)")
    tune.add_argument("--max-batch-sizes", default="32,128", help="max_batch_size values to try (stage 2)")
    tune.add_argument("--no-apply", action="store_true", help="only report; leave the repository as it is")
    tune.add_argument("--out", type=Path)
    tune.set_defaults(func=_tune)

    soak = sub.add_parser("soak", help="hold 70%% of the measured saturation for a long time; fail on errors, "
                                       "p99 drift or memory growth")
    soak.add_argument("--repository", type=Path, default=Path("model_repository"))
    soak.add_argument("--duration", default="600", help="soak length, e.g. 600, 10m (default 10 minutes)")
    soak.add_argument("--saturation-duration", default="30s", help="closed-loop run that measures saturation")
    soak.add_argument("--saturation-users", type=int, default=16)
    soak.add_argument("--users", type=int, default=16, help="constant-throughput users of the soak")
    soak.add_argument("--load-fraction", type=float, default=0.7, help="share of saturation to hold")
    soak.add_argument("--protocol", choices=["http", "grpc"], default="http")
    soak.add_argument("--texts-per-request", type=int, default=1)
    soak.add_argument("--texts", type=Path)
    soak.add_argument("--warmup", default="60s", help="ignored at the start before the first window")
    soak.add_argument("--window", default="60s", help="length of the first and last windows compared")
    soak.add_argument("--max-p99-drift", type=float, default=0.10)
    soak.add_argument("--max-rss-growth", type=float, default=0.10)
    soak.add_argument("--out", type=Path, help="report directory (default results/soak-<time>/)")
    soak.set_defaults(func=_soak)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    from serving.errors import ServingError

    return run_cli(lambda: args.func(args), user_errors=(LoadtestError, ServingError), prog=PROG)
