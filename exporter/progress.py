"""The build's rich progress display: bars on stderr for the long loops (:func:`track`) while a
:func:`progress_display` is active, plain log lines otherwise. Imports nothing from the pipeline."""
from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")
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
