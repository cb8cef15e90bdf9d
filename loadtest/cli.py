"""`python -m loadtest {run,bench,gateway,profile,tune,soak}`: parse, build a config, call one library function,
print a table."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from common.cli import command_parser, prog_name, run_cli, setup_logging
from common.dataclass_cli import Flag, add_config_arguments, config_from_args
from loadtest.bench import BenchConfig, run_bench
from loadtest.errors import LoadtestError
from loadtest.gateway_bench import GatewayBenchConfig, run_gateway_bench, summary_lines, table
from loadtest.report import fmt
from loadtest.profile import ProfileConfig, run_profile
from loadtest.run import RunConfig, run_loadtest
from loadtest.soak import SoakConfig, run_soak
from loadtest.tune import TuneConfig, parse_ints, parse_layouts, run_tune
from serving.errors import ServingError

PROG = "python -m loadtest"


def _print_table(title: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(fmt(c) for c in row))
    Console(file=sys.stdout, width=160).print(table)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(RunConfig, args)
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
        print(f"{prog_name(PROG)}: error: {s['failures']} of {s['requests']} requests failed", file=sys.stderr)
        return 1
    return 0


def _bench(args: argparse.Namespace) -> int:
    cfg = config_from_args(BenchConfig, args)
    result = run_bench(cfg)
    header, rows = result["table"]
    _print_table(f"bench: {result['machine']['n_texts']} texts, {cfg.threads} thread(s)", header, rows)
    for line in result["check_lines"]:
        print(line)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"reports: {result['out']}")
    if result["failed"]:
        print(f"{prog_name(PROG)}: error: threshold not met: {'; '.join(result['failed'])}", file=sys.stderr)
        return 1
    return 0


def _gateway(args: argparse.Namespace) -> int:
    cfg = config_from_args(GatewayBenchConfig, args)
    result = run_gateway_bench(cfg)
    _print_table(f"gateway vs direct gRPC ({result['model']}, {cfg.rounds} alternating rounds, medians)",
                 *table(result))
    for line in summary_lines(result):
        print(line)
    print(f"reports: {result['out']}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    cfg = config_from_args(ProfileConfig, args)
    result = run_profile(cfg)
    _print_table(f"profile: {result['title']}", *result["table"])
    print(f"reports: {result['out']}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    cfg = config_from_args(TuneConfig, args)
    s = run_tune(cfg)
    header, rows = s["table"]
    _print_table("tune trials", header, rows)
    print(f"best: trial {s['best']['trial']} ({s['best']['seq_per_s']:.1f} seq/s)"
          + (f", written into {s['repository']}" if s["applied"] else ", not applied (--no-apply)"))
    print(f"reports: {s['out']}")
    return 0


def _soak(args: argparse.Namespace) -> int:
    cfg = config_from_args(SoakConfig, args)
    s = run_soak(cfg)
    p99, rss, soak = s["p99_ms"], s["rss_mb"], s["soak"]
    _print_table(f"soak: {soak['duration_s']:g} s at {cfg.load_fraction:.0%} of {s['saturation']['requests_per_s']:.1f} req/s",
                 ("measure", "value"),
                 [("requests", soak["requests"]), ("failures", soak["failures"]), ("req/s", soak["requests_per_s"]),
                  ("p99 ms first window", p99["first"]), ("p99 ms last window", p99["last"]),
                  ("p99 drift %", None if p99["drift"] is None else 100 * p99["drift"]),
                  ("RSS MiB first window", rss["first"]), ("RSS MiB last window", rss["last"]),
                  ("RSS growth %", None if rss["growth"] is None else 100 * rss["growth"])])
    if "chaos" in s:
        kills = s["chaos"]["kills"]
        _print_table("chaos: kill -9 -> recovered", ("at s", "killed", "recovery", "outage s"),
                     [(k["at_s"], k.get("target", "skipped"), k.get("action"), k.get("outage_s")) for k in kills])
        for e in s["chaos"].get("unplanned", []):
            print(f"unplanned recovery ({e['action']}, {e['down_s']} s): {e['reason']}")
        print(f"longest outage: {s['chaos']['longest_outage_s']} s; requests lost: {soak['failures']}")
    print(f"reports: {s['out']}")
    if not s["passed"]:
        print(f"{prog_name(PROG)}: error: soak failed: {'; '.join(s['reasons'])}", file=sys.stderr)
        return 1
    return 0


def _show_layouts(layouts) -> str:
    return ",".join(f"{instances}x{threads}" for instances, threads in layouts) or "auto"


TUNE_FLAGS = {
    "layouts": Flag(type=parse_layouts, show=_show_layouts, metavar="IxT,..."),
    "queue_delays_us": Flag(type=lambda text: parse_ints(text, "--queue-delays-us")),
    "max_batch_sizes": Flag(type=lambda text: parse_ints(text, "--max-batch-sizes", 1)),
}


def build_parser() -> argparse.ArgumentParser:
    parser, sub = command_parser(PROG, "Load tests and benchmarks of the served classifier.")

    run = sub.add_parser("run", help="headless Locust run: CSV/HTML reports, summary.json, a plot")
    add_config_arguments(run, RunConfig)
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="PyTorch pipeline vs ONNX Runtime vs served, side by side")
    add_config_arguments(bench, BenchConfig, flags={"pipeline_batch1": Flag(names=("--batch1",))})
    bench.add_argument("--no-build", dest="build", action="store_const", const=None,
                       help="skip the in-process ONNX Runtime variants")
    bench.set_defaults(func=_bench)

    gateway = sub.add_parser("gateway", help="the gateway's cost: the same requests through it and straight to "
                                             "tritonserver over gRPC, side by side")
    add_config_arguments(gateway, GatewayBenchConfig)
    gateway.set_defaults(func=_gateway)

    profile = sub.add_parser("profile", help="where each served request's time goes (front, queue, IPC, tokenizer, "
                                             "ONNX Runtime, head, metrics) under a closed load")
    add_config_arguments(profile, ProfileConfig)
    profile.set_defaults(func=_profile)

    tune = sub.add_parser("tune", help="sweep the served configuration and write the best into the repository")
    add_config_arguments(tune, TuneConfig, flags=TUNE_FLAGS)
    tune.set_defaults(func=_tune)

    soak = sub.add_parser("soak", help="hold 70%% of the measured saturation for a long time; fail on errors, "
                                       "p99 drift or memory growth")
    add_config_arguments(soak, SoakConfig)
    soak.set_defaults(func=_soak)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    return run_cli(lambda: args.func(args), user_errors=(LoadtestError, ServingError), prog=prog_name(PROG))
