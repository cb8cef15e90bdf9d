"""Memory-heavy conversions in a process of their own: `python -m exporter.worker JOB_FILE`.

The torch exporter, the fusion passes, the fp16 converter and the quantizers each hold several copies of
the weights at once (measured on a BERT-base-sized checkpoint: +2.6 GB for the export, +3.8 GB for
ORTOptimizer's O2 pass, +0.5 GB for the fp16 conversion). Run in a worker, all of it goes back to the
system when the worker exits, and the build process only ever holds the sessions that judge a variant.
:func:`call` is the parent's side; the job file names the job and its JSON arguments.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from common.cli import setup_logging
from exporter import errors, export, fp16, int8, optimize, parity, speed
from exporter.choices import Precision, Target
from exporter.errors import ExporterError

EXIT_USER_ERROR = 3


def _export(checkpoint: str, scratch: str, target: str, singles: str | None = None, batches: str | None = None,
            seconds: float = 0.5) -> dict:
    """Export and fuse; the fused graph is ``scratch/optimized/model.onnx``; returns the fusion record,
    with the unfused and fused graphs' batch throughput when ``singles``/``batches`` (.npz) are given.

    Each step runs in a worker of its own, one after the other (this process only waits): the torch
    exporter, the fusions and the speed check's sessions never share a process's memory."""
    raw = Path(scratch) / "raw"
    call("export-onnx", checkpoint=checkpoint, raw=str(raw))
    record = call("fuse", raw=str(raw), fused=str(Path(scratch) / "optimized"), target=target)
    if singles and batches:
        record["throughput_seq_s"] = call("fusion-speed", raw=str(raw), fused=str(Path(scratch) / "optimized"),
                                          level=record["level"], singles=singles, batches=batches, seconds=seconds)
    (raw / "model.onnx").unlink()
    return record


def _export_onnx(checkpoint: str, raw: str) -> dict:
    export.export_onnx(Path(checkpoint), Path(raw))
    return {}


def _fuse(raw: str, fused: str, target: str) -> dict:
    return optimize.optimize_onnx(Path(raw), Path(fused), Target(target))[1]


def _fusion_speed(raw: str, fused: str, level: str, singles: str, batches: str, seconds: float) -> dict:
    """Batch throughput of the unfused and the fused graph, one session at a time."""

    rows, full = load_batches(Path(singles)), load_batches(Path(batches))
    return {label: speed.measure(speed.ort_runner(parity.session(Path(path) / "model.onnx", Precision.FP32,
                                                                  arena=False)), rows, full, seconds).throughput_seq_s
            for label, path in (("unoptimized", raw), (level, fused))}


def _fp16(src: str, dst: str) -> dict:
    return fp16.convert_fp16(Path(src), Path(dst))


def _quantize(kind: str, src: str, dst: str, preset: str, per_channel: bool, exclude: list[str],
              calibration: str | None, calibration_cache: str | None) -> dict:
    """int8 quantization; ``calibration`` is an .npz of the calibration batches (see :func:`save_batches`)."""
    settings = int8.QuantSettings.from_preset(preset, is_static=kind == int8.STATIC, per_channel=per_channel)
    batches = load_batches(Path(calibration)) if calibration else None
    int8.quantize_here(kind, Path(src), Path(dst), settings, exclude=exclude, calibration=batches,
                       calibration_cache=Path(calibration_cache) if calibration_cache else None)
    return {}


def _rank(src: str, batches: str, op_types: list[str], preset: str, is_static: bool, per_channel: bool,
          calibration: str | None) -> list[dict]:
    settings = int8.QuantSettings.from_preset(preset, is_static=is_static, per_channel=per_channel)
    return int8.rank_sensitivity(Path(src), load_batches(Path(batches)), tuple(op_types), settings,
                                 load_batches(Path(calibration)) if calibration else None)


JOBS = {"export": _export, "export-onnx": _export_onnx, "fuse": _fuse, "fusion-speed": _fusion_speed, "fp16": _fp16,
        "quantize": _quantize, "rank": _rank}
PEAKS: list[tuple[str, int]] = []  # (job, peak RSS in bytes) of every worker this process ran, in order


def own_peak_rss() -> int:
    """This process's own peak RSS in bytes (``VmHWM``; the workers it ran report theirs in ``peaks``).

    Not ``getrusage``: Linux carries the spawning process's high-water mark across ``exec`` into the
    child's ``ru_maxrss``, so every worker would report at least the build process's peak."""
    import resource

    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def save_batches(batches: list[dict], path: Path) -> Path:
    """Tokenized batches as one .npz (``<i>/<name>`` keys) for a worker to read."""
    import numpy as np

    np.savez(path, **{f"{i}/{name}": value for i, batch in enumerate(batches) for name, value in batch.items()})
    return path


def load_batches(path: Path) -> list[dict]:
    import numpy as np

    batches: dict[int, dict] = {}
    with np.load(path) as data:
        for key in data.files:
            i, name = key.split("/", 1)
            batches.setdefault(int(i), {})[name] = data[key]
    return [batches[i] for i in sorted(batches)]


def call(job: str, **args: Any) -> dict:
    """Run ``job`` in a worker process and return its JSON result; its user errors are re-raised here."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory(prefix=f"exporter-{job}-") as tmp:
        spec, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"job": job, "args": args, "result": str(result_file)}))
        proc = subprocess.run([sys.executable, "-m", "exporter.worker", str(spec)], env=env)
        result = json.loads(result_file.read_text()) if result_file.is_file() else {}
    _record_peaks(job, result)
    if "error" in result and result["type"] != "ConversionError":
        raise getattr(errors, result["type"], errors.ExporterError)(result["error"])
    if "error" in result:
        raise RuntimeError(result["error"])
    if proc.returncode != 0 or "result" not in result:
        raise RuntimeError(f"the exporter worker ({job}) failed with exit code {proc.returncode}; see its log above")
    return result["result"]


def _record_peaks(job: str, result: dict) -> None:
    """Keep the peak RSS of the worker (and of the workers it ran itself) in :data:`PEAKS`."""
    import logging

    for name, peak in result.get("peaks", []):
        PEAKS.append((name, peak))
    if "peak_rss_bytes" in result:
        PEAKS.append((job, result["peak_rss_bytes"]))
        logging.getLogger(__name__).info("worker %s: peak RSS %.2f GB", job, result["peak_rss_bytes"] / 1e9)


def main(argv: list[str] | None = None) -> int:
    spec = json.loads(Path((argv or sys.argv[1:])[0]).read_text())
    setup_logging(False)
    out = Path(spec["result"])
    try:
        result = JOBS[spec["job"]](**spec["args"])
    except ExporterError as exc:  # a user error (e.g. an unexportable checkpoint): the parent says it in one line
        out.write_text(json.dumps({"error": str(exc), "type": type(exc).__name__, "peaks": PEAKS}))
        return EXIT_USER_ERROR
    except Exception as exc:  # a converter failure: the parent fails the variant with this reason
        out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}", "type": "ConversionError"}))
        raise
    out.write_text(json.dumps({"result": result, "peak_rss_bytes": own_peak_rss(), "peaks": PEAKS}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
