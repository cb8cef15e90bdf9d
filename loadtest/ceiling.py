"""The machine's in-process ceiling for one ONNX file: one process per core, each doing exactly the served
model's per-row work (serving.models.tokenization's LengthTokenizer, one row alone at its own length, every
encoder output, an ONNX Runtime session with the served model's session options), all processes at once;
the ceiling is their summed sequences/s: what a served CPU path that runs each row alone, one instance per
core, can at best reach (issues #13, #22).

Each process first runs the first text of each distinct input shape once, untimed (exporter.speed.FirstPerShape,
the exporter's per-row measure's own warm-up: ONNX Runtime plans and allocates, OpenVINO compiles, per input
shape, so a pass that meets a new length pays for it; the old 8-text warm-up left that inside the timed
pass, see docs/LOADTEST.md), waits for the others, then times whole passes until ``min_seconds`` passed.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from exporter.speed import FirstPerShape
from loadtest.errors import LoadtestError
from serving.models import runtime
from serving.models.tokenization import LengthTokenizer

log = logging.getLogger(__name__)

MIN_SECONDS = 8.0  # timed seconds per process: whole passes until this much time has passed


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity), else 0..cpu_count-1."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


@dataclass(frozen=True)
class CeilingModel:
    """What the ceiling runs: the ONNX file, the directory holding its ``tokenizer.json``, and the served
    model's settings (``intra_op_threads`` as its config.pbtxt says: 1 by default, 0 the runtime's)."""

    onnx: Path
    tokenizer_dir: Path
    max_length: int = 128
    truncation_side: str = "right"
    intra_op_threads: int = 1


@dataclass
class CeilingRun:
    """What the per-core processes measured together."""

    processes: int
    seq_per_s: float  # summed over the processes
    per_process_seq_per_s: list[float]
    latencies_ms: list[float]  # every timed row of every process
    label_ids: list[int]  # the first process's answers, in text order
    intra_op_threads: int = 1
    sessions: list[int | None] = field(default_factory=list)  # each process's session id


class RowRunner:
    """One process's copy of the served per-row work: ``runner(text)`` -> the label id (argmax of the first
    output, the logits) of one row, each window alone and unpadded, as serving/models/textmodel.py runs it."""

    def __init__(self, model: CeilingModel) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = LengthTokenizer(Tokenizer.from_file(str(Path(model.tokenizer_dir) / "tokenizer.json")),
                                         model.max_length, model.truncation_side)
        # the served model's own session (serving/models/runtime.py): ONNX Runtime, or OpenVINO beside an IR
        self.session = runtime.open_session(model.onnx, model.intra_op_threads)
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def shape(self, text: str) -> tuple[int, ...]:
        """The token count of each window ``text`` runs as."""
        return tuple(len(enc.ids) for enc in self.tokenizer.encode(text).encodings)

    def __call__(self, text: str) -> int:
        results = []
        for enc in self.tokenizer.encode(text).encodings:
            columns = {"input_ids": enc.ids, "attention_mask": enc.attention_mask, "token_type_ids": enc.type_ids}
            feeds = {name: np.asarray([columns[name]], dtype=np.int64) for name in self.inputs}
            results.append(self.session.run(self.outputs, feeds))
        return int(np.mean([r[0][0] for r in results], axis=0).argmax())


def _timed_passes(run: RowRunner, texts: Sequence[str], min_seconds: float) -> tuple[list[int], list[float], int,
                                                                                     float]:
    """(first pass's label ids, every row's ms, rows run, seconds): whole passes until ``min_seconds``."""
    ids: list[int] = []
    lat: list[float] = []
    rows, t0 = 0, time.perf_counter()
    while True:
        for text in texts:
            t1 = time.perf_counter()
            label = run(text)
            lat.append((time.perf_counter() - t1) * 1e3)
            if rows < len(texts):
                ids.append(label)
            rows += 1
        seconds = time.perf_counter() - t0
        if seconds >= min_seconds:
            return ids, lat, rows, seconds


def _row_loop(index: int, core: int | None, model: CeilingModel, texts: Sequence[str], min_seconds: float,
              barrier: Any, results: Any, own_session: bool = True) -> None:
    """One process: its own session (see measure_ceiling), pin to ``core``, each distinct shape once untimed,
    wait for the others, then timed passes."""
    try:
        if own_session and hasattr(os, "setsid"):
            os.setsid()
        if core is not None:
            os.sched_setaffinity(0, {core})
        run = RowRunner(model)
        warm = FirstPerShape(run, run.shape)
        for text in texts:
            warm(text)
        barrier.wait(timeout=600)
        ids, lat, rows, seconds = _timed_passes(run, texts, min_seconds)
        results.put({"index": index, "rows": rows, "seconds": seconds, "ids": ids, "lat": lat,
                     "session": os.getsid(0) if hasattr(os, "getsid") else None})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        barrier.abort()
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})


def measure_ceiling(model: CeilingModel, texts: Sequence[str], processes: int = 0,
                    min_seconds: float = MIN_SECONDS, own_session: bool = True) -> CeilingRun:
    """Run the per-core loop in ``processes`` processes (0: one per usable core; each pinned to its core
    when there are no more processes than cores and one intra-op thread each) at once. Each process starts
    its own session (``own_session``), as tritonserver does (serving.server): where the kernel groups CPU
    time by session (Linux autogroup, ``/proc/sys/kernel/sched_autogroup_enabled``), processes left in the
    bench's session share one fair share of a busy machine between them, while a served stack gets its own."""
    if not texts:
        raise LoadtestError("the ceiling needs at least one text")
    cores = usable_cores()
    threads = model.intra_op_threads or len(cores)  # 0: the runtime's default, a thread per core
    n = processes or max(1, len(cores) // threads)
    pin = n <= len(cores) and threads == 1
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or sessions
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_row_loop, name=f"ceiling-{i}", daemon=True,
                         args=(i, cores[i] if pin else None, model, list(texts), min_seconds, barrier, results,
                               own_session))
             for i in range(n)]
    for p in procs:
        p.start()
    try:
        got = [results.get(timeout=900) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
    errors = [g["error"] for g in got if "error" in g]
    if errors:
        raise LoadtestError(f"ceiling run failed: {errors[0]}")
    got.sort(key=lambda g: g["index"])
    rates = [g["rows"] / g["seconds"] for g in got]
    return CeilingRun(n, float(sum(rates)), rates, [x for g in got for x in g["lat"]], got[0]["ids"],
                      model.intra_op_threads, [g["session"] for g in got])
