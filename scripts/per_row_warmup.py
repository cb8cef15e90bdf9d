"""Per-row speed of a build's variants three ways, interleaved, medians of rounds (issue 22 item 1):

- ``first-call``: the old warm-up (only the first call unmeasured), 1 s timed: each new length's first call
  is inside the timing (OpenVINO compiles per new input shape);
- ``per-shape``: exporter.speed.measure_per_row as the build runs it now (each distinct length once,
  unmeasured), 1 s timed;
- ``steady``: after one untimed pass over every text, ``--steady-seconds`` timed (the reference).

Each measure opens its own session, as the build does.

    python scripts/per_row_warmup.py BUILD_DIR CHECKPOINT TEST_CSV [--variants fp32,int8_dynamic,...] [--rounds 3]
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from transformers import AutoTokenizer

    from exporter import parity, speed
    from exporter.config import Precision

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build", type=Path)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("texts", type=Path)
    ap.add_argument("--variants", default="fp32,int8_dynamic,int8_static,ov_fp32,ov_int8")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rows", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--steady-seconds", type=float, default=4.0)
    args = ap.parse_args()
    with open(args.texts, newline="", encoding="utf-8") as fh:
        texts = [row["text"] for row in csv.DictReader(fh)][:args.rows]
    encode = speed.encoder(AutoTokenizer.from_pretrained(args.checkpoint), args.max_length)
    names = [n for n in args.variants.split(",") if (args.build / n / "model.onnx").is_file()]

    def runner(name):
        precision = Precision.INT8 if "int8" in name else Precision.FP32
        return speed.ort_runner(parity.session(args.build / name / "model.onnx", precision, threads=1))

    got = {(n, how): [] for n in names for how in ("first-call", "per-shape", "steady")}
    for _ in range(args.rounds):
        for n in names:
            got[n, "first-call"].append(speed.measure_per_row(runner(n), encode, texts, args.seconds,
                                                              shape=lambda row: 0).throughput_seq_s)
            got[n, "per-shape"].append(speed.measure_per_row(runner(n), encode, texts, args.seconds).throughput_seq_s)
            run = runner(n)
            for text in texts:
                run(encode(text))
            got[n, "steady"].append(speed.measure_per_row(run, encode, texts, args.steady_seconds).throughput_seq_s)
    print("| variant | first call only warmed, 1 s | each length warmed, 1 s | after a full pass, "
          f"{args.steady_seconds:g} s | per-shape / steady |")
    print("|---|---|---|---|---|")
    for n in names:
        med = {how: statistics.median(got[n, how]) for how in ("first-call", "per-shape", "steady")}
        print(f"| {n} | {med['first-call']:.1f} | {med['per-shape']:.1f} | {med['steady']:.1f} | "
              f"{med['per-shape'] / med['steady']:.2f} |")
    print("rounds:", {f"{n}/{how}": v for (n, how), v in got.items()})


if __name__ == "__main__":
    main()
