"""Stage bookkeeping for the build: one log line per stage with its time, the process's peak RSS after
it (and how much the stage raised it), and the peaks of the worker processes it ran (the progress bars:
exporter.progress; the RSS readings: exporter.memory)."""
from __future__ import annotations

import contextlib
import logging
import time

from exporter import worker
from exporter.artifacts import MemoryRecord, MemoryStage
from exporter.memory import current_rss, peak_rss, release_memory

log = logging.getLogger(__name__)


def worker_peaks(since: int = 0) -> list[tuple[str, int]]:
    """(job, peak RSS) of each worker process run so far (from the ``since``-th on), as each one reported it."""
    return worker.PEAKS[since:]


class Stages:
    """``with stages("name"):`` logs, times and records the memory of one stage."""

    def __init__(self, weights_bytes: int | None = None) -> None:
        self.seconds: dict[str, float] = {}
        self.memory = MemoryRecord(weights_bytes=weights_bytes, peak_rss_bytes=peak_rss())

    @contextlib.contextmanager
    def __call__(self, name: str):
        log.info("stage %s ...", name)
        t0, peak0, rss0, workers0 = time.perf_counter(), peak_rss(), current_rss(), len(worker_peaks())
        yield
        release_memory()
        self.seconds[name] = round(time.perf_counter() - t0, 2)
        peak, worker = peak_rss(), max((p for _, p in worker_peaks(workers0)), default=0)
        self.memory.stages.append(MemoryStage(name, peak, peak - peak0, current_rss(), rss0, worker))
        self.memory.peak_rss_bytes = peak
        self.memory.worker_peak_rss_bytes = max(self.memory.worker_peak_rss_bytes, worker)
        log.info("stage %s done in %.1fs (peak RSS %.0f MB, +%.0f MB)", name, self.seconds[name], peak / 1e6,
                 (peak - peak0) / 1e6)
