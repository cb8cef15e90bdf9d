"""Served / ceiling for several repositories of the same model, interleaved so a shared machine's load swings
hit every side alike (issue 22 item 3): each round measures the ceiling (loadtest.ceiling), then each
repository's served gRPC points (16 clients x 8 texts, 16 x 1) each followed by the ceiling again; a served
point's ratio is to the mean of the two ceilings around it. Medians over the rounds are printed and written
as JSON.

    PYTHONPATH=$PWD .venv/bin/python scripts/served_vs_ceiling.py --texts demo/data/test.csv \\
        before=demo/model_repository after=demo/repo_after [--rounds 3] [--out results/served_vs_ceiling.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

from loadtest.artifacts import read_served_repository
from loadtest.ceiling import CeilingModel, measure_ceiling
from loadtest.clients import closed_loop
from loadtest.serve import served
from loadtest.texts import load_texts
from serving.contract import Protocol

SHAPES = ((16, 8), (16, 1))


def _ceiling(model: CeilingModel, texts: list[str], seconds: float) -> float:
    return measure_ceiling(model, texts, 0, seconds).seq_per_s


def _round(repos: dict[str, Path], model: CeilingModel, texts: list[str], args) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    last = _ceiling(model, texts, args.ceiling_seconds)
    for name, repo in repos.items():
        with served(repo) as endpoints:
            url = endpoints.url(Protocol.GRPC)
            for conc, k in SHAPES:
                r = closed_loop(Protocol.GRPC, url, texts, None, concurrency=conc, texts_per_request=k,
                                duration_s=args.served_seconds, warmup_s=2.0)
                now = _ceiling(model, texts, args.ceiling_seconds)
                ref = (last + now) / 2
                out.setdefault(name, {})[f"{conc}x{k}"] = r.seq_per_s / ref
                out[name][f"{conc}x{k} seq/s"] = r.seq_per_s
                out[name][f"{conc}x{k} ceiling"] = ref
                logging.info("%s %dx%d: %.1f seq/s, ceiling %.1f -> %.2f", name, conc, k, r.seq_per_s, ref,
                             r.seq_per_s / ref)
                last = now
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repos", nargs="+", help="NAME=REPOSITORY (the same model in each)")
    ap.add_argument("--texts", type=Path, default=None)
    ap.add_argument("--n-texts", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--served-seconds", type=float, default=8.0)
    ap.add_argument("--ceiling-seconds", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=Path("results/served_vs_ceiling.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    repos = {name: Path(path) for name, path in (r.split("=", 1) for r in args.repos)}
    info = read_served_repository(next(iter(repos.values())))
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
                                      f" of ceiling {vals[f'{conc}x{k} ceiling']:.1f}" for conc, k in SHAPES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
