"""Memory-heavy conversions in a process of their own: :func:`call` runs one job in a fresh worker process.

The torch exporter, the fusion passes, the fp16 converter and the quantizers each hold several copies of
the weights at once (measured on a BERT-base-sized checkpoint: +2.6 GB for the export, +3.8 GB for
ORTOptimizer's O2 pass, +0.5 GB for the fp16 conversion). Run in a worker, all of it goes back to the
system when the worker exits, and the build process only ever holds the sessions that judge a variant.
Each job runs in a ``concurrent.futures.ProcessPoolExecutor`` of one process that takes one task
(``max_tasks_per_child=1``), forked from multiprocessing's fork server (started once per calling process, with
this module imported): arguments and results travel pickled, and an exception a job raises arrives in
the caller as itself (class, message, and the worker's traceback as its cause).
"""
from __future__ import annotations

import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common.cli import setup_logging
from exporter import export, fp16, int8, openvino_ir, optimize, parity, speed
from exporter.choices import Precision, Target
from exporter.memory import weights_size

log = logging.getLogger(__name__)


# fp32 weights below this are exported and fused in one worker (all-MiniLM-L6-v2: 90 MB, BERT-base: 440 MB)
SHARED_EXPORT_BYTES = 128 * 2**20


class WorkerError(RuntimeError):
    """A worker's exception that cannot travel back pickled, as its class name and message."""


def _export(checkpoint: str, scratch: str, target: str, singles: str | None = None, batches: str | None = None,
            seconds: float = 0.5) -> dict:
    """Export and fuse; the fused graph is ``scratch/optimized/model.onnx``; returns the fusion record,
    with the unfused and fused graphs' batch throughput when ``singles``/``batches`` (.npz) are given.

    Each step runs in a worker of its own, one after the other (this process only waits): the torch
    exporter, the fusions and the speed check's sessions never share a process's memory. A checkpoint whose
    weights are under :data:`SHARED_EXPORT_BYTES` is exported and fused here, in this worker: their memory is
    small, and a worker of its own for each would import torch and Optimum twice more (~5 s a build)."""
    raw, fused = Path(scratch) / "raw", str(Path(scratch) / "optimized")
    if (weights_size(Path(checkpoint)) or SHARED_EXPORT_BYTES) < SHARED_EXPORT_BYTES:
        _export_graph(checkpoint, str(raw))
        record = _fuse(str(raw), fused, target)
    else:
        call("export-onnx", checkpoint=checkpoint, raw=str(raw))
        record = call("fuse", raw=str(raw), fused=fused, target=target)
    if singles and batches:
        record["throughput_seq_s"] = call("fusion-speed", raw=str(raw), fused=fused,
                                          level=record["level"], singles=singles, batches=batches, seconds=seconds)
    (raw / "model.onnx").unlink()
    return record


def _export_graph(checkpoint: str, raw: str) -> dict:
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


def _quantize(kind: str, src: str, dst: str, settings, exclude: list[str], calibration: str | None,
              calibration_cache: str | None) -> dict:
    """int8 quantization; ``calibration`` is an .npz of the calibration batches (see :func:`save_batches`).
    ``settings`` (an ``int8.QuantSettings``) arrives pickled, so this process never imports Optimum (nor torch)."""
    batches = load_batches(Path(calibration)) if calibration else None
    int8.quantize_here(kind, Path(src), Path(dst), settings, exclude=exclude, calibration=batches,
                       calibration_cache=Path(calibration_cache) if calibration_cache else None)
    return {}


def _rank(src: str, batches: str, op_types: list[str], settings, calibration: str | None) -> list[dict]:
    return int8.rank_sensitivity(Path(src), load_batches(Path(batches)), tuple(op_types), settings,
                                 load_batches(Path(calibration)) if calibration else None)


def _ov_convert(src: str, dst: str) -> dict:
    return openvino_ir.convert(Path(src), Path(dst))


def _ov_quantize(src: str, dst: str, calibration: str, ignored: dict | None, precision: str,
                 smooth_quant: bool = True) -> dict:
    """NNCF int8; ``calibration`` is an .npz of one-row feeds (see :func:`save_batches`)."""
    return openvino_ir.quantize(Path(src), Path(dst), load_batches(Path(calibration)), ignored, precision,
                                smooth_quant)


JOBS = {"export": _export, "export-onnx": _export_graph, "fuse": _fuse, "fusion-speed": _fusion_speed, "fp16": _fp16,
        "quantize": _quantize, "rank": _rank, "ov-convert": _ov_convert, "ov-quantize": _ov_quantize}
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


def call(job: str, **args: Any) -> Any:
    """Run ``job`` with ``args`` in a fresh worker process and return its result; what it raises is raised here.

    A worker that dies (killed for memory, a crash in native code) raises ``BrokenProcessPool`` (a RuntimeError).
    """
    # forked from a fork server: a fresh interpreter started once (no copy of this process's threads or memory)
    # that imported this module, so a job skips the interpreter start and these imports (~0.8 s each, spawn).
    # A job runs in the caller's cwd and sys.path but the environment the server started with (the CLI sets
    # OMP_WAIT_POLICY before its first job)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(max_workers=1, mp_context=context, max_tasks_per_child=1) as pool:
        result, peak, peaks = pool.submit(_run, job, args).result()
    PEAKS.extend(peaks)  # the workers that worker ran itself
    PEAKS.append((job, peak))
    log.info("worker %s: peak RSS %.2f GB", job, peak / 1e9)
    return result


def _run(job: str, args: dict) -> tuple[Any, int, list[tuple[str, int]]]:
    """In the worker: the job's result, this process's peak RSS and the peaks of the workers it ran."""
    setup_logging(False)
    try:
        result = JOBS[job](**args)
    except Exception as exc:
        failure = _picklable(exc)
        if failure is exc:
            raise
        raise failure from exc
    return result, own_peak_rss(), PEAKS


def _picklable(exc: Exception) -> Exception:
    """``exc`` itself when it survives a pickle round trip, else a :class:`WorkerError` naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # any failure to pickle it or to rebuild it
        return WorkerError(f"{type(exc).__name__}: {exc}")
    return exc
