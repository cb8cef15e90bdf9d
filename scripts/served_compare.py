"""Benchmark: served texts/s of two repositories side by side (both servers up, interleaved rounds).

    python scripts/served_compare.py REPO_A REPO_B [--model embedder] [--texts data/test.csv]
                                     [--shapes 16x8,16x1,4x1] [--rounds 3] [--seconds 6]

E.g. the same model built twice, ONNX Runtime vs OpenVINO selected (docs/EXPORTER.md, "OpenVINO variants"):
    python -m exporter build M --task embedding --eval-data data/test.csv --out b-ort --repository r-ort --variant int8
    python -m exporter build M --task embedding --eval-data data/test.csv --out b-ov --repository r-ov --variant ov_fp32
Each shape ``CxN`` is C gRPC asyncio clients sending N texts per request, closed loop, for --seconds; the two
servers take turns shape by shape, round by round, so a shared machine's load falls on both. Prints the
median texts/s of each and the ratio B/A with every round's figure.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


async def closed_loop(url: str, model: str, texts: list[str], clients: int, per_request: int, seconds: float) -> float:
    """Texts/s of ``clients`` gRPC asyncio clients, each sending ``per_request`` texts at a time."""
    import numpy as np
    import tritonclient.grpc.aio as grpcaio

    client = grpcaio.InferenceServerClient(url)
    done, stop = 0, time.perf_counter() + seconds

    async def user(k: int) -> None:
        nonlocal done
        i = k * per_request
        while time.perf_counter() < stop:
            rows = [texts[(i + j) % len(texts)] for j in range(per_request)]
            i += clients * per_request
            tensor = grpcaio.InferInput("TEXT", [len(rows), 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[r.encode()] for r in rows], dtype=np.object_))
            await client.infer(model, [tensor])
            done += len(rows)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(user(k) for k in range(clients)))
    finally:
        await client.close()
    return done / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("repo_a", type=Path)
    parser.add_argument("repo_b", type=Path)
    parser.add_argument("--model", default="embedder")
    parser.add_argument("--texts", type=Path, default=ROOT / "data" / "test.csv")
    parser.add_argument("--shapes", default="16x8,16x1,4x1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    from serving.server import LocalTritonServer, ServerConfig

    with open(args.texts, newline="", encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh) if r["text"].strip()][:512]
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    rates: dict[tuple, list[float]] = {(k, s): [] for k in "ab" for s in shapes}
    with LocalTritonServer(ServerConfig(args.repo_a, startup_timeout_s=180)) as a, \
            LocalTritonServer(ServerConfig(args.repo_b, startup_timeout_s=180)) as b:
        urls = {"a": a.grpc_url, "b": b.grpc_url}
        for url in urls.values():  # warm-up
            asyncio.run(closed_loop(url, args.model, texts, 4, 1, 2.0))
        for _ in range(args.rounds):
            for shape in shapes:
                for key, url in urls.items():
                    rates[(key, shape)].append(asyncio.run(closed_loop(url, args.model, texts, *shape, args.seconds)))
    print(f"A = {args.repo_a}, B = {args.repo_b}; {args.rounds} rounds x {args.seconds:g} s, interleaved")
    for shape in shapes:
        med_a, med_b = (statistics.median(rates[(k, shape)]) for k in "ab")
        rounds = {k: [round(x) for x in rates[(k, shape)]] for k in "ab"}
        print(f"{shape[0]} clients x {shape[1]} texts: A {med_a:.0f} texts/s, B {med_b:.0f}, B/A {med_b / med_a:.2f} "
              f"(rounds {rounds})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
