"""Per-row speed of dynamic int8 against how many of its most sensitive nodes it keeps in fp32.

The int8 search (exporter/int8_search.py) keeps the most sensitive nodes in fp32 until the budget holds,
then bisects between the last miss and the pass (``REFINE_ROUNDS``). This prices each fp32 node: it ranks
the build's fp32 graph the way the search does (exporter.int8.rank_sensitivity), quantizes it keeping the
first K of the ranking for each ``--keep`` K, and times every file per row (one text at a time, unpadded,
a 1-thread session as the CPU server opens it), the files taking turns every ``--block`` rows, in CPU
seconds of this thread (scripts/skip_layer_norm_speed.py's ``interleaved_rates``). Prints a Markdown table:
median rows per CPU-second, the ratio to the first K, and the agreement with the fp32 graph on the same
texts (min cosine of the first output for an embedder, largest absolute difference for a classifier).

    PYTHONPATH=$PWD .venv/bin/python scripts/int8_fp32_nodes_speed.py build-embedder --texts data/test.csv \\
        --keep 12,9,7,0
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from exporter import int8  # noqa: E402
from serving.models import runtime  # noqa: E402
from skip_layer_norm_speed import csv_texts, interleaved_rates  # noqa: E402

RANKING_ROWS = 32  # texts the ranking captures fp32 inputs on (the search ranks on 2 tuning batches of 16)


def fp32_graph(build: Path) -> Path | None:
    """The build's fp32 graph (an embedder's fp32.onnx, a classifier's fp32/model.onnx); None when absent."""
    return next((p for p in (build / "fp32.onnx", build / "fp32" / "model.onnx") if p.is_file()), None)


def quantized(fp32: Path, feeds: list[dict], keeps: list[int], work: Path) -> dict[int, Path]:
    """K -> dynamic int8 of ``fp32`` keeping the K most sensitive nodes (ranked on ``feeds``) in fp32."""
    settings = int8.QuantSettings.from_preset(int8.cpu_preset(), is_static=False)
    ranked = [r["node"] for r in int8.rank_sensitivity(fp32, feeds[:RANKING_ROWS], int8.DYNAMIC_OPS, settings)]
    out = {}
    for k in keeps:
        out[k] = work / f"keep-{k}.onnx"
        int8.quantize_here(int8.DYNAMIC, fp32, out[k], settings, exclude=ranked[:k])
    return out


def agreement(a: np.ndarray, ref: np.ndarray) -> str:
    if a.ndim == 2 and a.shape[1] > 16:  # an embedding: cosine
        cos = (a * ref).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(ref, axis=1)
        return f"min cosine {cos.min():.5f}"
    return f"max abs diff {np.abs(a - ref).max():.2e}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path, help="an `exporter build` output directory")
    ap.add_argument("--texts", type=Path, required=True, help="CSV with a text column")
    ap.add_argument("--keep", default="12,9,7,0", help="numbers of ranked nodes kept in fp32, comma-separated")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=25, help="rows a file runs before the next takes its turn")
    ap.add_argument("--max-length", type=int, default=256)
    args = ap.parse_args()
    fp32 = fp32_graph(args.build)
    if fp32 is None:
        ap.error(f"{args.build}: no fp32.onnx or fp32/model.onnx (not an exporter build directory)")
    try:
        keeps = [int(k) for k in args.keep.split(",") if k.strip()]
    except ValueError:
        keeps = []
    if not keeps or min(keeps) < 0:
        ap.error(f"--keep {args.keep!r}: comma-separated numbers of nodes, >= 0")
    texts = csv_texts(ap, args.texts, args.rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(next(p for p in (args.build / "tokenizer", fp32.parent) if p.is_dir()))
    names = [i.name for i in runtime.ort_session(fp32, 1).get_inputs()]
    feeds = [{n: e[n].astype(np.int64) for n in names if n in e}
             for e in (tok(t, truncation=True, max_length=args.max_length, return_tensors="np") for t in texts)]
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {k: runtime.ort_session(p, 1) for k, p in quantized(fp32, feeds, keeps, Path(tmp)).items()}
        ref = np.concatenate([runtime.ort_session(fp32, 1).run(None, f)[0] for f in feeds])
        outs = {k: np.concatenate([s.run(None, f)[0] for f in feeds]) for k, s in sessions.items()}  # also warms
        rates: dict = {k: [] for k in sessions}
        for _ in range(args.rounds):
            for k, rate in interleaved_rates(sessions, feeds, args.block).items():
                rates[k].append(rate)
    base = statistics.median(rates[keeps[0]])
    print(f"{fp32}: {len(feeds)} texts, {args.rounds} rounds, block {args.block}")
    print(f"| nodes kept fp32 | rows/CPU-s | ratio to {keeps[0]} kept | agreement with fp32 |")
    print("|---|---|---|---|")
    for k in keeps:
        med = statistics.median(rates[k])
        print(f"| {k} | {med:.1f} | {med / base:.2f}x | {agreement(outs[k], ref)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
