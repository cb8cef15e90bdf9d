"""Stage 6: in-process speed per variant, measured as the target serves it.

per_row (CPU target): each text tokenized and run alone, trimmed to its length, in a 1-thread session:
the per-core ceiling of the served path (a server runs one such session per core). batched (GPU target):
batch-1 latency percentiles and padded-batch throughput.

Every measure here rates a runtime on its steady state: the first row of each distinct input shape runs
once, unmeasured, before it is timed (:class:`FirstPerShape`). OpenVINO compiles per new input shape and
ONNX Runtime plans per shape, so a measure that timed those first calls rated a runtime by how many lengths
its short budget happened to meet (OpenVINO int8 on the demo model: 137.7 seq/s cold in 1 s, 307.4 warm).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Hashable, Sequence

import numpy as np

from exporter.artifacts import GateMode, SpeedResult
from exporter.parity import Batch
from serving.contract import ENCODER_INPUTS, ENCODER_LOGITS, ENCODER_PROBABILITIES

log = logging.getLogger(__name__)


def batch_shape(row: Batch) -> Hashable:
    """The input shape of one encoded row (a Batch): its arrays' shapes, by name."""
    return tuple(sorted((name, np.shape(value)) for name, value in row.items()))


class FirstPerShape:
    """``warm(row)`` runs ``run(row)`` once, unmeasured, when ``shape(row)`` is a shape not met before
    (True), else does nothing (False): at most one run per distinct shape. ``shapes`` counts them."""

    def __init__(self, run: Callable[[object], object], shape: Callable[[object], Hashable] = batch_shape):
        self.run, self.shape, self.seen = run, shape, set()

    @property
    def shapes(self) -> int:
        return len(self.seen)

    def __call__(self, row) -> bool:
        key = self.shape(row)
        if key in self.seen:
            return False
        self.seen.add(key)
        self.run(row)
        return True


def measure(run: Callable[[Batch], object], singles: list[Batch], batches: list[Batch], seconds: float,
            threads: int | None = None) -> SpeedResult:
    """Time ``run``: half of ``seconds`` on single rows (p50/p99 ms, each length's first call unmeasured),
    half on full batches (seq/s)."""
    budget = seconds / 2
    warm = FirstPerShape(run)
    latencies = _timed(lambda i: _warm_then_time(warm, run, singles[i % len(singles)]), budget)
    run(batches[0])
    rows, n = 0, 0
    start = time.perf_counter()
    while n < 2 or time.perf_counter() - start < budget:
        batch = batches[n % len(batches)]
        run(batch)
        rows += len(batch[ENCODER_INPUTS[0]])
        n += 1
    elapsed = time.perf_counter() - start
    return SpeedResult(mode=GateMode.BATCHED, **_percentiles(latencies), latency_samples=len(latencies),
                       throughput_seq_s=round(rows / elapsed, 1), throughput_rows=rows,
                       throughput_batch_size=int(max(len(b[ENCODER_INPUTS[0]]) for b in batches)),
                       intra_op_threads=threads, warmed_shapes=warm.shapes)


def measure_per_row(run: Callable[[Batch], object], encode: Callable[[str], Batch], texts: Sequence[str],
                    seconds: float, threads: int | None = 1,
                    shape: Callable[[object], Hashable] = batch_shape, rows: int | None = None) -> SpeedResult:
    """Time ``run(encode(text))`` one text at a time until ``seconds`` of timed rows (or exactly ``rows`` texts,
    at least 5, whatever the time): latency percentiles
    and seq/s, tokenization included (what one served row costs on one core). The first row of each
    distinct input shape (``shape(encode(text))``; pass one when ``encode`` leaves tokenizing to ``run``)
    runs once more before it is timed, unmeasured (:class:`FirstPerShape`): the steady state, not the
    runtime's per-shape compilation, is what is rated."""
    warm = FirstPerShape(run, shape)

    def step(i: int) -> float:
        t0 = time.perf_counter()
        row = encode(texts[i % len(texts)])
        return time.perf_counter() - t0 + _warm_then_time(warm, run, row)

    latencies = _timed(step, seconds) if rows is None else _timed(step, float("inf"), limit=max(rows, 5))
    return SpeedResult(mode=GateMode.PER_ROW, **_percentiles(latencies), latency_samples=len(latencies),
                       throughput_seq_s=round(len(latencies) / sum(latencies), 1), throughput_rows=len(latencies),
                       throughput_batch_size=1, intra_op_threads=threads, tokenization_included=True,
                       warmed_shapes=warm.shapes)


def _warm_then_time(warm: FirstPerShape, run: Callable[[object], object], row) -> float:
    """Seconds of ``run(row)``, after ``warm(row)`` ran it once unmeasured if its shape is new."""
    warm(row)
    t0 = time.perf_counter()
    run(row)
    return time.perf_counter() - t0


def _timed(step: Callable[[int], float], budget: float, limit: int = 5000) -> list[float]:
    """The seconds each ``step(i)`` timed (it returns them), at least 5 calls, until they add up to
    ``budget`` (or ``limit`` calls)."""
    latencies: list[float] = []
    total = 0.0
    while len(latencies) < 5 or (total < budget and len(latencies) < limit):
        latencies.append(step(len(latencies)))
        total += latencies[-1]
    return latencies


def _percentiles(latencies: list[float]) -> dict:
    ms = np.asarray(latencies) * 1000
    return {"latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
            "latency_ms_p99": round(float(np.percentile(ms, 99)), 3)}


def encoder(tokenizer, max_length: int) -> Callable[[str], Batch]:
    """text (or a (text, pair) tuple) -> one unpadded row of int64 encoder inputs (as the CPU server tokenizes)."""
    input_ids, attention_mask, token_type_ids = ENCODER_INPUTS

    def encode(text: str | tuple[str, str]) -> Batch:
        args = text if isinstance(text, tuple) else (text,)
        enc = tokenizer(*args, truncation=True, max_length=max_length, return_tensors="np")
        ids = enc[input_ids].astype(np.int64)
        types = enc[token_type_ids].astype(np.int64) if token_type_ids in enc else np.zeros_like(ids)
        return {input_ids: ids, attention_mask: enc[attention_mask].astype(np.int64), token_type_ids: types}

    return encode


def ort_runner(sess) -> Callable[[Batch], object]:
    names = {i.name for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs() if o.name in (ENCODER_LOGITS, ENCODER_PROBABILITIES)]
    return lambda batch: sess.run(outputs, {k: v for k, v in batch.items() if k in names})


def torch_runner(model) -> Callable[[Batch], object]:
    import torch

    names = set(model.forward.__code__.co_varnames)

    def run(batch: Batch):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in names}).logits

    return run
