"""Per-row speed with and without the SkipLayerNormalization fusion (exporter/optimize.py SKIP_LAYER_NORM).

Exports CHECKPOINT once, fuses it twice (O2 with and without SkipLayerNormalization), makes each one's
dynamic int8 the way the exporter does, and times every graph per row (one text at a time, unpadded, a
1-thread session as the CPU server opens it: serving/models/runtime.py ``ort_session``), the graphs taking
turns every ``--block`` rows, in CPU seconds of this thread, so a drift in the machine's speed falls on all
of them.
Prints a Markdown table (median rows per CPU-second, the ratio, the largest output difference between the
two graphs) and writes it as JSON with ``--out``.

    PYTHONPATH=$PWD .venv/bin/python scripts/skip_layer_norm_speed.py demo/finetuned_model --texts demo/data/test.csv
"""
from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.atomic import atomic_write_text  # noqa: E402
from exporter import int8  # noqa: E402
from exporter.choices import Target  # noqa: E402
from exporter.export import export_onnx  # noqa: E402
from exporter.optimize import optimize_onnx  # noqa: E402
from serving.models import runtime  # noqa: E402


def graphs(checkpoint: Path, work: Path) -> dict[tuple[str, bool], Path]:
    """(variant, fused SkipLayerNormalization) -> model.onnx: fp32 and dynamic int8, both fusion settings."""
    raw = export_onnx(checkpoint, work / "raw").parent
    settings = int8.QuantSettings.from_preset(int8.cpu_preset(), is_static=False)
    out = {}
    for fused in (True, False):
        fp32, _ = optimize_onnx(raw, work / f"fp32-{fused}", Target.CPU, skip_layer_norm=fused)
        q = work / f"int8-{fused}" / "model.onnx"
        q.parent.mkdir()
        int8.quantize_here("dynamic", fp32, q, settings, exclude=[])
        out[("fp32", fused)], out[("int8_dynamic", fused)] = fp32, q
    return out


def csv_texts(ap: argparse.ArgumentParser, path: Path, limit: int) -> list[str]:
    """The first ``limit`` texts of a CSV's ``text`` column; a missing file or column is a usage error."""
    if not path.is_file():
        ap.error(f"{path}: no such file")
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.DictReader(f)
        if "text" not in (rows.fieldnames or ()):
            ap.error(f"{path}: no 'text' column")
        return [r["text"] for r in rows][:limit]


def interleaved_rates(sessions: dict, feeds: list[dict], block: int) -> dict:
    """Rows per CPU-second of each session, the sessions taking turns every ``block`` rows (each block runs
    on every session before the next block), so a drift in the machine's speed falls on all of them alike
    while each session's weights stay warm in the caches through its block."""
    spent = dict.fromkeys(sessions, 0)
    for start in range(0, len(feeds), block):
        for key, session in sessions.items():
            t0 = time.thread_time_ns()
            for feed in feeds[start:start + block]:
                session.run(None, feed)
            spent[key] += time.thread_time_ns() - t0
    return {key: len(feeds) / (ns / 1e9) for key, ns in spent.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--texts", type=Path, required=True, help="CSV with a text column")
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--block", type=int, default=25, help="rows a graph runs before the next takes its turn")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not (args.checkpoint / "config.json").is_file():
        ap.error(f"{args.checkpoint}: not a checkpoint directory (no config.json)")
    texts = csv_texts(ap, args.texts, args.rows)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        paths = graphs(args.checkpoint, Path(tmp))
        sessions = {key: runtime.ort_session(p, 1) for key, p in paths.items()}  # as served
        names = [i.name for i in next(iter(sessions.values())).get_inputs()]
        feeds = [{n: e[n].astype(np.int64) for n in names}
                 for e in (tok(t, truncation=True, max_length=args.max_length, return_tensors="np") for t in texts)]
        outs = {key: np.concatenate([s.run(None, f)[0] for f in feeds]) for key, s in sessions.items()}  # warm
        rates: dict = {key: [] for key in sessions}
        for _ in range(args.rounds):
            for key, rate in interleaved_rates(sessions, feeds, args.block).items():
                rates[key].append(rate)
    table = {}
    for variant in ("fp32", "int8_dynamic"):
        on, off = (statistics.median(rates[(variant, f)]) for f in (True, False))
        diff = float(np.abs(outs[(variant, True)] - outs[(variant, False)]).max())
        table[variant] = {"fused_rows_per_cpu_s": on, "unfused_rows_per_cpu_s": off, "ratio": off / on,
                          "max_abs_diff": diff}
    print("| variant | with SkipLayerNormalization | without | ratio | max abs diff of the first output |")
    print("|---|---|---|---|---|")
    for variant, r in table.items():
        print(f"| {variant} | {r['fused_rows_per_cpu_s']:.1f} | {r['unfused_rows_per_cpu_s']:.1f} | "
              f"{r['ratio']:.2f}x | {r['max_abs_diff']:.2e} |")
    if args.out:
        atomic_write_text(args.out, json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
