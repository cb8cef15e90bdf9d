"""The machine's in-process ceiling for one ONNX file: one process per core, each with a 1-intra-op-thread
ONNX Runtime session, each classifying one text at a time (tokenization inside the loop, no padding), all
processes at once; the ceiling is their summed sequences/s. It is what a served CPU path that runs each
row alone, one instance per core, can at best reach (issue #13)."""
from __future__ import annotations

import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from loadtest.errors import LoadtestError
from serving.contract import ENCODER_LOGITS

log = logging.getLogger(__name__)

WARMUP_TEXTS = 8


def usable_cores() -> list[int]:
    """The cores this process may run on (its affinity), else 0..cpu_count-1."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


@dataclass
class CeilingRun:
    """What the per-core processes measured together."""

    processes: int
    seq_per_s: float  # summed over the processes
    per_process_seq_per_s: list[float]
    latencies_ms: list[float]  # every row of every process
    label_ids: list[int]  # the first process's answers, in text order


def _row_loop(index: int, core: int | None, onnx: str, tokenizer_dir: str, texts: Sequence[str], max_length: int,
              barrier: Any, results: Any) -> None:
    """One process: pin to ``core``, warm up, wait for the others, then classify every text alone."""
    from transformers import AutoTokenizer

    from loadtest.bench import ort_session

    try:
        if core is not None:
            os.sched_setaffinity(0, {core})
        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        sess = ort_session(Path(onnx), 1)
        wanted = [i.name for i in sess.get_inputs()]

        def run(text: str) -> int:
            enc = tok(text, truncation=True, max_length=max_length, return_tensors="np")
            feed = {k: enc[k].astype(np.int64) if k in enc else np.zeros_like(enc["input_ids"], dtype=np.int64)
                    for k in wanted}
            return int(sess.run([ENCODER_LOGITS], feed)[0].argmax(-1)[0])

        for text in texts[:WARMUP_TEXTS]:
            run(text)
        barrier.wait(timeout=600)
        ids, lat = [], []
        t0 = time.perf_counter()
        for text in texts:
            t1 = time.perf_counter()
            ids.append(run(text))
            lat.append((time.perf_counter() - t1) * 1e3)
        results.put({"index": index, "seconds": time.perf_counter() - t0, "ids": ids, "lat": lat})
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        barrier.abort()
        results.put({"index": index, "error": f"{type(exc).__name__}: {exc}"})


def measure_ceiling(onnx: Path, tokenizer_dir: Path, texts: Sequence[str], max_length: int,
                    processes: int = 0) -> CeilingRun:
    """Run the per-core loop in ``processes`` processes (0: one per usable core) at once."""
    cores = usable_cores()
    n = processes or len(cores)
    ctx = multiprocessing.get_context("spawn")  # no inherited threads or sessions
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_row_loop, name=f"ceiling-{i}", daemon=True,
                         args=(i, cores[i] if n <= len(cores) else None, str(onnx), str(tokenizer_dir),
                               list(texts), max_length, barrier, results)) for i in range(n)]
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
    rates = [len(texts) / g["seconds"] for g in got]
    return CeilingRun(n, float(sum(rates)), rates, [x for g in got for x in g["lat"]], got[0]["ids"])
