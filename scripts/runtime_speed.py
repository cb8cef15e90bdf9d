"""Benchmark: per-row seq/s of a build's variants, ONNX Runtime and OpenVINO side by side in one run.

    python scripts/runtime_speed.py BUILD_DIR [--variants fp32,int8_dynamic,ov_fp32,ov_int8] [--texts data/test.csv]
                                    [--rounds 5] [--seconds 2]

BUILD_DIR is an `exporter build` output (classifier: <variant>/model.onnx; embedder: <precision>.onnx or
<variant>/model.onnx). Each variant is opened the way the CPU server opens it (serving/models/runtime.py:
OpenVINO when its IR lies beside the ONNX file, else ONNX Runtime; 1 thread) and run one text at a time,
tokenization included (the build's per-row speed measure), in interleaved rounds of --seconds each, so that
a neighbour's load on a shared machine falls on every variant alike. Prints the median seq/s per variant
over the rounds and its ratio to the first variant, and the CPU flags that decide the precisions (amx,
avx512_bf16, avx512_vnni).
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def variant_file(build: Path, name: str) -> Path:
    for path in (build / name / "model.onnx", build / f"{name}.onnx"):
        if path.is_file():
            return path
    raise SystemExit(f"no variant {name} in {build}")


def cpu_flags() -> list[str]:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    return sorted(f for f in set(flags) if f.startswith("amx") or f in ("avx512_bf16", "avx512_vnni"))


def runner(path: Path, tokenizer, max_length: int):
    import numpy as np

    from serving.models import runtime

    sess = runtime.open_session(path, threads=1)
    names = [i.name for i in sess.get_inputs()]
    output = [sess.get_outputs()[0].name]

    def one(text: str):
        enc = tokenizer(text, truncation=True, max_length=max_length, return_tensors="np")
        return sess.run(output, {n: enc[n].astype(np.int64) for n in names})

    return one, getattr(sess, "precision", "onnxruntime")


def rate(one, texts: list[str], seconds: float) -> float:
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        one(texts[n % len(texts)])
        n += 1
    return n / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("build", type=Path)
    parser.add_argument("--variants", default="fp32,int8_dynamic,ov_fp32,ov_int8")
    parser.add_argument("--texts", type=Path, default=ROOT / "data" / "test.csv")
    parser.add_argument("--limit", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--max-length", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    with open(args.texts, newline="", encoding="utf-8") as fh:
        texts = [r["text"] for r in csv.DictReader(fh) if r["text"].strip()][:args.limit]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    tok_dir = next(p for p in (args.build / "tokenizer", args.build / names[0]) if (p / "tokenizer.json").is_file())
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    runners = {n: runner(variant_file(args.build, n), tokenizer, args.max_length) for n in names}
    for one, _ in runners.values():
        for text in texts[:50]:  # warm-up: every length class seen once
            one(text)
    rates: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(args.rounds):
        for n, (one, _) in runners.items():
            rates[n].append(rate(one, texts, args.seconds))
    print(f"cpu flags: {' '.join(cpu_flags()) or '-'}; {os.cpu_count()} cpus; {len(texts)} texts; "
          f"{args.rounds} rounds x {args.seconds:g} s per variant, interleaved")
    base = statistics.median(rates[names[0]])
    print("| variant | runtime / precision | median seq/s | min-max | ratio to " + names[0] + " |")
    print("|---|---|---|---|---|")
    for n in names:
        med = statistics.median(rates[n])
        print(f"| {n} | {runners[n][1]} | {med:.0f} | {min(rates[n]):.0f}-{max(rates[n]):.0f} | {med / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
