"""Stage bookkeeping for the build: one log line per stage with its time, the process's peak RSS after
it (and how much the stage raised it), and a rich progress display for the long loops."""
from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import resource
import sys
import time
from typing import Iterable, Iterator, TypeVar

from exporter.artifacts import MemoryRecord, MemoryStage

log = logging.getLogger(__name__)
T = TypeVar("T")
_PAGE = resource.getpagesize()


def peak_rss() -> int:
    """The process's high-water resident set size in bytes (it never goes down)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_peaks(since: int = 0) -> list[tuple[str, int]]:
    """(job, peak RSS) of each worker process run so far (from the ``since``-th on), as each one reported it."""
    from exporter import worker

    return worker.PEAKS[since:]


def current_rss() -> int:
    """The process's resident set size now, in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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


_progress = None  # the rich Progress of the running build, if any


@contextlib.contextmanager
def progress_display() -> Iterator[None]:
    """Show rich progress bars on stderr for :func:`track` calls made inside (plain lines when not a TTY)."""
    global _progress
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=sys.stderr)
    if not console.is_terminal:  # logs already say what happens; a live display would only add noise
        yield
        return
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True, redirect_stderr=False, redirect_stdout=False)
    _progress = progress
    handlers = [h for h in logging.getLogger().handlers
                if isinstance(h, logging.StreamHandler) and h.stream in (sys.stderr, sys.__stderr__)]
    streams = [h.setStream(_ConsoleStream(console)) for h in handlers]  # log lines print above the bars
    try:
        with progress:
            yield
    finally:
        _progress = None
        for handler, stream in zip(handlers, streams):
            handler.setStream(stream)


class _ConsoleStream:
    """A file-like front of a rich Console, so log records do not tear the live progress display."""

    def __init__(self, console) -> None:
        self.console = console

    def write(self, text: str) -> None:
        if text.strip():
            self.console.print(text.rstrip("\n"), markup=False, highlight=False, soft_wrap=True)

    def flush(self) -> None:
        pass


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """Iterate ``items``, advancing a progress bar when a display is active."""
    if _progress is None:
        yield from items
        return
    task = _progress.add_task(description, total=total if total is not None else len(items))  # type: ignore[arg-type]
    try:
        for item in items:
            yield item
            _progress.advance(task)
    finally:
        _progress.remove_task(task)
