"""Served / ceiling for several repositories of the same model, interleaved so a shared machine's load swings
hit every side alike (issue 22 item 3): each round measures the ceiling (loadtest.ceiling), then each
repository's served gRPC points (16 clients x 8 texts, 16 x 1) each followed by the ceiling again; a served
point's ratio is to the mean of the two ceilings around it. Each served point also records the cores its
client, tritonserver and stubs used, and its CPU efficiency: texts per CPU-second of that whole stack over
the ceiling's rows per CPU-second (``rows_per_cpu_second``: one pinned process per core, as the ceiling),
which a machine shared with others disturbs far less than the wall-clock ratio (on an idle machine:
ratio ~= efficiency x cores used / 2). Medians over the rounds are printed and written as JSON. A side may
add tritonserver flags after its repository, comma-separated
(``pool=demo/model_repository,--grpc-infer-allocation-pool-size=32``), so server settings are compared on
one repository.

    PYTHONPATH=$PWD .venv/bin/python scripts/served_vs_ceiling.py --texts demo/data/test.csv \\
        before=demo/model_repository after=demo/repo_after [--rounds 3] [--out results/served_vs_ceiling.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

from loadtest import cpu
from loadtest.artifacts import read_served_repository
from loadtest.ceiling import CeilingModel, RowRunner, measure_ceiling, usable_cores
from loadtest.clients import closed_loop
from loadtest.serve import served
from loadtest.texts import load_texts
from serving.contract import Protocol

SHAPES = ((16, 8), (16, 1))


def _ceiling(model: CeilingModel, texts: list[str], seconds: float) -> float:
    return measure_ceiling(model, texts, 0, seconds).seq_per_s


def _cpu_rows(job: tuple) -> tuple[int, float]:
    """(rows, CPU seconds) of one process running the served per-row work until ``cpu_seconds`` of CPU."""
    model, texts, cpu_seconds, core = job
    if core is not None:
        os.sched_setaffinity(0, {core})
    run = RowRunner(model)
    for text in texts[:64]:
        run(text)
    rows, c0 = 0, time.process_time()
    while time.process_time() - c0 < cpu_seconds:
        for text in texts:
            run(text)
        rows += len(texts)
    return rows, time.process_time() - c0


def rows_per_cpu_second(model: CeilingModel, texts: list[str], cpu_seconds: float) -> float:
    """The ceiling's work per CPU-second: RowRunner (the served per-row work) in one pinned process per core at
    once, as the ceiling runs, rows over the processes' CPU time. A machine shared with others changes how
    much CPU a side gets far more than what a CPU-second of it does."""
    cores = usable_cores()
    pinned = model.intra_op_threads == 1
    n = len(cores) if pinned else 1
    with multiprocessing.get_context("spawn").Pool(n) as pool:
        got = pool.map(_cpu_rows, [(model, texts, cpu_seconds, cores[i] if pinned else None) for i in range(n)])
    return sum(rows for rows, _ in got) / sum(cpu for _, cpu in got)


def _round(repos: dict[str, tuple[Path, tuple[str, ...]]], model: CeilingModel, texts: list[str], args) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    per_cpu_s = rows_per_cpu_second(model, texts, args.ceiling_seconds)
    logging.info("ceiling: %.1f rows per CPU-second", per_cpu_s)
    last = _ceiling(model, texts, args.ceiling_seconds)
    for name, (repo, flags) in repos.items():
        with served(repo, extra_args=flags) as endpoints:
            url = endpoints.url(Protocol.GRPC)
            for conc, k in SHAPES:
                closed_loop(Protocol.GRPC, url, texts, None, concurrency=conc, texts_per_request=k,
                            duration_s=2.0, warmup_s=0.0)
                before = cpu.snapshot(endpoints.pid)
                r = closed_loop(Protocol.GRPC, url, texts, None, concurrency=conc, texts_per_request=k,
                                duration_s=args.served_seconds, warmup_s=0.0)
                cores = cpu.cores_used(before, cpu.snapshot(endpoints.pid))
                now = _ceiling(model, texts, args.ceiling_seconds)
                ref = (last + now) / 2
                out.setdefault(name, {})[f"{conc}x{k}"] = r.seq_per_s / ref
                out[name][f"{conc}x{k} seq/s"] = r.seq_per_s
                out[name][f"{conc}x{k} ceiling"] = ref
                for role in ("client", "tritonserver", "total"):
                    out[name][f"{conc}x{k} cores {role}"] = cores.get(role, 0.0)
                # texts per CPU-second of the whole served stack (client, server, stubs) / the ceiling's
                out[name][f"{conc}x{k} cpu efficiency"] = r.seq_per_s / max(cores.get("total", 0.0), 1e-9) / per_cpu_s
                out[name][f"{conc}x{k} ceiling rows per cpu-s"] = per_cpu_s
                logging.info("%s %dx%d: %.1f seq/s, ceiling %.1f -> %.2f; cores %s", name, conc, k, r.seq_per_s, ref,
                             r.seq_per_s / ref, cores)
                last = now
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repos", nargs="+", help="NAME=REPOSITORY[,--tritonserver-flag=value...] (the same model in each)")
    ap.add_argument("--texts", type=Path, default=None)
    ap.add_argument("--n-texts", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--served-seconds", type=float, default=8.0)
    ap.add_argument("--ceiling-seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("results/served_vs_ceiling.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    repos = {name: (Path(spec.split(",")[0]), tuple(spec.split(",")[1:]))
             for name, spec in (r.split("=", 1) for r in args.repos)}
    info = read_served_repository(next(iter(repos.values()))[0])
    model = CeilingModel(info.onnx, info.tokenizer_dir, int(info.config.get("max_length", 128)),
                         intra_op_threads=info.intra_op_threads)
    texts = list(load_texts(args.texts).sample(args.n_texts, seed=0).texts)
    rounds = [_round(repos, model, texts, args) for _ in range(args.rounds)]
    summary = {name: {key: statistics.median(r[name][key] for r in rounds) for key in rounds[0][name]}
               for name in repos}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rounds, "medians": summary}, indent=2) + "\n")
    for name, vals in summary.items():
        print(f"{name}: " + ", ".join(f"{conc}x{k} {vals[f'{conc}x{k} seq/s']:.1f} seq/s = {vals[f'{conc}x{k}']:.2f}"
                                      f" of ceiling {vals[f'{conc}x{k} ceiling']:.1f} (CPU efficiency "
                                      f"{vals[f'{conc}x{k} cpu efficiency']:.2f}, {vals[f'{conc}x{k} cores total']:.2f}"
                                      " cores)" for conc, k in SHAPES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
