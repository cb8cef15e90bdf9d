"""Measure what a long text costs, served and in-process (docs/LONG_TEXT.md quotes its output).

    python scripts/long_text_cost.py --repository model_repository [--rounds 15]

Served: one text per request over gRPC, a 500-character and a 100,000-character text (both from the example
corpus) sent alternately ``--rounds`` times each; the median latencies and their ratio. In-process: the
tokenizer step alone (serving/models/tokenization.py, the cut) on the same two texts, medians and ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _texts() -> tuple[str, str]:
    from loadtest.texts import load_texts

    words = " ".join(load_texts(None).sample(2000, seed=1).texts)
    return words[:500], (words * (100_000 // len(words) + 1))[:100_000]


def _tokenizer_ratio(repository: Path, short: str, long_: str, rounds: int) -> dict:
    from loadtest.long_docs import DefinitionRunner

    tok = DefinitionRunner(repository).tokenizer
    times = {"500": [], "100000": []}
    for _ in range(rounds):
        for key, text in (("500", short), ("100000", long_)):
            start = time.perf_counter()
            tok.encode(text)
            times[key].append(time.perf_counter() - start)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"median_ms": med, "ratio": med["100000"] / med["500"]}


def _served_ratio(repository: Path, short: str, long_: str, rounds: int) -> dict:
    import tritonclient.grpc as grpc

    from loadtest.serve import served
    from serving.contract import infer_inputs

    times = {"500": [], "100000": []}
    with served(repository) as endpoints:
        client = grpc.InferenceServerClient(endpoints.url("grpc").split("://")[-1])
        for _ in range(3):  # warm-up
            client.infer("classifier", infer_inputs(grpc, [short]))
        for _ in range(rounds):
            for key, text in (("500", short), ("100000", long_)):
                start = time.perf_counter()
                client.infer("classifier", infer_inputs(grpc, [text]))
                times[key].append(time.perf_counter() - start)
        client.close()
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    return {"median_ms": med, "ratio": med["100000"] / med["500"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    short, long_ = _texts()
    out = {"tokenizer": _tokenizer_ratio(args.repository, short, long_, args.rounds),
           "served": _served_ratio(args.repository, short, long_, args.rounds)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
