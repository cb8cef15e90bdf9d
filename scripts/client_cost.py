"""The load generator's own CPU per request, old client vs new, in alternating rounds against ONE server (issue 22
item 3): each side runs ``loadtest.clients.closed_loop`` over gRPC in a child process whose code is either this
tree or a git ref's ``loadtest``/``serving``/``common`` (``git archive``); the child reports served texts/s and its
own CPU seconds (every thread: asyncio, grpc's threads) per request. Medians over the rounds are printed and
written as JSON.

    PYTHONPATH=$PWD .venv/bin/python scripts/client_cost.py --repository demo/model_repository \\
        --texts demo/data/test.csv [--baseline-ref main] [--rounds 5] [--seconds 8] [--shapes 16x1,16x8]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = """
import json, sys, time
from loadtest.clients import closed_loop
from loadtest.texts import load_texts
url, csv, conc, k, secs, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), int(sys.argv[6])
texts = list(load_texts(csv).sample(n, seed=0).texts)
closed_loop("grpc", url, texts, None, concurrency=conc, texts_per_request=k, duration_s=1.0, warmup_s=0.0)
c0 = time.process_time()
r = closed_loop("grpc", url, texts, None, concurrency=conc, texts_per_request=k, duration_s=secs, warmup_s=0.0)
cpu = time.process_time() - c0
print(json.dumps({"seq_per_s": r.seq_per_s, "requests": r.requests, "failures": r.failures,
                  "client_ms_per_request": 1e3 * cpu / max(r.requests, 1), "client_cores": cpu / secs}))
"""


def _baseline_tree(ref: str, into: Path) -> Path:
    """The ref's Python packages the client needs, extracted under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "loadtest", "serving", "common"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _side(code: Path, url: str, args, conc: int, k: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code))
    out = subprocess.run([sys.executable, "-c", CHILD, url, str(args.texts), str(conc), str(k), str(args.seconds),
                          str(args.n_texts)], env=env, cwd=code, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure(sides: dict[str, Path], url: str, args, shapes: list[tuple[int, int]]) -> list[dict]:
    rounds = []
    for i in range(args.rounds):
        order = list(sides.items()) if i % 2 == 0 else list(reversed(sides.items()))
        rnd: dict[str, dict] = {}
        for conc, k in shapes:
            for name, code in order:
                r = _side(code, url, args, conc, k)
                rnd[f"{name} {conc}x{k}"] = r
                logging.info("round %d %s %dx%d: %.1f texts/s, client %.3f ms CPU/request (%.3f cores), %d failed",
                             i + 1, name, conc, k, r["seq_per_s"], r["client_ms_per_request"], r["client_cores"],
                             r["failures"])
        rounds.append(rnd)
    return rounds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repository", type=Path, required=True)
    ap.add_argument("--texts", type=Path, required=True)
    ap.add_argument("--baseline-ref", default="main")
    ap.add_argument("--n-texts", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--shapes", default="16x1,16x8")
    ap.add_argument("--out", type=Path, default=Path("results/client_cost.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from loadtest.serve import served

    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    args.texts = args.texts.absolute()
    with tempfile.TemporaryDirectory() as tmp, served(args.repository) as endpoints:
        sides = {args.baseline_ref: _baseline_tree(args.baseline_ref, Path(tmp)), "this tree": ROOT}
        rounds = _measure(sides, endpoints.grpc_url, args, shapes)
    keys = rounds[0].keys()
    medians = {key: {m: statistics.median(r[key][m] for r in rounds) for m in ("seq_per_s", "client_ms_per_request",
                                                                             "client_cores")} for key in keys}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rounds": rounds, "medians": medians}, indent=2) + "\n")
    for key, m in medians.items():
        print(f"{key}: {m['seq_per_s']:.1f} texts/s, client {m['client_ms_per_request']:.3f} ms CPU/request "
              f"({m['client_cores']:.3f} cores)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
