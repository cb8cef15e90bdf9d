"""Stage 6: in-process speed per variant: batch-1 latency percentiles and batched throughput."""
from __future__ import annotations

import logging
import time
from typing import Callable

import numpy as np

from exporter.parity import Batch

log = logging.getLogger(__name__)


def measure(run: Callable[[Batch], object], singles: list[Batch], batches: list[Batch], seconds: float) -> dict:
    """Time ``run``: half of ``seconds`` on single rows (p50/p99 ms), half on full batches (seq/s)."""
    budget = seconds / 2
    for batch in singles[:3]:
        run(batch)
    latencies = []
    start = time.perf_counter()
    i = 0
    while i < 5 or (time.perf_counter() - start < budget and i < 2000):
        batch = singles[i % len(singles)]
        t0 = time.perf_counter()
        run(batch)
        latencies.append(time.perf_counter() - t0)
        i += 1
    run(batches[0])
    rows, n = 0, 0
    start = time.perf_counter()
    while n < 2 or time.perf_counter() - start < budget:
        batch = batches[n % len(batches)]
        run(batch)
        rows += len(batch["input_ids"])
        n += 1
    elapsed = time.perf_counter() - start
    ms = np.asarray(latencies) * 1000
    return {
        "latency_ms_p50": round(float(np.percentile(ms, 50)), 3),
        "latency_ms_p99": round(float(np.percentile(ms, 99)), 3),
        "latency_samples": len(latencies),
        "throughput_seq_s": round(rows / elapsed, 1),
        "throughput_batch_size": int(max(len(b["input_ids"]) for b in batches)),
        "throughput_rows": rows,
    }


def ort_runner(sess) -> Callable[[Batch], object]:
    names = {i.name for i in sess.get_inputs()}
    return lambda batch: sess.run(["logits", "probabilities"], {k: v for k, v in batch.items() if k in names})


def torch_runner(model) -> Callable[[Batch], object]:
    import torch

    names = set(model.forward.__code__.co_varnames)

    def run(batch: Batch):
        with torch.inference_mode():
            return model(**{k: torch.from_numpy(v) for k, v in batch.items() if k in names}).logits

    return run
